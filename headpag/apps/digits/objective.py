"""The demo's HeadHunter objective: the digit classifier's confidence in the asked digit (a stand-in for
PickScore on the embedded digits model)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .model import DigitClassifier
from .pipeline import WEIGHTS_DIR, parse_digits

CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"


def load_classifier(path=None) -> DigitClassifier:
    """The shipped classifier (or one saved with ``save_pretrained`` at ``path``), in eval mode."""
    path = Path(CLASSIFIER_DIR if path is None else path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no digit classifier in {path}; train it with `python -m headpag.apps.digits.train`")
    return DigitClassifier.from_pretrained(str(path), low_cpu_mem_usage=False).eval().requires_grad_(False)


class DigitObjective:
    """``objective(images, prompts) -> scores``: softmax probability the classifier gives the asked digit.

    ``images``: ``(B, 3, H, W)`` (or 1 channel) in [0, 1]; ``prompts``: ``B`` digits (``"7"`` or ``7``).
    :meth:`predict` returns the classifier's labels, for recognition rates.
    """

    name = "digit-confidence"

    def __init__(self, classifier: DigitClassifier | None = None):
        self.classifier = classifier if classifier is not None else load_classifier()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        x = DigitClassifier.prepare(images.detach().cpu())
        return self.classifier(x).softmax(dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images).argmax(dim=1)

    def __call__(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        digits = parse_digits(list(prompts))
        if len(digits) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(digits)} prompts")
        probs = self.probabilities(images)
        return probs[torch.arange(len(digits)), torch.tensor(digits)]
