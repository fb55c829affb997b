"""``headpag bench``: the quick report (SD3-medium, one head set, meta device) and the CLI entry."""

from __future__ import annotations

import json

import pytest

from headpag.bench import run_report
from headpag.cli import build_parser


def test_quick_report(tmp_path):
    report = run_report(out_dir=tmp_path, quick=True)
    data = json.loads((tmp_path / "headpag-bench.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    assert data["results"] and len(data["results"]) == len(report["results"])
    assert "fused/minimum" in markdown and "projection" in markdown
    assert data["gpu"]
    for entry in data["results"]:
        assert entry["model"] == "SD3-medium"
        ratio = entry["ratios"]["fused/minimum"]
        assert 1.0 - 1e-6 < ratio <= 1.02, (entry["case"], ratio, entry["fused_excess_over_minimum"])
        assert entry["flops"]["fused"] > entry["flops"]["cfg_only"] >= entry["flops"]["plain"] > 0
        roofline = entry["roofline_h100_projection"]
        for variant in ("cfg_only", "eager", "fused", "minimum"):
            assert roofline[variant]["kind"] == "projection"
            assert roofline[variant]["seconds"] > 0 and roofline[variant]["weights_read_s"] > 0
    assert {e["case"] for e in data["results"]} == {"cfg_on", "cfg_off"}


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out
    args = build_parser().parse_args(["bench", "--quick", "--out", "x"])
    assert args.quick and args.out == "x" and args.func.__name__ == "cmd_bench"


def test_missing_bench_dir(tmp_path, monkeypatch):
    import headpag.bench as bench

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "headpag" / "bench.py"))
    with pytest.raises(RuntimeError, match="bench/"):
        bench.bench_dir()
