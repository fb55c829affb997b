"""``headpag demo`` end to end on its quick setting."""

from __future__ import annotations

import json

import pytest

from headpag.cli import build_parser, main

SETTINGS = ("none", "cfg s=", "layer-pag", "head-pag", "softpag", "hunted")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--seeds", "--steps", "--scale", "--u", "--layers", "--heads", "--hunt-rounds",
                   "--hunt-k", "--hunt-seeds", "--out", "--guidance-scale"):
        assert option in text


def test_quick_demo_writes_table_and_grid(tmp_path, capsys):
    from PIL import Image

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| setting |")
    for setting in SETTINGS:
        assert any(line.startswith(f"| {setting}") for line in table[1:]), setting
    png = tmp_path / "headpag-demo.png"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    summary = json.loads((tmp_path / "headpag-demo.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert len(rows) == len(SETTINGS)
    for name in ("layer-pag", "head-pag", "softpag", "hunted"):
        assert rows[name]["fused_ms"] > 0 and rows[name]["eager_ms"] > 0
        assert rows[name]["max_diff"] < 1e-4  # fused == eager
    assert all(0 <= r["score"] <= 1 and 0 <= r["recognised"] <= 1 for r in rows.values())
    assert summary["hunt"]["images_generated"] > 0
