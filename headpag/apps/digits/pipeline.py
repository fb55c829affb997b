"""``DigitsPipeline``: class-conditional flow matching on 8x8 digits with an ``SD3Transformer2DModel``.

Called like a text-to-image pipeline whose prompt is a digit: ``pipe(7)``, ``pipe("7")``, ``pipe([0, 1, "2"])``.
One denoiser call per step with rows ``[uncond, cond]`` when classifier-free guidance is on (``guidance_scale >
1``), else ``[cond]``, timesteps from ``scheduler.timesteps``, as ``StableDiffusion3Pipeline`` does, so
headpag's ``enable_fused`` / ``enable_eager`` / ``hunt`` treat it like SD3: it registers the call pattern
``"uncond_cond"`` through the public ``headpag.register_pipeline``, as any user pipeline would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, SD3Transformer2DModel
from diffusers.utils.torch_utils import randn_tensor

import headpag

from .model import IMAGE_SIZE, NULL_LABEL, NUM_DIGITS, encode_labels, to_unit

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_STEPS = 20


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The ``from_pretrained`` keyword for a weights dtype: ``dtype`` where diffusers takes it (its
    ``torch_dtype`` is deprecated there and warns), ``torch_dtype`` on older diffusers; ``{}`` for None."""
    if dtype is None:
        return {}
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def parse_digits(prompt) -> list[int]:
    """A digit (int or one-character string) or a list of them -> list of ints in 0-9."""
    if isinstance(prompt, (int, str, np.integer)) or (isinstance(prompt, torch.Tensor) and prompt.ndim == 0):
        items = [prompt]
    elif isinstance(prompt, (list, tuple, torch.Tensor, np.ndarray)):
        items = list(prompt)
    else:
        raise ValueError(f"prompt {prompt!r}: expected a digit 0-9 or a list of digits")
    if not items:
        raise ValueError("prompt is empty: pass a digit 0-9 or a list of digits")
    digits = []
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item.item()
        if isinstance(item, bool):
            raise ValueError(f"prompt {item!r}: expected a digit 0-9")
        if isinstance(item, str):
            text = item.strip()
            if len(text) != 1 or not text.isdigit():
                raise ValueError(f"prompt {item!r}: expected a digit 0-9 (an int or a string like '7')")
            item = int(text)
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"prompt {item!r}: expected a digit 0-9") from None
        if value != item or not 0 <= value < NUM_DIGITS:
            raise ValueError(f"prompt {item!r}: expected a digit 0-9")
        digits.append(value)
    return digits


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digit generation (see the module docstring).

    Components: ``transformer`` (``SD3Transformer2DModel``, 1 pixel channel, 8x8) and ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``). :meth:`from_package` loads the weights shipped with headpag.
    """

    model_cpu_offload_seq = "transformer"
    _optional_components: list[str] = []

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self._guidance_scale = DEFAULT_GUIDANCE_SCALE

    @classmethod
    def from_package(cls, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     progress_bar: bool = False) -> "DigitsPipeline":
        """The pipeline with the trained weights shipped in ``headpag/apps/digits/weights/pipeline``."""
        if not (PIPELINE_DIR / "model_index.json").exists():
            raise FileNotFoundError(f"no shipped digits weights in {PIPELINE_DIR}; train them with "
                                    f"`python -m headpag.apps.digits.train` (needs scikit-learn)")
        from diffusers.utils import logging as diffusers_logging

        kwargs = dtype_kwargs(torch_dtype)
        bars_were_off = not diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
        try:
            pipe = cls.from_pretrained(str(PIPELINE_DIR), low_cpu_mem_usage=False, **kwargs)
        finally:
            if not bars_were_off:
                diffusers_logging.enable_progress_bar()
        pipe.set_progress_bar_config(disable=not progress_bar)
        return pipe.to(device) if device is not None else pipe

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    guidance_rescale = 0.0

    def encode_prompt(self, digits: Sequence[int], do_classifier_free_guidance: bool, device, dtype):
        """``(encoder_hidden_states, pooled_projections)`` with rows ``[uncond, cond]`` under CFG, else ``[cond]``."""
        labels = list(digits)
        if do_classifier_free_guidance:
            labels = [NULL_LABEL] * len(labels) + labels
        return encode_labels(labels, device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate digits.

        Args:
            prompt: a digit (``7`` or ``"7"``) or a list of digits.
            num_images_per_prompt: images per digit (rows ordered digit-major).
            num_inference_steps: Euler steps of the flow-matching scheduler.
            guidance_scale: classifier-free guidance scale ``s`` (null label as the unconditional branch); ``<= 1``
                turns CFG off (one row per image per step).
            generator: a ``torch.Generator`` or one per image (a list).
            latents: initial noise ``(B, 1, 8, 8)`` instead of drawing it.
            output_type: ``"pt"`` float tensor ``(B, 3, 8, 8)`` in [0, 1], ``"np"`` float array ``(B, 8, 8, 3)``,
                ``"pil"`` list of RGB images (1 = white ink on black).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        if prompt is None:
            raise ValueError("prompt is required: a digit 0-9 or a list of digits")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        digits = [d for d in parse_digits(prompt) for _ in range(num_images_per_prompt)]
        batch = len(digits)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one per image")
        self._guidance_scale = float(guidance_scale)
        device = self._execution_device
        dtype = self.transformer.dtype
        cfg = self.do_classifier_free_guidance

        ehs, pooled = self.encode_prompt(digits, cfg, device, dtype)
        shape = (batch, self.transformer.config.in_channels, IMAGE_SIZE, IMAGE_SIZE)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        for t in self.progress_bar(timesteps):
            model_input = torch.cat([latents, latents]) if cfg else latents
            velocity = self.transformer(
                hidden_states=model_input.to(dtype),
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=ehs,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()
            if cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + self._guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

        image = to_unit(latents).repeat(1, 3, 1, 1)
        if output_type in ("np", "pil"):
            image = image.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


headpag.register_pipeline(DigitsPipeline, "uncond_cond")
