"""The command line on pipelines saved to disk: ``headpag hunt``, then ``headpag atlas`` on its run directory, then
``headpag generate`` with the heads it found; a tiny SD1.5 pipeline with a tiny CLIP text encoder and a tiny CLIP
model as the objective (no hub)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

import tiny_clip
from headpag import HeadSet
from headpag.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    encoder, tok = tiny_clip.text_encoder(root / "tokenizer_files", hidden_size=12)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return str(root / "pipe")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("clip"))[0]


def test_hunt_atlas_generate(model_dir, clip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    run = tmp_path / "run"
    assert main(["hunt", "--model", model_dir, "--prompts", str(prompts), "--objective", "clip", "--objective-model",
                 clip_dir, "--k", "1", "--rounds", "2", "--candidates", "0:*", "--steps", "2", "--seeds", "0", "1",
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

    out = tmp_path / "sample.png"
    assert main(["generate", "--model", model_dir, "--heads", str(run / "heads.json"), "--scale", "3", "--u", "0.5",
                 "--prompt", "a cat", "--steps", "2", "--output", str(out)]) == 0
    assert Image.open(out).size == (16, 16)


def test_help_and_bad_arguments(capsys):
    parser = build_parser()
    for command in ("hunt", "generate", "atlas"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--help"])
        assert exit_.value.code == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["hunt", "--model", "m", "--prompts", "p", "--out", "o", "--strategy", "fastest"])
    assert "invalid choice" in capsys.readouterr().err


def test_missing_model_says_how_to_point_at_a_local_copy(tmp_path):
    with pytest.raises(SystemExit, match="local directory"):
        main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"])


@pytest.mark.parametrize("argv, option", [
    (["demo", "--seeds", "0"], "--seeds"),
    (["demo", "--steps", "-1"], "--steps"),
    (["hunt", "--model", "m", "--prompts", "p", "--out", "o", "--batch-size", "abc"], "--batch-size"),
    (["hunt", "--model", "m", "--prompts", "p", "--out", "o", "--k", "0"], "--k"),
])
def test_counts_must_be_positive(argv, option, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert f"argument {option}: expected an int >= 1" in capsys.readouterr().err
