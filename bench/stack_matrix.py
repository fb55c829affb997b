"""Stack matrix: the test suite and the compile check on every supported dependency stack, oldest to newest.

    python bench/stack_matrix.py [--stacks NAME ...] [--venvs DIR] [--fresh] [--aot-workers N] [--aot-args ARGS]

A stack is one constraints file ``stacks/<name>.txt`` (exact pins for ``pip install -c``) whose header names the
Python it runs on (``# python: 3.12``). For each stack the script makes (or reuses) a virtual environment
``<venvs>/<name>`` with that Python, runs ``pip install -e ".[test]" -c stacks/<name>.txt`` and then three steps,
each in its own process with the venv's interpreter:

- kernel tests: ``python -m pytest tests/kernels`` (Triton's CPU interpreter; tests/conftest.py sets
  ``TRITON_INTERPRET=1``),
- compile check: ``python -m headpag.kernels.aot`` (no ``TRITON_INTERPRET`` in its environment; with
  ``--cache <venvs>/aot-cache``, so a config already compiled by the same triton from the same kernel source and
  compile code is read back rather than compiled again: stacks that share a triton compile once),
- integration tests: ``python -m pytest tests --ignore=tests/kernels`` (everything else).

It prints one Markdown table, stack x (versions, kernel tests, compile check, integration tests) with pass/fail
counts, writes each step's output to ``<venvs>/<name>-logs/`` and exits non-zero unless every step of every stack
passed. On a 2-core machine the matrix takes about 35 minutes once the compile check's cache is filled (each
triton version adds about 25 minutes to fill it); CI (``.ci/run``) runs only the newest stack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO / "stacks"
#: The stacks in the order the table lists them (oldest to newest); each is ``stacks/<name>.txt``.
DEFAULT_STACKS = ("oldest", "gpu-machines", "newest")
#: The packages whose versions the table shows, in its column order.
SHOWN_PACKAGES = ("torch", "triton", "diffusers", "transformers", "numpy")
DEFAULT_VENVS = Path(os.environ.get("HEADPAG_STACK_VENVS", Path.home() / ".cache" / "headpag-stacks"))

PYTHON_HEADER = re.compile(r"^#\s*python:\s*(\d+\.\d+)\s*$", re.M)
# pytest's closing line, e.g. "=== 3 failed, 680 passed, 2 skipped, 14 warnings in 231.74s (0:03:51) ===" (with -q
# without the "=" rule).
PYTEST_CLOSING = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s\b", re.M)
PYTEST_COUNT = re.compile(r"(\d+) ([a-z]+)")


@dataclass(frozen=True)
class Stack:
    """One dependency stack: its name, the ``X.Y`` Python it runs on and its constraints file."""

    name: str
    python: str
    constraints: Path


def read_stack(name: str, stacks_dir: Path = STACKS_DIR) -> Stack:
    """The stack ``stacks_dir/<name>.txt``. Raises ``ValueError`` naming the file when it is missing or its header
    lacks the ``# python: X.Y`` line."""
    path = stacks_dir / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in stacks_dir.glob("*.txt"))
        raise ValueError(f"stack {name!r}: no constraints file {path}; stacks are {known}")
    match = PYTHON_HEADER.search(path.read_text())
    if match is None:
        raise ValueError(f"stack {name!r}: {path} has no '# python: X.Y' line naming the Python it runs on")
    return Stack(name, match.group(1), path)


