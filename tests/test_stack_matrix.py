"""bench/stack_matrix.py's reading of its steps' output and its table (no venv is built here): pytest's closing
lines, the compile check's JSON rows, the stack files in stacks/, and the cells of the table."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("stack_matrix", REPO / "bench" / "stack_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sm = _load()


@pytest.mark.parametrize("output, counts", [
    ("....\n686 passed, 14 warnings in 231.74s (0:03:51)\n", {"passed": 686, "warnings": 14}),
    ("F.\n=== 3 failed, 680 passed, 2 skipped, 1 error in 12.00s ===\n",
     {"failed": 3, "passed": 680, "skipped": 2, "errors": 1}),
    ("1 passed in 0.5s\nlater output\n2 failed, 5 passed in 1.25s\n", {"failed": 2, "passed": 5}),  # the last one
    ("ImportError while loading conftest\n", {}),
    ("no tests ran in 0.01s\n", {}),
])
def test_parse_pytest_counts(output, counts):
    assert sm.parse_pytest_counts(output) == counts


def test_pytest_step_counts_errors_as_failures():
    step = sm.pytest_step("5 passed, 2 errors in 3.0s\n", 1, 3.0)
    assert step.counts == {"passed": 5, "failed": 2}
    assert not step.passed
    assert sm.pytest_step("7 passed in 3.0s\n", 0, 3.0).passed


def test_pytest_step_without_summary_is_an_error():
    step = sm.pytest_step("Segmentation fault\n", -11, 2.0)
    assert step.error == "no pytest summary (exit -11)"
    assert not step.passed
    assert sm.format_step(step, "pytest") == "**no pytest summary (exit -11)**"


def _aot_row(ok=True, spills=(0, 0), async_copies=20, failures=()):
    return {"ok": ok, "spill_stores": spills[0], "spill_loads": spills[1], "async_copies": async_copies,
            "failures": list(failures)}


def test_aot_step_counts_ok_failed_spills_and_unpipelined():
    rows = [_aot_row(), _aot_row(),
            _aot_row(spills=(4, 4), failures=["spills 4/4 bytes"]),
            _aot_row(async_copies=0, failures=["key loop not software-pipelined (no cp.async in the PTX)"]),
            _aot_row(ok=False, spills=(-1, -1), async_copies=-1, failures=["compile failed: X"])]
    step = sm.aot_step(rows, 1, 60.0)
    assert step.counts == {"ok": 2, "failed": 3, "spills": 1, "not pipelined": 1, "cached": 0}
    assert not step.passed
    assert sm.format_step(step, "aot") == "**2 ok, 3 failed (1 spill, 1 not pipelined)**; 1.0 min"
    clean = sm.aot_step([_aot_row()] * 3, 0, 120.0)
    assert clean.passed
    assert sm.format_step(clean, "aot") == "3 ok, 0 failed (0 spill, all pipelined); 2.0 min"
    reused = sm.aot_step([_aot_row(), _aot_row() | {"cached": True}], 0, 6.0)
    assert sm.format_step(reused, "aot") == "2 ok, 0 failed (0 spill, all pipelined, 1 read from the cache); 0.1 min"


def test_aot_step_without_json_is_an_error():
    step = sm.aot_step(None, 2, 1.0)
    assert not step.passed and step.error == "no results written (exit 2)"


def test_format_step_marks_failures_and_odd_exit_codes():
    assert sm.format_step(None, "pytest") == "not run"
    assert sm.format_step(sm.pytest_step("10 passed, 1 skipped in 90.0s", 0, 90.0), "pytest") == \
        "10 passed, 0 failed, 1 skipped; 1.5 min"
    assert sm.format_step(sm.pytest_step("9 passed, 1 failed in 90.0s", 1, 90.0), "pytest") == \
        "**9 passed, 1 failed**; 1.5 min"
    # exit 124: the step's timeout ended pytest after it printed a summary of an earlier run
    assert sm.format_step(sm.pytest_step("9 passed in 90.0s", 124, 90.0), "pytest") == \
        "**9 passed, 0 failed** (exit 124); 1.5 min"


def test_format_table_rows_and_install_failure(tmp_path):
    stack = sm.Stack("old", "3.10", tmp_path / "old.txt")
    ok = sm.StackResult(stack, versions={"python": "3.10.13", "torch": "2.10.0", "triton": "3.6.0",
                                         "diffusers": "0.41.0", "transformers": "5.10.1", "numpy": "2.2.6"},
                        install=sm.StepResult(returncode=0),
                        kernel=sm.pytest_step("3 passed in 60.0s", 0, 60.0),
                        compile=sm.aot_step([_aot_row()], 0, 60.0),
                        integration=sm.pytest_step("2 passed, 1 failed in 60.0s", 1, 60.0))
    broken = sm.StackResult(sm.Stack("new", "3.12", tmp_path / "new.txt"),
                            install=sm.StepResult(returncode=1, error="pip install exit 1"))
    lines = sm.format_table([ok, broken]).splitlines()
    assert lines[0] == ("| stack | python | torch | triton | diffusers | transformers | numpy | kernel tests | "
                        "compile check | integration tests |")
    assert lines[2] == ("| old | 3.10.13 | 2.10.0 | 3.6.0 | 0.41.0 | 5.10.1 | 2.2.6 | 3 passed, 0 failed; 1.0 min | "
                        "1 ok, 0 failed (0 spill, all pipelined); 1.0 min | **2 passed, 1 failed**; 1.0 min |")
    assert lines[3] == ("| new | 3.12 | ? | ? | ? | ? | ? | **install failed: pip install exit 1** | not run | "
                        "not run |")
    assert not ok.passed and not broken.passed
    ok.integration = sm.pytest_step("3 passed in 60.0s", 0, 60.0)
    assert ok.passed


def test_read_stack(tmp_path):
    (tmp_path / "a.txt").write_text("# about\n# python: 3.12\ntorch==2.11.0\n")
    (tmp_path / "b.txt").write_text("torch==2.11.0\n")
    assert sm.read_stack("a", tmp_path) == sm.Stack("a", "3.12", tmp_path / "a.txt")
    with pytest.raises(ValueError, match=r"b\.txt has no '# python: X\.Y' line"):
        sm.read_stack("b", tmp_path)
    with pytest.raises(ValueError, match=r"stack 'c': no constraints file .*stacks are \['a', 'b'\]"):
        sm.read_stack("c", tmp_path)


def test_repo_stacks_name_their_python_and_pin_the_four_libraries():
    """Every default stack exists; each pins torch, triton, diffusers and transformers exactly (newest via
    constraints-ci.txt), so the table's versions are the file's."""
    for name in sm.DEFAULT_STACKS:
        stack = sm.read_stack(name)
        text = stack.constraints.read_text()
        for line in text.splitlines():
            if line.startswith("-c "):
                text += (stack.constraints.parent / line[3:].strip()).read_text()
        for package in ("torch", "triton", "diffusers", "transformers"):
            assert f"\n{package}==" in text, (name, package)


def test_main_refuses_venvs_inside_the_repo_and_unknown_stacks(capsys):
    with pytest.raises(SystemExit):
        sm.main(["--venvs", str(REPO / "venvs")])
    assert "--venvs must be outside the repository" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sm.main(["--stacks", "nope", "--venvs", "/tmp/headpag-stacks-test"])
    assert "stack 'nope': no constraints file" in capsys.readouterr().err
