"""headpag.search.objectives on a tiny random CLIP saved to disk (no hub, no network, CPU).

The model and processor come from the ``tiny_clip_dirs`` fixture (tests/conftest.py, built by
tests/support/tiny_clip.py): a CLIPImageProcessor resizing to 32 x 32 and a byte-level CLIPTokenizer.
"""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPModel  # noqa: E402

from headpag.search.objectives import (  # noqa: E402
    ClipScore, ObjectiveLoadError, PickScore, Weighted, check_scores, get_objective,
)

PROMPTS = ["a photo of a cat", "a red car on a road", "an astronaut riding a horse, oil painting", "x"]


@pytest.fixture(scope="module")
def pick(tiny_clip_dirs):
    return PickScore(model=tiny_clip_dirs[0], processor=tiny_clip_dirs[1], device="cpu")


@pytest.fixture(scope="module")
def clip(tiny_clip_dirs):
    return ClipScore(model=tiny_clip_dirs[0], device="cpu")


@pytest.fixture(scope="module")
def images():
    """4 non-square images (the processor must resize and crop them to 32 x 32)."""
    return torch.rand(4, 3, 40, 56, generator=torch.Generator().manual_seed(1))


def _reference_embeddings(model_dir, processor_dir, images, prompts):
    """Normalised image/text embeddings computed independently of headpag: channels-last numpy images through the
    image processor, tokens padded to 77, features via get_image_features / get_text_features."""
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(processor_dir)
    arrays = [img.permute(1, 2, 0).numpy() for img in images]
    pixels = processor.image_processor(images=arrays, do_rescale=False, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (len(images), 3, 32, 32)
    tokens = processor.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return model, img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def test_pickscore_matches_formula(pick, tiny_clip_dirs, images):
    scores = pick(images, PROMPTS)
    assert isinstance(scores, torch.Tensor) and scores.shape == (4,) and torch.isfinite(scores).all()
    model, img, txt = _reference_embeddings(*tiny_clip_dirs, images, PROMPTS)
    expected = model.logit_scale.exp().detach() * (img @ txt.T).diagonal()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_clipscore_matches_formula(clip, tiny_clip_dirs, images):
    scores = clip(images, PROMPTS)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and (scores >= 0).all()
    _, img, txt = _reference_embeddings(tiny_clip_dirs[0], tiny_clip_dirs[0], images, PROMPTS)
    expected = 100 * (img * txt).sum(-1).clamp(min=0)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["pick", "clip"])
def test_deterministic_and_batch_independent(request, name, images):
    objective = request.getfixturevalue(name)
    together = objective(images, PROMPTS)
    assert torch.equal(together, objective(images, PROMPTS))
    one_by_one = torch.cat([objective(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(PROMPTS))])
    # 1e-5 relative: float32 matmuls differ by batch size in the last bits, and ClipScore is 100 * cos.
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=1e-5)


def test_input_validation(pick, images):
    with pytest.raises(ValueError, match="4 strings"):
        pick(images, PROMPTS[:3])
    with pytest.raises(ValueError, match="single string"):
        pick(images[:1], "a cat")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pick(images[0], PROMPTS[:1])


def test_weighted_is_weighted_sum(pick, clip, images):
    a, b = pick(images, PROMPTS).double(), clip(images, PROMPTS).double()
    combined = Weighted([(0.5, pick), (2.0, clip)])(images, PROMPTS)
    assert combined.dtype == torch.float64 and combined.shape == (4,)
    torch.testing.assert_close(combined, 0.5 * a + 2.0 * b)

    def lengths(imgs, prompts):  # a plain callable returning a list
        return [float(len(p)) for p in prompts]

    named = Weighted({"pick": (1.0, pick), "len": (-0.25, lengths)})
    assert [n for n, _, _ in named.terms] == ["pick", "len"]
    expected = a - 0.25 * torch.tensor([len(p) for p in PROMPTS], dtype=torch.float64)
    torch.testing.assert_close(named(images, PROMPTS), expected)
    with pytest.raises(ValueError):
        Weighted([])


