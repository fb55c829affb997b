"""``headpag bench`` and its suites (headpag.apps.benchmarks): each runs here on tiny settings and is checked against
what it must report; the full-size FLOP section runs in its quick form."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from headpag.apps.benchmarks import guided_step, kernel_sweep, report, roofline, timing
from headpag.apps.cli import main

TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=8, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
                pos_embed_max_size=8, qk_norm=None)
TINY = guided_step.Setting("tiny", TINY_SD3, latent=8, text=4, device="cpu", dtype=torch.float32, rounds=2, warmup=1,
                           label="tiny CPU setting of the tests", project_roofline=True)


# ---- the command ------------------------------------------------------------------------------------------------

def test_quick_report_flops_and_gpu_section(tmp_path):
    result = report.run_report(out_dir=tmp_path, sections=("flops", "gpu"), quick=True)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    markdown = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert data["sections"] == ["flops", "gpu"] and len(data["flops"]["results"]) == len(result["flops"]["results"]) == 2
    assert "fused/minimum" in markdown and "projection" in markdown and data["machine"]["cpu_model"] in markdown
    assert data["date"][:10] in markdown
    for entry in data["flops"]["results"]:
        assert entry["model"] == "SD3-medium"
        ratio = entry["ratios"]["fused/minimum"]
        assert 1.0 - 1e-6 < ratio <= 1.02, (entry["case"], ratio, entry["fused_excess_over_minimum"])
        assert entry["flops"]["fused"] > entry["flops"]["cfg_only"] >= entry["flops"]["plain"] > 0
        assert entry["flops"]["eager"] > entry["flops"]["fused"]
        for variant, projection in entry["roofline_h100_projection"].items():
            assert projection["kind"] == "projection"
            assert projection["seconds"] == pytest.approx(entry["flops"][variant] / 989e12)  # compute-bound
    assert {e["case"] for e in data["flops"]["results"]} == {"cfg_on", "cfg_off"}
    if not torch.cuda.is_available():
        assert data["gpu"] == {"skipped": "skipped: no CUDA device (torch.cuda.is_available() is False)"}
        assert "GPU suites skipped: no CUDA device" in markdown


def test_sections_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sections must be a non-empty subset of flops, cpu, refresh, gpu"):
        report.run_report(out_dir=tmp_path, sections=("flops", "disk"))
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        report.run_report(out_dir=tmp_path, sections=("gpu",), rounds=0)
    assert not list(tmp_path.iterdir())


def test_embed_in_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\nafter\n")
    report.embed_in_readme(readme, "# headpag bench\n\n| a |\n## CPU\n")
    assert readme.read_text() == (f"# x\n\n## Benchmarks\n\n{report.README_BEGIN}\n### headpag bench\n\n| a |\n"
                                  f"#### CPU\n{report.README_END}\n\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="must hold the lines"):
        report.embed_in_readme(readme, "table")
    assert readme.read_text() == "no markers\n"


def test_bench_options_reach_the_report(monkeypatch, capsys):
    """Every documented ``headpag bench`` option arrives in report.main (and the defaults when none is given); bad
    values are refused by the parser, naming the option."""
    calls = []
    monkeypatch.setattr(report, "main", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["bench", "--quick", "--out", "x", "--sections", "flops", "cpu", "--rounds", "3", "--readme", "R.md"]) == 0
    assert main(["bench"]) == 0
    assert calls == [dict(out_dir="x", sections=["flops", "cpu"], quick=True, rounds=3, readme="R.md"),
                     dict(out_dir="bench/results", sections=["flops", "cpu", "refresh", "gpu"], quick=False, rounds=None,
                          readme=None)]
    for bad in (["--sections", "disk"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            main(["bench", *bad])
        assert bad[0] in capsys.readouterr().err
    assert len(calls) == 2


# ---- guided step ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run() -> tuple[dict, dict]:
    """The suite on the tiny setting, and what it measured: ``{contender: (seconds per round, seconds of the paired
    CFG step before each round)}`` as time_contender returned them."""
    measured = {}
    real = guided_step.time_contender

    def spy(name, *args, **kwargs):
        measured[name] = real(name, *args, **kwargs)
        return measured[name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guided_step, "time_contender", spy)
        return guided_step.run(TINY), measured


@pytest.fixture(scope="module")
def tiny_step(tiny_run) -> dict:
    return tiny_run[0]


def test_guided_step_suite(tiny_run):
    r, measured = tiny_run
    assert r["setting"] == "tiny" and r["rounds"] == 2 and set(r["contenders"]) == set(guided_step.CONTENDERS)
    diffs = dict(r["max_abs_diffs"])  # checked before timing: agreeing pairs agree, PAG changes the step
    assert diffs.pop("ref_vs_cfg") == 0
    for key, diff in diffs.items():
        assert diff > guided_step.MIN_PAG_EFFECT if key.endswith("_vs_cfg") else diff <= 1e-4, (key, diff)
    # the reported statistics are those of each contender's own measurements (ms), its ratios taken against the
    # CFG step: the paired one timed just before each of its rounds, and the cfg contender's median
    assert set(measured) == set(r["contenders"])
    cfg_median = statistics.median(measured["cfg"][0])
    for name, c in r["contenders"].items():
        times, paired = measured[name]
        assert c["rounds"] == len(times) == len(paired) == 2
        assert (c["median_ms"], c["min_ms"], c["max_ms"]) == pytest.approx(
            (1e3 * statistics.median(times), 1e3 * min(times), 1e3 * max(times)))
        assert c["paired_ratio_to_cfg"]["median"] == pytest.approx(statistics.median(t / p for t, p in zip(times, paired)))
        assert c["ratio_of_medians_to_cfg"] == pytest.approx(statistics.median(times) / cfg_median)
        assert c["roofline_h100_projection"]["kind"] == "projection"
        assert ("step_peak_mib" in c and c["process_peak_mib"] > 0) or "not_measured" in c
    # fused runs the twins from the fork unit on only; eager and diffusers run whole extra rows
    f = {n: c["flop_ratio_to_cfg"] for n, c in r["contenders"].items()}
    assert 1 < f["fused-heads"] < f["fused-layers"] < f["eager-layers"] == f["diffusers-pag-layers"] == f["eager-heads"] == 1.5


def test_guided_step_bf16_outputs_pass_the_half_precision_check():
    """The GPU settings run in bf16: the same contenders in bf16 (CPU, torch path) agree within its tolerance."""
    setting = guided_step.Setting("tiny-bf16", TINY_SD3, 8, 4, "cpu", torch.bfloat16, 1, 0, "tiny bf16")
    diffs = guided_step.check_outputs(guided_step.outputs(guided_step.build(setting)), torch.bfloat16)
    relative = {k: v for k, v in diffs.items() if k.endswith("_relative")}
    assert len(relative) == len(guided_step.AGREE) and max(relative.values()) <= guided_step.RELATIVE_TOLERANCE[torch.bfloat16]


def test_guided_step_checks_refuse_wrong_outputs():
    base = torch.zeros(1, 4, 2, 2)
    good = {name: base + (0 if name == "cfg" else 1.0) for name in guided_step.CONTENDERS}
    good["ref"] = base.clone()
    assert guided_step.check_outputs(good, torch.float32)["fused-heads_vs_eager-heads"] == 0
    with pytest.raises(AssertionError, match="fused-heads vs eager-heads"):
        guided_step.check_outputs(dict(good, **{"eager-heads": base + 1.1}), torch.float32)
    with pytest.raises(AssertionError, match="PAG did nothing"):
        guided_step.check_outputs(dict(good, **{"fused-heads": base, "eager-heads": base}), torch.float32)
    with pytest.raises(AssertionError, match="paired copy"):
        guided_step.check_outputs(dict(good, ref=base + 1e-3), torch.float32)
    half = {k: v.bfloat16() for k, v in good.items()}
    assert guided_step.check_outputs(half, torch.bfloat16)["fused-heads_vs_eager-heads_relative"] == 0
    with pytest.raises(AssertionError, match="fused-layers vs eager-layers: relative error"):
        guided_step.check_outputs(dict(half, **{"eager-layers": (base + 1.1).bfloat16()}), torch.bfloat16)


def test_setting_json_round_trip_and_cuda_skip():
    assert guided_step.Setting.from_json(TINY.to_json()) == TINY
    if not torch.cuda.is_available():
        assert guided_step.run("cuda-sd3-medium") == dict(
            setting="cuda-sd3-medium", skipped="skipped: no CUDA device (torch.cuda.is_available() is False)")
        assert report.gpu_section()["skipped"].startswith("skipped: no CUDA device")


def test_markdown_puts_projection_next_to_measured_gpu_step(tiny_step):
    kernel = dict(group="cuda plain N=1024 D=64 float16", impl="triton", baseline="sdpa", device="cuda", median_ms=0.1,
                  min_ms=0.09, max_ms=0.2, ratio_to_sdpa=1.1, tflop_per_s=150.0, peak_mem_over_inputs_mib=3.0)
    gpu = dict(gpu="Test GPU", kernels=dict(device="cuda", results=[kernel], skipped_impls=[]), guided_step={"tiny": tiny_step})
    text = report.markdown(dict(date="2026-01-01T00:00:00+00:00", machine=dict(
        cpu_model="cpu", cpu_count=2, torch_threads=2, gpu="Test GPU", torch="t", triton="x", diffusers="d",
        load_average=[0.5]), headpag=dict(commit="abc"), seconds=1.0, gpu=gpu))
    assert "GPU: Test GPU." in text and "H100 ms (projection)" in text
    assert "| cuda plain N=1024 D=64 float16 | triton | 0.100 | 0.090-0.200 | 1.10x sdpa | 150.0 TFLOP/s | 3 |" in text
    cfg_row = next(line for line in text.splitlines() if line.startswith("| cfg:"))
    projected = tiny_step["contenders"]["cfg"]["roofline_h100_projection"]["ms"]
    assert cfg_row.rstrip(" |").endswith(f"{projected:.1f}")


# ---- kernel sweep -----------------------------------------------------------------------------------------------

def test_kernel_sweep_runs_triton_and_torch_against_the_oracle(monkeypatch):
    cases = [kernel_sweep.Case(c, "cpu", 1, 2, 24, 16, torch.float32, ("sdpa", "torch", "triton", "reference"), n_text=5)
             for c in kernel_sweep.CASES]
    measured = []  # seconds per call of every timed benchmark, in the order they ran

    def spy(*args, **kwargs):
        measured.append(real(*args, **kwargs))
        return measured[-1]

    real = timing.time_rounds
    monkeypatch.setattr(timing, "time_rounds", spy)
    result = kernel_sweep.run("cpu", cases, rounds=1)
    assert result["skipped_impls"] == [] and len(result["results"]) == len(measured) == 4 * 4
    # each record's median is its own measurement, its ratio taken against the sdpa measurement of its case
    medians = {(r["group"], r["impl"]): statistics.median(t) for r, t in zip(result["results"], measured)}
    for r in result["results"]:
        assert r["median_ms"] == pytest.approx(1e3 * medians[r["group"], r["impl"]])
        assert r[f"ratio_to_{r['baseline']}"] == pytest.approx(medians[r["group"], r["impl"]] / medians[r["group"], "sdpa"])
        if r["impl"] in ("torch", "triton"):
            assert r["max_abs_diff_vs_reference"] <= 1e-4
        if r["case"] == "identity" and r["impl"] in ("torch", "triton"):
            assert "tflop_per_s" not in r  # joint identity does no attention FLOPs
    if not torch.cuda.is_available():
        assert kernel_sweep.run("cuda")["skipped"].startswith("skipped: no CUDA device")


def test_kernel_sweep_check_refuses_a_wrong_result(monkeypatch):
    case = kernel_sweep.Case("soft", "cpu", 1, 2, 16, 8, torch.float32, ("sdpa", "torch"))
    q, k, v = kernel_sweep.inputs(case)
    assert kernel_sweep.check(case, "torch", q, k, v) <= 1e-5
    with pytest.raises(ValueError, match="impl must be one of"):
        kernel_sweep.op(case, "cuda-magic", q, k, v)
    monkeypatch.setattr(kernel_sweep, "op", lambda case, impl, q, k, v: v.clone)  # the identity: wrong for SoftPAG
    with pytest.raises(AssertionError, match="cpu soft N=16"):
        kernel_sweep.check(case, "torch", q, k, v)


def test_cuda_cases_cover_the_kernel_sweep():
    cases = kernel_sweep.cuda_cases()
    assert {(c.N, c.D, c.dtype) for c in cases} == {(n, d, t) for n in (1024, 4096, 16384) for d in (64, 128)
                                                     for t in (torch.float16, torch.bfloat16)}
    assert {c.case for c in cases} == set(kernel_sweep.CASES) and all(c.impls[-1] == "triton" for c in cases)
    assert all(c.baseline == ("copy" if c.case == "identity" else "sdpa") for c in cases)


# ---- timing and roofline ----------------------------------------------------------------------------------------

def test_time_rounds_measures_a_known_cost():
    """Rounds of a 20 ms sleep time 20 ms per call (the scheduler may add a little, never take any away); the
    untimed setup (a 200 ms sleep) and warm-up rounds are not counted."""
    times = timing.time_rounds(lambda: time.sleep(0.02), rounds=3, warmup=1, setup=lambda: time.sleep(0.2),
                               calls_per_round=2)
    assert len(times) == 3 and all(0.02 <= t < 0.1 for t in times), times
    s = timing.summary(times)
    assert s["min_ms"] >= 20 and s["max_ms"] < 100


def test_time_rounds_calls_and_summary():
    calls, setups, syncs = [], [], []
    times = timing.time_rounds(lambda: calls.append(1), rounds=4, warmup=2, setup=lambda: setups.append(1),
                               sync=lambda: syncs.append(1), calls_per_round=3)
    assert len(times) == 4 and len(calls) == 6 * 3 and len(setups) == 6 and len(syncs) == 12
    s = timing.summary([0.004, 0.001, 0.003, 0.002])
    assert s["median_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1) and s["max_ms"] == pytest.approx(4)
    assert s["iqr_ms"] == pytest.approx((statistics.quantiles([1, 2, 3, 4], n=4, method="inclusive")[2] - 1.75))
    assert s["spread"] == pytest.approx(3 / 2.5)
    assert timing.ratio_summary([1.5, 1.0, 2.0]) == dict(median=1.5, min=1.0, max=2.0)
    for bad in (dict(rounds=0), dict(rounds=1, warmup=-1), dict(rounds=1, calls_per_round=0)):
        with pytest.raises(ValueError, match="rounds >= 1"):
            timing.time_rounds(lambda: None, **bad)
    with pytest.raises(ValueError, match="at least one"):
        timing.summary([])


def test_roofline_projection():
    p = roofline.project(989e12, 1_000_000)
    assert p["kind"] == "projection" and p["bound"] == "compute" and p["seconds"] == pytest.approx(1.0)
    m = roofline.project(1e9, 3.35e12)  # 6.7e12 bytes of bf16 weights at 3.35e12 B/s
    assert m["bound"] == "memory" and m["seconds"] == pytest.approx(2.0) and m["ms"] == pytest.approx(2000)
    with pytest.raises(ValueError, match="flops and parameters must be >= 0"):
        roofline.project(-1, 1)


def test_a_failing_section_is_reported_and_fails_the_command(tmp_path, monkeypatch, capsys):
    def broken(quick=False):
        raise AssertionError("fused vs eager: mismatch")

    monkeypatch.setattr(report.full_size, "run", broken)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\nold\n{report.README_END}\n")
    assert report.main(out_dir=tmp_path, sections=("flops", "gpu"), readme=readme) == 1
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert data["failed_sections"] == ["flops"] and data["flops"] == {"error": "AssertionError: fused vs eager: mismatch"}
    assert "gpu" in data and "error" not in data["gpu"]
    assert "**Section flops failed**: AssertionError: fused vs eager: mismatch" in (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "old" in readme.read_text() and "failed sections: flops" in capsys.readouterr().out


def test_a_failing_gpu_setting_keeps_the_rest_of_the_gpu_section(monkeypatch, tiny_step):
    kernels = dict(device="cuda", gpu="Test GPU", threads=1, results=[], skipped_impls=[])
    monkeypatch.setattr(report.kernel_sweep, "run", lambda device, rounds=None: kernels)

    def run(name, rounds=None):
        if name == "cuda-sd3-medium":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return tiny_step

    monkeypatch.setattr(report.guided_step, "run", run)
    section = report.gpu_section()
    assert section["kernels"] is kernels and section["guided_step"]["cuda-small"] is tiny_step
    assert section["guided_step"]["cuda-sd3-medium"] == dict(setting="cuda-sd3-medium", error="OutOfMemoryError: CUDA out of memory")
    text = "\n".join(report.step_table(section["guided_step"]["cuda-sd3-medium"], "Guided step, cuda-sd3-medium"))
    assert "**Failed**: OutOfMemoryError: CUDA out of memory" in text


def test_flux_true_cfg_counts_a_cond_and_an_uncond_call():
    """Flux with true CFG: CFG only is two 1-row calls; the twin row rides on the cond call only."""
    from headpag.apps.benchmarks import meta_flops

    config = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))
    pipe = meta_flops.flux_pipe(config)
    call = lambda p, rows: meta_flops.flux_true_cfg_call(p, rows, latent=8, n_text=8)  # noqa: E731
    single = lambda p, rows: meta_flops.flux_call(p, rows, latent=8, n_text=8)  # noqa: E731
    true_cfg = meta_flops.analyse("tiny flux", pipe, call, 2, "1:0,2:1", 16 + 8)
    distilled = meta_flops.analyse("tiny flux", pipe, single, 1, "1:0,2:1", 16 + 8)
    f, d = true_cfg["flops"], distilled["flops"]
    assert f["cfg_only"] == 2 * d["cfg_only"]
    assert f["eager"] - f["cfg_only"] == d["eager"] - d["cfg_only"] == d["cfg_only"]  # one extra full row
    assert f["fused"] - f["cfg_only"] == d["fused"] - d["cfg_only"]  # the same twin, forked at the same unit
    assert 1 <= true_cfg["ratios"]["fused/minimum"] <= 1.02 and f["fused"] < f["eager"]
    with pytest.raises(ValueError, match="rows must be 1 or 2"):
        meta_flops.flux_true_cfg_call(pipe, 3)


def test_suite_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="setting must be a Setting or one of cpu, cuda-small, cuda-sd3-medium"):
        guided_step.run("gpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        kernel_sweep.run("tpu")
    with pytest.raises(ValueError, match="readme must be an existing Markdown file"):
        report.main(out_dir=tmp_path, sections=("gpu",), readme=tmp_path / "missing.md")
    unmarked = tmp_path / "README.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(ValueError, match="must hold the lines"):
        report.main(out_dir=tmp_path, sections=("gpu",), readme=unmarked)
    assert not (tmp_path / report.JSON_NAME).exists()  # refused before anything ran


def test_separate_cfg_calls_of_qwen_image_and_wan_twin_the_cond_call_only():
    """Qwen-Image (true CFG) and Wan (CFG): per step a 1-row cond call under cache_context("cond") and a 1-row
    uncond call under cache_context("uncond"); the twin rides on the cond call only, as with CFG off. FLUX.2-dev:
    one cond call (distilled guidance) without a cache context, twinned."""
    from headpag.apps.benchmarks import meta_flops

    qwen = meta_flops.qwen_pipe(dict(meta_flops.QWEN_IMAGE, in_channels=16, out_channels=4, num_layers=3,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     axes_dims_rope=(4, 6, 6)))
    wan = meta_flops.wan_pipe(dict(meta_flops.WAN_T2V_14B, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                   out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=3,
                                   rope_max_seq_len=32))
    cases = [(qwen, lambda p, rows: meta_flops.qwen_true_cfg_call(p, rows, side=4, n_text=8), 16 + 8),
             (wan, lambda p, rows: meta_flops.wan_cfg_call(p, rows, frames=2, height=4, width=4, n_text=8), 2 * 2 * 2)]
    for pipe, call, tokens in cases:
        cfg = meta_flops.analyse("tiny", pipe, call, 2, "1:0,2:1", tokens)
        off = meta_flops.analyse("tiny", pipe, call, 1, "1:0,2:1", tokens)
        f, d = cfg["flops"], off["flops"]
        assert f["cfg_only"] == 2 * d["cfg_only"] and cfg["fork_unit"] == off["fork_unit"]
        assert f["eager"] - f["cfg_only"] == d["eager"] - d["cfg_only"] == d["cfg_only"]  # one extra full row
        assert f["fused"] - f["cfg_only"] == d["fused"] - d["cfg_only"] > 0  # one twin, on the cond call
        assert f["fused"] < f["eager"] and f["minimum"] <= f["fused"]
        with pytest.raises(ValueError, match="rows must be 1 or 2"):
            call(pipe, 3)
    flux2 = meta_flops.flux2_pipe(dict(meta_flops.FLUX2_DEV, in_channels=16, num_layers=1, num_single_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)))
    d = meta_flops.analyse("tiny", flux2, lambda p, rows: meta_flops.flux2_call(p, rows, side=4, n_text=8), 1,
                           "1:0,2:1", 16 + 8)["flops"]
    assert d["eager"] == 2 * d["cfg_only"] and d["cfg_only"] < d["minimum"] <= d["fused"] < d["eager"]


def test_full_size_section_covers_flux2_qwen_image_and_wan():
    """FLUX.2-dev, Qwen-Image and Wan 2.1 T2V-14B are in the FLOP section with their classes' default configs (the
    released checkpoints' sizes) at native resolution, every head set valid; one full-size count each (paper-like
    heads, one base row) puts fused within 2% of the minimum."""
    import inspect

    from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel

    from headpag import list_layers
    from headpag.apps.benchmarks import full_size, meta_flops

    for config, cls in ((meta_flops.FLUX2_DEV, Flux2Transformer2DModel),
                        (meta_flops.QWEN_IMAGE, QwenImageTransformer2DModel),
                        (meta_flops.WAN_T2V_14B, WanTransformer3DModel)):
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        assert config == defaults, cls.__name__
    models = {m[0]: m for m in full_size.models()}
    expected = {"FLUX.2-dev": (4096 + 512, {"distilled"}, (56, 48)), "Qwen-Image": (83 * 83 + 256, {"true_cfg", "cfg_off"}, (60, 24)),
                "Wan2.1-T2V-14B": (21 * 30 * 52, {"cfg_on", "cfg_off"}, (40, 40))}
    for name, (tokens, cases, (n_layers, n_heads)) in expected.items():
        _, make_pipe, call, _, model_cases, _, n_tokens = models[name]
        assert n_tokens == tokens and set(model_cases) == cases
        pipe = make_pipe()
        layers = list_layers(pipe)
        assert len(layers) == n_layers and {layer.heads for layer in layers} == {n_heads}
        assert {layer.head_dim for layer in layers} == {128}
        sets = {k: full_size._expand(v, layers) for k, v in full_size.HEAD_SETS[name].items()}
        assert len(sets["early"].split(",")) == n_heads and len(sets["paper-like"].split(",")) == 24
        result = meta_flops.analyse(name, pipe, call, 1, sets["paper-like"], n_tokens)
        f = result["flops"]
        assert 1.0 <= result["ratios"]["fused/minimum"] <= 1.02, (name, result["fused_excess_over_minimum"])
        assert f["cfg_only"] < f["minimum"] <= f["fused"] < f["eager"] == 2 * f["cfg_only"]


# ---- --quick and the output (issue 15) -----------------------------------------------------------------------------

def test_quick_cpu_section_runs_the_small_setting_and_the_n256_kernels(monkeypatch):
    """``--quick`` is a smoke test: the CPU section gets QUICK_CPU (8x8 latent, 2 rounds) and the N=256 kernel
    cases, not the full setting."""
    seen = {}
    monkeypatch.setattr(guided_step, "run", lambda setting, rounds=None: seen.setdefault("step", (setting, rounds)))
    monkeypatch.setattr(kernel_sweep, "run", lambda device, cases=None, rounds=None:
                        seen.setdefault("kernels", (device, cases, rounds)))
    report.cpu_section(quick=True)
    setting, rounds = seen["step"]
    assert setting is report.QUICK_CPU and rounds is None
    assert setting.image_tokens == 16 and setting.rounds == 2 and setting.model == guided_step.SETTINGS["cpu"].model
    device, cases, rounds = seen["kernels"]
    assert device == "cpu" and rounds == report.QUICK_KERNEL_ROUNDS
    assert cases and {c.N for c in cases} == {256} and len(cases) == len(kernel_sweep.cpu_cases()) // 2
    seen.clear()
    report.cpu_section(quick=False)
    assert seen["step"] == ("cpu", None) and seen["kernels"] == ("cpu", None, None)


def test_bench_prints_where_its_results_go(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report.main(sections=("gpu",)) == 0
    out = capsys.readouterr().out
    assert f"results go to {tmp_path / 'bench' / 'results'}" in out
    assert (tmp_path / "bench" / "results" / report.JSON_NAME).is_file()


def test_no_torchvision_notice_from_the_pipeline_imports():
    """Without torchvision, transformers logs a notice when diffusers' IP-Adapter loader imports CLIPImageProcessor;
    the report binds the Pil classes first (what the notice advises), so importing the pipelines prints nothing."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers prints no notice")
    bind = "from headpag.apps.benchmarks.machine import use_pil_image_processors; use_pil_image_processors(); "
    for prefix, expect_notice in (("", True), (bind, False)):
        snippet = prefix + "from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, FluxPipeline"
        proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
        assert ("requires torchvision" in proc.stderr) is expect_notice, proc.stderr


def test_quick_refresh_section(tmp_path):
    """``refresh``: the run FLOPs of SD3-medium (refresh 2 below refresh 1, a schedule of whole steps), the CPU runs of
    every contender, the digits rows; all in report.md."""
    result = report.run_report(out_dir=tmp_path, sections=("refresh",), quick=True)
    assert result["failed_sections"] == []
    section = result["refresh"]
    (sd3,) = section["flops"]["results"]
    whole = sd3["run_ratio"]["whole run"]
    assert whole["1"] == pytest.approx(sd3["step_ratio"]) and 1.0 < whole["4"] < whole["2"] < whole["1"]
    assert set(section["cpu"]["seconds"]) == {"cfg only", "diffusers PAG (blocks 4, 6)", "fused refresh=1",
                                              "fused refresh=2", "fused refresh=4"}
    assert [r["refresh"] for r in section["digits"]["rows"]] == [1, 2, 3, 4]
    text = (tmp_path / "report.md").read_text()
    assert "## Reusing the guidance difference (refresh=k)" in text and "| SD3-medium (cfg_on) |" in text
