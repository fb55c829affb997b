"""The embedded digits model (headpag.apps.digits): shipped weights, pipeline contract, headpag on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headpag
from headpag.apps.digits import (
    DEFAULT_GUIDANCE_SCALE, TRANSFORMER_CONFIG, WEIGHTS_DIR, DigitObjective, DigitsPipeline, load_classifier,
    load_pipeline, parse_digits,
)
from headpag.archs import call_pattern_of

# Measured with the shipped weights: at the default settings (CFG 2, 20 steps) the classifier recognises 50 of the 50
# samples of test_samples_are_recognised (train.json: 200/200 at CFG 2, 96.5 % at CFG 1 i.e. without guidance);
# chance is 10 %. The classifier's held-out accuracy is 98.9 % (355/359).
MIN_RECOGNITION = 0.9
MIN_CLASSIFIER_ACCURACY = 0.95


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def objective():
    return DigitObjective()


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _json(value):
    """``value`` as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


def test_shipped_files_are_the_loaded_models(pipe):
    """The weights directory holds what the code loads and trains: each config.json is the loaded model's config,
    each safetensors file exactly its state dict, and the transformer was trained with the code's
    TRANSFORMER_CONFIG; within the package's size budget."""
    from safetensors.torch import load_file

    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    for model, folder in ((pipe.transformer, WEIGHTS_DIR / "pipeline" / "transformer"),
                          (load_classifier(), WEIGHTS_DIR / "classifier")):
        config = json.loads((folder / "config.json").read_text())
        assert config["_class_name"] == type(model).__name__
        assert {k: v for k, v in config.items() if not k.startswith("_")} == {
            k: _json(model.config[k]) for k in config if not k.startswith("_")}, folder
        tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
        state = model.state_dict()
        assert tensors.keys() == state.keys(), folder
        for name, tensor in tensors.items():
            assert torch.equal(state[name].to(tensor.dtype), tensor), f"{folder.name}: {name}"
    assert _json({k: pipe.transformer.config[k] for k in TRANSFORMER_CONFIG}) == _json(TRANSFORMER_CONFIG)


def test_pipeline_is_known_to_headpag(pipe):
    assert call_pattern_of(pipe).name == "uncond_cond"
    layers = headpag.list_layers(pipe)
    assert len(layers) == pipe.transformer.config.num_layers and all(l.kind == "joint" for l in layers)
    pipe(1, guidance_scale=1.0, num_inference_steps=1, output_type="pt")
    assert not pipe.do_classifier_free_guidance
    pipe(1, guidance_scale=2.0, num_inference_steps=1, output_type="pt")
    assert pipe.do_classifier_free_guidance and not pipe.guidance_rescale


def test_classifier_accuracy_on_held_out_digits():
    pytest.importorskip("sklearn")
    from headpag.apps.digits.model import load_sklearn_digits

    record = json.loads((WEIGHTS_DIR / "train.json").read_text())
    _, _, x_test, y_test = load_sklearn_digits(seed=record["data"]["split_seed"])
    classifier = load_classifier()
    with torch.no_grad():
        accuracy = (classifier(x_test / 16.0).argmax(1) == y_test).float().mean().item()
    assert accuracy >= MIN_CLASSIFIER_ACCURACY


def test_samples_are_recognised(pipe, objective):
    """Default settings (CFG scale, steps): 10 digits x 5 seeds; chance is 10 %."""
    digits = [d for d in range(10) for _ in range(5)]
    images = pipe(digits, generator=_gens(len(digits), 500), output_type="pt").images
    rate = (objective.predict(images) == torch.tensor(digits)).float().mean().item()
    assert rate >= MIN_RECOGNITION, rate


def test_prompt_forms_outputs_and_generators(pipe):
    kw = dict(num_inference_steps=3, guidance_scale=DEFAULT_GUIDANCE_SCALE)
    a = pipe([3, "7"], generator=_gens(2), output_type="pt", **kw).images
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])
    # one generator per image: an image does not depend on the rest of the batch
    b = pipe("7", generator=_gens(2)[1:], output_type="pt", **kw).images
    assert torch.allclose(a[1:], b, atol=1e-6)
    c = pipe(7, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert isinstance(c, np.ndarray) and c.shape == (2, 8, 8, 3)
    pil = pipe(0, output_type="pil", num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    image, = pipe(0, return_dict=False, output_type="pt", num_inference_steps=2)
    assert image.shape == (1, 3, 8, 8)
    assert parse_digits("5") == [5] and parse_digits([1, "2", np.int64(3)]) == [1, 2, 3]
    for bad in ("12", "x", 10, -1, [], [True], 2.5):
        with pytest.raises(ValueError):
            pipe(bad, num_inference_steps=1)
    with pytest.raises(ValueError, match="generators"):
        pipe([1, 2], generator=_gens(3), num_inference_steps=1)


def test_save_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    again = DigitsPipeline.from_pretrained(str(tmp_path), low_cpu_mem_usage=False)
    again.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt")
    assert torch.equal(pipe(4, generator=_gens(1), **kw).images, again(4, generator=_gens(1), **kw).images)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
@pytest.mark.parametrize("heads,u", [("2:*,3:*", None), ("1:1,2:0,4:3", None), ("2:*", 0.5)])
def test_fused_equals_eager(pipe, guidance_scale, heads, u):
    digits = [0, 4, 8]
    kw = dict(num_inference_steps=5, guidance_scale=guidance_scale, output_type="pt")
    try:
        plain = pipe(digits, generator=_gens(3), **kw).images
        headpag.enable_eager(pipe, heads, scale=3.0, u=u)
        eager = pipe(digits, generator=_gens(3), **kw).images
        headpag.enable_fused(pipe, heads, scale=3.0, u=u)
        fused = pipe(digits, generator=_gens(3), **kw).images
    finally:
        headpag.disable(pipe)
    assert (eager - plain).abs().max() > 1e-3  # PAG changes the samples
    torch.testing.assert_close(fused, eager, atol=2e-5, rtol=0)
    torch.testing.assert_close(pipe(digits, generator=_gens(3), **kw).images, plain, atol=0, rtol=0)


def test_hunt_runs_with_the_classifier_objective(pipe, objective, tmp_path):
    result = headpag.hunt(pipe, objective, ["1", "7"], seeds=[0], k=1, rounds=2, candidates="2:*,3:0", scale=3.0,
                          num_inference_steps=4, batch_size=5, out_dir=tmp_path, verbose=False)
    assert len(result.heads) == 2 and result.images_generated == 5 * 2 + 4 * 2
    assert all(0 <= m <= 1 for r in result.rounds for m in r.means.values())
    assert (tmp_path / "heads.json").exists()
    assert not headpag.is_enabled(pipe)


def test_objective_scores_real_digits():
    pytest.importorskip("sklearn")
    from headpag.apps.digits.model import load_sklearn_digits

    _, _, x_test, y_test = load_sklearn_digits()
    images = (x_test[:40] / 16.0).repeat(1, 3, 1, 1)
    scores = DigitObjective()(images, [str(int(y)) for y in y_test[:40]])
    assert scores.shape == (40,) and scores.mean() > 0.9
    # upscaled images (e.g. 32x32) are pooled back to 8x8
    big = images.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(DigitObjective()(big, [int(y) for y in y_test[:40]]), scores)
