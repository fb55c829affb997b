"""Helpers shared by the test folders (tests/conftest.py puts tests/ on sys.path, so ``from support import ...``
works from any of them): :mod:`support.models` (every tiny model and pipeline), :mod:`support.checks` (tolerances,
guided runs, restoration snapshots, row recording), :mod:`support.reference` (the reference fold of an
independent perturbed pass, diffusers' or a masked SDPA, into one-call or separate-call CFG) and
:mod:`support.tiny_clip` (a tiny CLIP on disk)."""
