"""The command line on pipelines saved to disk: ``headpag hunt``, then ``headpag atlas`` on its run directory, then
``headpag generate`` with the heads it found; a tiny SD1.5 pipeline with a tiny CLIP text encoder and a tiny CLIP
model as the objective (no hub)."""

from __future__ import annotations

import json
import types

import pytest
from diffusers import DDIMScheduler
from PIL import Image

import headpag.search
import headpag.search.objectives
from headpag import HeadSet
from headpag.apps import cli
from headpag.apps.cli import build_parser, main
from headpag.guided import api
from support import models, tiny_clip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The SD1.5 pipeline of tests/support/models.py in small (8/16 channels, one layer per block, 2 heads) with a
    tiny CLIP text encoder, saved to disk."""
    root = tmp_path_factory.mktemp("sd15")
    encoder, tok = tiny_clip.text_encoder(root / "tokenizer_files", hidden_size=12)
    pipe = models.sd15(text_encoder=encoder, tokenizer=tok, scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False),
                       layers_per_block=1, block_out_channels=(8, 16), attention_head_dim=2)
    pipe.save_pretrained(root / "pipe")
    return str(root / "pipe")


def test_hunt_atlas_generate(model_dir, tiny_clip_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    run = tmp_path / "run"
    assert main(["hunt", "--model", model_dir, "--prompts", str(prompts), "--objective", "clip", "--objective-model",
                 tiny_clip_dirs[0], "--k", "1", "--rounds", "2", "--candidates", "0:*", "--steps", "2", "--seeds", "0", "1",
                 "--out", str(run), "--quiet"]) == 0
    assert "selected heads:" in capsys.readouterr().out
    heads = HeadSet.load(run / "heads.json")
    assert len(heads) == 2 and heads.layers() == [0]
    settings = json.loads((run / "settings.json").read_text())
    assert settings["prompts"] == ["a cat", "a dog"] and settings["seeds"] == [0, 1]
    records = [json.loads(line) for line in (run / "records-rank0.jsonl").read_text().splitlines()]
    assert len(records) == 2 + 1  # both heads of layer 0 in round 1, the remaining one in round 2

    assert main(["atlas", str(run)]) == 0
    for name in ("atlas.png", "heatmap.png"):
        assert Image.open(run / name).size[0] > 100
    thumbs_only = Image.open(run / "atlas.png").size
    # With the run's model: every head generated again on the 2 prompts x 2 seeds (a tile of 4 images each).
    assert main(["atlas", str(run), "--model", model_dir]) == 0
    assert Image.open(run / "atlas.png").size != thumbs_only
    assert main(["atlas", str(run), "--model", "digits"]) == 2  # not the run's model
    assert "not the one the search ran on" in capsys.readouterr().err

    out = tmp_path / "sample.png"
    assert main(["generate", "--model", model_dir, "--heads", str(run / "heads.json"), "--scale", "3", "--u", "0.5",
                 "--prompt", "a cat", "--steps", "2", "--output", str(out)]) == 0
    assert Image.open(out).size == (256, 256)  # 16 x 16 upscaled nearest-neighbour to a viewable size


@pytest.fixture(scope="module")
def digits_transformer():
    """A registered denoiser (SD3Transformer2DModel, 6 layers x 4 heads) for the pipeline stand-ins: the command
    line checks head options against the loaded model."""
    from headpag.apps.digits import load_pipeline

    return load_pipeline().transformer


def test_hunt_options_reach_the_search(monkeypatch, tmp_path, capsys, digits_transformer):
    """Every documented ``headpag hunt`` option arrives where it configures something: the pipeline loader, the
    objective factory or ``hunt`` itself."""
    calls = []
    PIPE = types.SimpleNamespace(transformer=digits_transformer)
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: calls.append(("load", *args)) or PIPE)
    monkeypatch.setattr(headpag.search.objectives, "get_objective",
                        lambda name, **kwargs: calls.append(("objective", name, kwargs)) or "OBJECTIVE")

    def fake_hunt(pipe, objective, prompts, **kwargs):
        calls.append(("hunt", pipe, objective, prompts, kwargs))
        return types.SimpleNamespace(heads=HeadSet("0:0"), images_generated=0, timings={"total": 0.0})

    monkeypatch.setattr(headpag.search, "hunt", fake_hunt)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(" a cat \n\na dog\n")
    init = tmp_path / "init.json"
    HeadSet("1:0@0.5").save(init)
    assert main(["hunt", "--model", "MODEL", "--device", "cpu", "--dtype", "bfloat16", "--steps", "7", "--scale", "2.5",
                 "--mode", "image", "--guidance-scale", "1.5", "--prompts", str(prompts), "--objective", "clip",
                 "--objective-model", "OM", "--objective-processor", "OP", "--k", "2", "--rounds", "3", "--seeds", "3",
                 "4", "--u", "0.5", "--candidates", "0:*,2:1", "--init", str(init), "--batch-size", "5",
                 "--strategy", "halving", "--refresh", "2", "--out", str(tmp_path / "OUT"), "--quiet"]) == 0
    assert calls == [  # the objective first: a missing objective model fails before the pipeline loads
        ("objective", "clip", dict(model="OM", processor="OP")),
        ("load", "MODEL", "cpu", "bfloat16"),
        ("hunt", PIPE, "OBJECTIVE", ["a cat", "a dog"], dict(
            seeds=[3, 4], k=2, rounds=3, candidates=HeadSet("0:*,2:1"), init=HeadSet("1:0@0.5"), scale=2.5, u=0.5,
            mode="image", guidance_scale=1.5, num_inference_steps=7, out_dir=str(tmp_path / "OUT"), batch_size=5,
            strategy="halving", verbose=False, refresh=2)),
    ]
    assert "selected heads: 0:0" in capsys.readouterr().out


@pytest.mark.parametrize("scale", [2.5, 0.0])
def test_generate_options_reach_the_pipeline(monkeypatch, tmp_path, scale, digits_transformer):
    """``headpag generate``: the loader gets --model/--device/--dtype, enable_fused the heads (a heads.json),
    --scale (0 too: the API checks it and runs the plain pipeline), --u, --mode, --adaptive-scale and --refresh, the pipeline
    call --prompt, --steps, --guidance-scale, --guidance-rescale and --seed; the image goes to --output and the
    pipeline is disabled after the call."""
    events = []
    monkeypatch.setattr(api, "enable", lambda pipe, heads, *, execution, scale, u, mode, interval, adaptive_scale,
                        refresh, **defaults: events.append(("enable", pipe, heads, scale, u, mode, execution,
                                                            adaptive_scale, refresh)))
    monkeypatch.setattr(api, "detach", lambda pipe: events.append(("disable", pipe)))

    class FakePipe:
        transformer = digits_transformer

        def __call__(self, prompt, **kwargs):
            events.append(("call", prompt, kwargs["num_inference_steps"], kwargs["guidance_scale"],
                           kwargs["guidance_rescale"], kwargs["generator"].initial_seed()))
            return types.SimpleNamespace(images=[Image.new("RGB", (5, 3), (255, 0, 0))])

    pipe = FakePipe()
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: events.append(("load", *args)) or pipe)
    heads = tmp_path / "heads.json"
    HeadSet("1:0,2:1@0.5").save(heads)
    out = tmp_path / "out.png"
    assert main(["generate", "--model", "MODEL", "--device", "cpu", "--dtype", "float16", "--heads", str(heads),
                 "--scale", str(scale), "--u", "0.25", "--mode", "image", "--steps", "7", "--guidance-scale", "1.5",
                 "--adaptive-scale", "0.01", "--guidance-rescale", "0.7", "--seed", "11", "--prompt", "a cat",
                 "--refresh", "3", "--output", str(out)]) == 0
    enabled = ("enable", pipe, HeadSet("1:0,2:1@0.5"), scale, 0.25, "image", "fused", 0.01, 3)
    assert events == [("load", "MODEL", "cpu", "float16"), enabled, ("call", "a cat", 7, 1.5, 0.7, 11),
                      ("disable", pipe)]
    assert Image.open(out).size == (5 * 86, 3 * 86)  # upscaled: the shorter side to >= 256


def test_missing_model_says_how_to_point_at_a_local_copy(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "local directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["demo", "--seeds", "0"], "--seeds"),
    (["demo", "--steps", "-1"], "--steps"),
    (["hunt", "--model", "m", "--prompts", "p", "--out", "o", "--batch-size", "abc"], "--batch-size"),
    (["hunt", "--model", "m", "--prompts", "p", "--out", "o", "--k", "0"], "--k"),
    (["hunt", "--model", "m", "--prompts", "p", "--out", "o", "--refresh", "0"], "--refresh"),
    (["generate", "--model", "m", "--prompt", "p", "--refresh", "1.5"], "--refresh"),
])
def test_counts_must_be_positive(argv, option, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert f"argument {option}: expected an int >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("heads, message", [("99:0", "layer 99"), ("0:5", "head 5")])
def test_head_ranges_are_checked_before_the_model_loads(model_dir, heads, message, monkeypatch, tmp_path, capsys):
    """The denoiser is built from the saved pipeline's config on the meta device: a head out of range is refused
    without loading the weights (the loader here fails the test if called)."""
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    assert main(["generate", "--model", model_dir, "--heads", heads, "--prompt", "x",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    assert main(["hunt", "--model", model_dir, "--candidates", heads, "--prompts", str(prompts), "--objective", "clip",
                 "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