def test_get_objective(tiny_clip_dirs):
    model_dir, processor_dir = tiny_clip_dirs
    assert isinstance(get_objective("pickscore", model=model_dir, processor=processor_dir, device="cpu"), PickScore)
    assert isinstance(get_objective(" CLIP ", model=model_dir, device="cpu"), ClipScore)

    def custom(images, prompts):
        return torch.zeros(len(prompts))

    assert get_objective(custom) is custom
    with pytest.raises(ValueError) as err:
        get_objective("aesthetic")
    assert "'aesthetic'" in str(err.value) and "'clip'" in str(err.value) and "'pickscore'" in str(err.value)
    with pytest.raises(TypeError, match="pickscore"):
        get_objective(42)
    with pytest.raises(TypeError):
        get_objective(custom, device="cpu")


def test_missing_model_offline(monkeypatch):
    """With HF_HUB_OFFLINE set, an uncached hub id fails at once, naming the id and the local-copy remedy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ObjectiveLoadError) as err:
        PickScore(model="headpag-test/no-such-model", processor="headpag-test/no-such-processor")
    message = str(err.value)
    assert isinstance(err.value, OSError) and err.value.__cause__ is not None
    assert "'headpag-test/no-such-model'" in message and "local" in message
    assert 'PickScore(model="/path/to/PickScore_v1"' in message and "HF_HOME" in message


def test_missing_processor_names_processor(tiny_clip_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ObjectiveLoadError, match="(?s)processor 'headpag-test/no-such-processor'.*local"):
        PickScore(model=tiny_clip_dirs[0], processor="headpag-test/no-such-processor", device="cpu")
    with pytest.raises(ObjectiveLoadError, match="(?s)ClipScore.*local"):
        ClipScore(model=str(tmp_path))  # a directory without a model


def test_local_files_only_follows_hf_hub_offline(monkeypatch):
    """local_files_only=True is passed iff HF_HUB_OFFLINE is true; other failures are wrapped, chained."""
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(CLIPModel, "from_pretrained", fake_from_pretrained)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ObjectiveLoadError, match="openai/clip-vit-large-patch14"):
        ClipScore(device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ObjectiveLoadError, match="huggingface-cli download openai/clip-vit-large-patch14") as err:
        ClipScore(device="cpu")
    assert calls == [{"local_files_only": True}, {}]
    assert isinstance(err.value.__cause__, OSError) and "valid model identifier" in str(err.value.__cause__)


def test_check_scores_accepts_and_converts():
    images, prompts = torch.zeros(3, 3, 8, 8), ["a", "b", "c"]
    for scores in ([1, 2, 3], (1.0, 2.0, 3.0), np.array([1.0, 2.0, 3.0], dtype=np.float32),
                   torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), torch.tensor([[1.0], [2.0], [3.0]]),
                   [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)], (float(x) for x in (1, 2, 3))):
        out = check_scores(scores, images, prompts)
        assert out.dtype == torch.float64 and out.device.type == "cpu" and out.shape == (3,)
        assert out.tolist() == [1.0, 2.0, 3.0]
    assert check_scores(torch.tensor(5.0), images[:1], prompts[:1]).tolist() == [5.0]


def test_check_scores_errors():
    images, prompts = torch.zeros(4, 3, 8, 8), ["a cat", "a dog", "a red fox", "a bird"]
    with pytest.raises(ValueError, match=r"3 scores for 4 images.*expected 4, got 3"):
        check_scores([1.0, 2.0, 3.0], images, prompts)
    with pytest.raises(ValueError, match="shape"):
        check_scores(torch.zeros(2, 2), images, prompts)
    with pytest.raises(ValueError, match=r"nan.*image 2 \(prompt 'a red fox'\)"):
        check_scores([0.0, 1.0, float("nan"), 3.0], images, prompts)
    with pytest.raises(ValueError, match=r"inf.*image 1 \(prompt 'a dog'\).*indices \[3\]"):
        check_scores(torch.tensor([0.0, float("inf"), 2.0, -float("inf")]), images, prompts)
    with pytest.raises(TypeError):
        check_scores(["high", "low", "x", "y"], images, prompts)
