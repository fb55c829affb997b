"""Imports point down only: apps -> search -> guiders -> guided -> heads -> archs -> kernels -> torch (+ triton).

Every module of the package is parsed (not imported) and each of its imports of a headpag module is checked
against the layer table below. The package root (``headpag/__init__.py``, ``__main__.py``) is the public facade
and sits above everything; only the applications (and the facade itself) may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "archs", "heads", "guided", "guiders", "search", "apps", "facade")


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["headpag", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str | None:
    """The layer of a headpag module name, None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != "headpag":
        return None
    layer = "facade" if len(parts) == 1 or parts[1] == "__main__" else parts[1]
    if layer not in LAYERS:
        raise AssertionError(f"{module}: unknown layer {layer!r}; add it to LAYERS in tests/test_layering.py")
    return layer


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file (relative ones resolved)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # ``from . import x`` / ``from headpag import x``: x may be a submodule.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted([*(ROOT / "headpag").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def _known_submodule(name: str, root: Path) -> str:
    """``name`` cut to the longest prefix that is a module or package of the source tree."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = parts[:n]
        if prefix[:1] != ["headpag"]:
            return name
        rel = ["kernels", *prefix[2:]] if prefix[1:2] == ["kernels"] else prefix
        if root.joinpath(*rel).with_suffix(".py").exists() or (root.joinpath(*rel) / "__init__.py").exists():
            return ".".join(prefix)
    return name


def violations(paths, root: Path = ROOT) -> list[str]:
    """One line per import that points up (or, from kernels, out of the op)."""
    found = []
    for path in paths:
        own = _layer(_module_name(path, root))
        for line, target in _imports(path, root):
            target = _known_submodule(target, root)
            other = _layer(target)
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if target.split(".")[0] == "kernels":
                found.append(f"{where}: the op is headpag.kernels; a top-level 'kernels' must stay inert")
            elif own == "kernels" and (target.split(".")[0] == "diffusers" or other not in (None, "kernels")):
                found.append(f"{where}: kernels import nothing from diffusers or the rest of headpag")
            elif own == "apps" and other == "facade":
                continue
            elif other is not None and LAYERS.index(other) > LAYERS.index(own):
                found.append(f"{where}: layer {own} may not import layer {other}")
    return found


def test_every_module_imports_only_layers_below_its_own():
    sources = _sources()
    assert len(sources) > 30  # the walk found the package
    assert violations(sources) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """A fake guided module importing search, a fake kernels module importing diffusers: both are reported."""
    fake_root = tmp_path
    (fake_root / "headpag" / "guided").mkdir(parents=True)
    (fake_root / "headpag" / "search").mkdir()
    (fake_root / "kernels").mkdir()
    for package in ("headpag", "headpag/guided", "headpag/search", "kernels"):
        (fake_root / package / "__init__.py").write_text("")
    (fake_root / "headpag" / "search" / "hunter.py").write_text("")
    bad_guided = fake_root / "headpag" / "guided" / "bad.py"
    bad_guided.write_text("from ..search.hunter import hunt\n")
    bad_kernel = fake_root / "kernels" / "bad.py"
    bad_kernel.write_text("import diffusers\nfrom headpag.guided import api\nimport kernels.flops\n")
    fine = fake_root / "headpag" / "search" / "fine.py"
    fine.write_text("from ..guided import bad\nfrom . import hunter\n")
    found = violations([bad_guided, bad_kernel, fine], root=fake_root)
    assert len(found) == 4, found
    assert "headpag/guided/bad.py:1 imports headpag.search.hunter: layer guided may not import layer search" in found
    assert sum("kernels import nothing" in f for f in found) == 2
    assert sum("must stay inert" in f for f in found) == 1
    (fake_root / "headpag" / "util.py").write_text("")
    with pytest.raises(AssertionError, match="unknown layer 'util'"):
        violations([fake_root / "headpag" / "util.py"], root=fake_root)


def test_importing_the_package_loads_no_application():
    """``import headpag`` (the facade every layer's import goes through) loads nothing of headpag.apps: the CLI,
    demo, digits model and benchmarks stay out of a library user's process."""
    import subprocess
    import sys

    code = "import sys, headpag; print(sorted(m for m in sys.modules if m.startswith('headpag.apps')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "[]"
