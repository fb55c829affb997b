"""``headpag demo`` end to end on its quick setting."""

from __future__ import annotations

import json

import pytest

from headpag.apps.cli import main

SETTINGS = ("none", "cfg s=", "layer-pag", "head-pag", "softpag", "hunted", "hunted refresh=2", "hunted refresh=3",
            "hunted refresh=4")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Configured(Exception):
    """Raised by the stand-in for run_demo, carrying the configuration it was given."""


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_demo_options_reach_the_configuration(monkeypatch, quick):
    """Every documented ``headpag demo`` option ends up in the DemoConfig that run_demo gets; options not given
    keep the defaults (of --quick when given, explicit options still overriding them)."""
    from headpag.apps import demo

    def fake_run_demo(config, log=print):
        raise _Configured(config)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    given = dict(seeds=3, steps=5, scale=2.5, u=0.25, layers="1,4", heads="0:1,5:3", mode="image", guidance_scale=1.5,
                 cfg=3.5, hunt_rounds=4, hunt_k=3, hunt_seeds=6, threads=0, out="OUT")
    argv = ["demo", "--debug", *(["--quick"] if quick else [])]  # --debug: main raises what run_demo raised
    for name, value in given.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    with pytest.raises(_Configured) as got:
        main(argv)
    assert got.value.args[0] == demo.DemoConfig(**given, timing_repeats=1 if quick else 5)

    with pytest.raises(_Configured) as got:
        main(["demo", "--debug", *(["--quick"] if quick else []), "--steps", "9"])
    assert got.value.args[0] == (demo.DemoConfig.quick(steps=9) if quick else demo.DemoConfig(steps=9))
    assert got.value.args[0].seeds == (2 if quick else 8)


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
    for name in ("layer-pag", "head-pag", "softpag", "hunted", "hunted refresh=2"):
        assert rows[name]["fused_ms"] > 0 and rows[name]["eager_ms"] > 0
        assert rows[name]["max_diff"] < 1e-4  # fused == eager
    assert rows["hunted"]["relative_l2"] is None
    assert all(rows[f"hunted refresh={k}"]["relative_l2"] > 0 for k in (2, 3, 4))  # reuse changes the samples
    assert all(0 <= r["score"] <= 1 and 0 <= r["recognised"] <= 1 for r in rows.values())
    assert summary["hunt"]["images_generated"] > 0
