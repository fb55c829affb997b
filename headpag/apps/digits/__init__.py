"""The embedded default model: class-conditional flow matching on scikit-learn's 8x8 handwritten digits.

- :class:`DigitsPipeline`: a diffusers pipeline around an ``SD3Transformer2DModel`` (joint attention, 6 layers x 4
  heads) and a ``FlowMatchEulerDiscreteScheduler``; ``prompt`` is a digit or a list of digits. headpag's
  ``enable_fused`` / ``enable_eager`` / ``hunt`` work on it as on SD3.
- :func:`load_pipeline` / :meth:`DigitsPipeline.from_package`: the trained weights shipped in ``weights/``
  (``weights/train.json`` records the command, settings and measurements; retrain with
  ``python -m headpag.apps.digits.train``, which needs scikit-learn).
- :func:`load_classifier`, :class:`DigitObjective`: a small CNN digit classifier trained the same way, and the
  HeadHunter objective built on it (the classifier's confidence in the asked digit).
"""

from __future__ import annotations

from .model import NULL_LABEL, TRANSFORMER_CONFIG, DigitClassifier, encode_labels
from .objective import DigitObjective, load_classifier
from .pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, PIPELINE_DIR, WEIGHTS_DIR, DigitsPipeline, parse_digits


def load_pipeline(device=None, torch_dtype=None, progress_bar: bool = False) -> DigitsPipeline:
    """The shipped digits pipeline (see :meth:`DigitsPipeline.from_package`)."""
    return DigitsPipeline.from_package(torch_dtype=torch_dtype, device=device, progress_bar=progress_bar)


__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_STEPS",
    "NULL_LABEL",
    "PIPELINE_DIR",
    "TRANSFORMER_CONFIG",
    "WEIGHTS_DIR",
    "DigitClassifier",
    "DigitObjective",
    "DigitsPipeline",
    "encode_labels",
    "load_classifier",
    "load_pipeline",
    "parse_digits",
]
