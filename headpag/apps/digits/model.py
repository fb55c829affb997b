"""The digits models: the denoiser's configuration, the label ("text") encoding, the classifier, the data.

The denoiser is a plain diffusers ``SD3Transformer2DModel`` (joint attention) working in pixel space on the 8x8
images of scikit-learn's handwritten digits, one channel, values in ``[-1, 1]`` (``pixel / 8 - 1``).

Its "text" is the digit. A label ``y`` (0-9, or :data:`NULL_LABEL` = 10 for the unconditional / classifier-free
guidance branch) becomes

- ``encoder_hidden_states`` ``(B, TEXT_TOKENS, TEXT_TOKENS * NUM_LABELS)``: token ``j`` is the one-hot vector with a
  1 at ``j * NUM_LABELS + y``; the transformer's own ``context_embedder`` (a Linear layer) turns it into a learned
  embedding per (token, label), i.e. it *is* the embedding table, trained with the rest;
- ``pooled_projections`` ``(B, NUM_LABELS)``: the one-hot of ``y``, embedded by the transformer's
  ``time_text_embed.text_embedder``.

So every learned weight lives in the transformer, and the pipeline's components are exactly
``transformer`` + ``scheduler`` (``save_pretrained`` / ``from_pretrained`` need nothing outside diffusers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

NUM_DIGITS = 10
NUM_LABELS = NUM_DIGITS + 1  # + the null label
NULL_LABEL = NUM_DIGITS
TEXT_TOKENS = 4
IMAGE_SIZE = 8

#: ``SD3Transformer2DModel`` configuration of the shipped denoiser (6 joint layers x 4 heads of dim 16).
TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=TEXT_TOKENS * NUM_LABELS,
    caption_projection_dim=64,
    pooled_projection_dim=NUM_LABELS,
    pos_embed_max_size=IMAGE_SIZE // 2,
)


def encode_labels(labels, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder_hidden_states, pooled_projections)`` of integer labels (0-9, or 10 for the null label)."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > NULL_LABEL):
        raise ValueError(f"labels must be in [0, {NULL_LABEL}], got {labels.tolist()}")
    offsets = torch.arange(TEXT_TOKENS, device=labels.device) * NUM_LABELS
    tokens = F.one_hot(labels[:, None] + offsets[None, :], TEXT_TOKENS * NUM_LABELS).to(dtype)
    pooled = F.one_hot(labels, NUM_LABELS).to(dtype)
    return tokens, pooled


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """sklearn digit pixels (0-16) -> model space [-1, 1]."""
    return pixels / 8.0 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space -> [0, 1] (1 = ink), clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


class DigitClassifier(ModelMixin, ConfigMixin):
    """A small CNN on 8x8 digit images in ``[0, 1]`` (1 = ink), ``(B, 1, 8, 8)`` -> 10 logits."""

    @register_to_config
    def __init__(self, channels: int = 32, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * 16, hidden)
        self.fc2 = nn.Linear(hidden, NUM_DIGITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] (C = 1 or 3, any H, W) -> ``(B, 1, 8, 8)`` float32 grey."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.adaptive_avg_pool2d(x, IMAGE_SIZE)
        return x


def load_sklearn_digits(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``: x float32 ``(N, 1, 8, 8)`` pixels 0-16,
    y int64; a fixed seeded split. Needs scikit-learn (the ``train`` extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data ship with scikit-learn: pip install 'headpag[train]'") from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