def _python_version(executable: str) -> str | None:
    """``X.Y`` of the Python ``executable``, or None when it does not run (e.g. a pyenv shim of an unselected
    version)."""
    try:
        proc = subprocess.run([executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def find_python(version: str) -> str | None:
    """A Python ``version`` (``X.Y``) interpreter: ``pythonX.Y`` on PATH, else pyenv's installed ``X.Y``."""
    candidates = [shutil.which(f"python{version}")]
    if shutil.which("pyenv"):
        proc = subprocess.run(["pyenv", "prefix", version], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            candidates.append(os.path.join(proc.stdout.strip().splitlines()[0], "bin", f"python{version}"))
    return next((c for c in candidates if c and _python_version(c) == version), None)


@dataclass
class StepResult:
    """One step of one stack: ``counts`` maps pytest's words ("passed", "failed", ...) or the compile check's
    ("ok", "failed", "spills", "not pipelined") to numbers; ``error`` says why there are none (a crash, a
    missing interpreter, an earlier step that failed)."""

    counts: dict[str, int] = field(default_factory=dict)
    returncode: int | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.returncode == 0 and self.counts.get("failed", 0) == 0


def parse_pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last closing line in ``output`` (``{"passed": 683, "failed": 3, ...}``; "error" is
    counted as "errors", "warning" as "warnings"). Empty when the output has no closing line (pytest crashed)."""
    matches = PYTEST_CLOSING.findall(output)
    if not matches:
        return {}
    counts: dict[str, int] = {}
    for number, word in PYTEST_COUNT.findall(matches[-1]):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(number)
    return counts


def pytest_step(output: str, returncode: int, seconds: float) -> StepResult:
    """A pytest step's result; errors (collection or fixture errors) count as failures."""
    counts = parse_pytest_counts(output)
    if not counts:
        return StepResult(returncode=returncode, seconds=seconds, error=f"no pytest summary (exit {returncode})")
    counts["failed"] = counts.get("failed", 0) + counts.pop("errors", 0)
    counts.setdefault("passed", 0)
    return StepResult(counts, returncode, seconds)


def aot_step(results: list[dict] | None, returncode: int, seconds: float) -> StepResult:
    """The compile check's result from the rows of its ``--json`` file (``aot.Result`` fields plus ``failures``):
    configs ok and failed, and how many of them spill or are not software-pipelined."""
    if results is None:
        return StepResult(returncode=returncode, seconds=seconds, error=f"no results written (exit {returncode})")
    failures = [r["failures"] for r in results]
    counts = {
        "ok": sum(not f for f in failures),
        "failed": sum(bool(f) for f in failures),
        "spills": sum(r["spill_stores"] + r["spill_loads"] > 0 for r in results if r["ok"]),
        "not pipelined": sum(r["async_copies"] <= 0 for r in results if r["ok"]),
        "cached": sum(bool(r.get("cached")) for r in results),
    }
    return StepResult(counts, returncode, seconds)


@dataclass
class StackResult:
    stack: Stack
    versions: dict[str, str] = field(default_factory=dict)
    install: StepResult | None = None
    kernel: StepResult | None = None
    compile: StepResult | None = None
    integration: StepResult | None = None

    @property
    def steps(self) -> tuple[StepResult | None, ...]:
        return (self.kernel, self.compile, self.integration)

    @property
    def passed(self) -> bool:
        return all(step is not None and step.passed for step in self.steps)


def format_step(step: StepResult | None, kind: str) -> str:
    """One table cell: ``kind`` "pytest" gives "683 passed, 3 failed, 2 skipped", "aot" gives "466 ok, 0 failed
    (0 spill, all pipelined)"; then the minutes. A step that did not run says so."""
    if step is None:
        return "not run"
    if step.error:
        return f"**{step.error}**"
    c = step.counts
    if kind == "aot":
        pipelined = "all pipelined" if not c["not pipelined"] else f"{c['not pipelined']} not pipelined"
        cached = f", {c['cached']} read from the cache" if c.get("cached") else ""
        text = f"{c['ok']} ok, {c['failed']} failed ({c['spills']} spill, {pipelined}{cached})"
    else:
        text = f"{c['passed']} passed, {c['failed']} failed" + (f", {c['skipped']} skipped" if c.get("skipped") else "")
    if not step.passed:
        text = f"**{text}**" + (f" (exit {step.returncode})" if step.returncode not in (0, 1) else "")
    return f"{text}; {step.seconds / 60:.1f} min"


def format_table(results: list[StackResult]) -> str:
    """The Markdown table of the matrix, one row per stack."""
    header = ["stack", "python", *SHOWN_PACKAGES, "kernel tests", "compile check", "integration tests"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if r.install is not None and not r.install.passed:
            cells = [f"**install failed: {r.install.error or f'exit {r.install.returncode}'}**"] + ["not run"] * 2
        else:
            cells = [format_step(r.kernel, "pytest"), format_step(r.compile, "aot"), format_step(r.integration, "pytest")]
        python = r.versions.get("python", r.stack.python)
        lines.append("| " + " | ".join([r.stack.name, python, *(r.versions.get(p, "?") for p in SHOWN_PACKAGES), *cells]) + " |")
    return "\n".join(lines)


def _run(cmd: list[str], log: Path, env: dict[str, str], timeout: float | None) -> tuple[str, int, float]:
    """Runs ``cmd`` in the repo root, writing its output to ``log``; returns output, exit status, seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""))
        output += f"\n[stack_matrix] timed out after {timeout} s\n"
        returncode = 124
    seconds = time.perf_counter() - start
    log.write_text(f"$ {shlex.join(cmd)}\n{output}")
    return output, returncode, seconds


def _step_env(venv: Path) -> dict[str, str]:
    """The environment of a step: the venv first on PATH, nothing inherited that selects another interpreter,
    packages or Triton's interpreter (the kernel tests' conftest sets ``TRITON_INTERPRET=1`` itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def run_stack(stack: Stack, venvs: Path, *, fresh: bool, aot_workers: int, aot_args: list[str],
              aot_cache: Path | None, timeout: float | None, log=print) -> StackResult:
    """Builds (or reuses) the stack's venv, installs headpag with its constraints and runs the three steps."""
    result = StackResult(stack)
    venv, logs = venvs / stack.name, venvs / f"{stack.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = find_python(stack.python)
    if python is None:
        result.install = StepResult(error=f"python{stack.python} not found (PATH, pyenv)")
        return result
    if fresh and venv.exists():
        shutil.rmtree(venv)
    env = _step_env(venv)
    py = str(venv / "bin" / "python")
    log(f"[{stack.name}] venv {venv} (python{stack.python}); pip install -e '.[test]' -c {stack.constraints}")
    if not (venv / "bin" / "python").exists():
        _, rc, secs = _run([python, "-m", "venv", str(venv)], logs / "venv.log", env, timeout)
        if rc:
            result.install = StepResult(returncode=rc, seconds=secs, error=f"venv failed (exit {rc})")
            return result
    _, rc, secs = _run([py, "-m", "pip", "install", "-e", ".[test]", "-c", str(stack.constraints)], logs / "install.log", env, timeout)
    result.install = StepResult(returncode=rc, seconds=secs, error=f"pip install exit {rc}, see {logs / 'install.log'}" if rc else "")
    if rc:
        return result
    probe = ("import importlib.metadata as m, json, platform; "
             f"print(json.dumps({{'python': platform.python_version(), **{{p: m.version(p) for p in {list(SHOWN_PACKAGES)!r}}}}}))")
    out, rc, _ = _run([py, "-c", probe], logs / "versions.log", env, timeout)
    result.versions = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
    log(f"[{stack.name}] {result.versions}")

    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    out, rc, secs = _run(pytest + ["tests/kernels"], logs / "kernel-tests.log", env, timeout)
    result.kernel = pytest_step(out, rc, secs)
    log(f"[{stack.name}] kernel tests: {format_step(result.kernel, 'pytest')}")

    aot_json = logs / "aot.json"
    aot_json.unlink(missing_ok=True)
    cache = ["--cache", str(aot_cache)] if aot_cache else []
    _, rc, secs = _run([py, "-m", "headpag.kernels.aot", "--workers", str(aot_workers), "--json", str(aot_json), *cache,
                        *aot_args], logs / "compile-check.log", env, timeout)
    result.compile = aot_step(json.loads(aot_json.read_text()) if aot_json.exists() else None, rc, secs)
    log(f"[{stack.name}] compile check: {format_step(result.compile, 'aot')}")

    out, rc, secs = _run(pytest + ["tests", "--ignore=tests/kernels"], logs / "integration-tests.log", env, timeout)
    result.integration = pytest_step(out, rc, secs)
    log(f"[{stack.name}] integration tests: {format_step(result.integration, 'pytest')}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/stack_matrix.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", nargs="+", default=list(DEFAULT_STACKS), metavar="NAME",
                        help=f"stacks to run, each stacks/NAME.txt (default: {' '.join(DEFAULT_STACKS)})")
    parser.add_argument("--venvs", type=Path, default=DEFAULT_VENVS,
                        help="folder of the stacks' virtual environments and logs, outside the repo "
                             "(default: $HEADPAG_STACK_VENVS or ~/.cache/headpag-stacks)")
    parser.add_argument("--fresh", action="store_true", help="delete and rebuild each stack's venv")
    parser.add_argument("--aot-workers", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="compile check worker processes (default: the CPU count)")
    parser.add_argument("--aot-args", default="", help="more arguments for the compile check, e.g. '--arch 80'")
    parser.add_argument("--no-aot-cache", action="store_true",
                        help="compile every config afresh (default: reuse per-config results in <venvs>/aot-cache, "
                             "keyed by the triton version, the kernel source and the compile code: aot.py --cache)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed for each step (default: none)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.aot_workers < 1:
        parser.error(f"--aot-workers must be >= 1, got {args.aot_workers}")
    venvs = args.venvs.resolve()
    if venvs == REPO or REPO in venvs.parents:
        parser.error(f"--venvs must be outside the repository {REPO}, got {venvs}")
    try:
        stacks = [read_stack(name) for name in args.stacks]
    except ValueError as err:
        parser.error(str(err))

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = [
        run_stack(stack, venvs, fresh=args.fresh, aot_workers=args.aot_workers, aot_args=shlex.split(args.aot_args),
                  aot_cache=None if args.no_aot_cache else venvs / "aot-cache", timeout=args.timeout, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        for stack in stacks
    ]
    print(f"Stack matrix, {started} (python bench/stack_matrix.py {shlex.join(argv if argv is not None else sys.argv[1:])}):\n")
    print(format_table(results))
    passing = sum(r.passed for r in results)
    print(f"\n{passing} of {len(results)} stacks pass every step.")
    if args.json:
        args.json.write_text(json.dumps([
            {"stack": r.stack.name, "versions": r.versions, "passed": r.passed,
             **{name: (vars(step) if step else None) for name, step in
                (("install", r.install), ("kernel", r.kernel), ("compile", r.compile), ("integration", r.integration))}}
            for r in results], indent=1))
    return 0 if passing == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
