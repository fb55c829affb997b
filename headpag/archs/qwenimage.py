"""Qwen-Image (text-to-image, img2img, inpaint, edit): ``QwenImageTransformer2DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn`` (``QwenImageTransformerBlock``, double-stream MMDiT): joint attention
  with the text tokens first (``QwenDoubleStreamAttnProcessor2_0`` concatenates ``[text, image]``, one
  ``dispatch_attention_fn`` call in ``(B, N, H, D)``). Fork unit: ``transformer_blocks[i]``.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``, placed before the image tokens. The edit pipelines
  append the reference image's latents to the noisy ones (``hidden_states`` = ``[noisy, reference]`` image tokens),
  so there ``mode="image"`` keeps the identity on every image token, the reference image's included.
- Timesteps: the pipelines pass ``t / 1000``.
- ``encoder_hidden_states_mask`` (per row) becomes a joint ``[text mask, ones]`` key mask at every layer whenever
  it is not None. The pipelines' ``encode_prompt`` replaces an all-ones mask by None, so the cond call carries a
  mask only when its prompts were padded (prompts of different token lengths in one batch, or given
  ``prompt_embeds_mask`` with zeros); the perturbed attention takes it like SDPA (padded text keys are left out of
  ``A`` and of the image-mode ``P``; the text span stays the padded length). The true-CFG uncond call is not forked
  (it gets the cond call's delta).
- ``img_shapes`` is a per-prompt Python list but only its first entry is read (RoPE: one shape for the batch), so
  it stays as given. ``zero_cond_t`` models (Qwen-Image-Edit-2511: a second, zero-timestep modulation of the
  reference tokens, ``temb`` of ``2 * B`` rows and a ``modulate_index`` with one row per ``img_shapes`` entry) are
  refused at enable: headpag's row widening covers neither.
- True CFG rescales per token: ``pred = comb * |cond| / |comb|`` with ``comb = uncond + s (cond - uncond)``. With
  the delta folded into both calls that is ``(comb + delta) * |cond + delta| / |comb + delta|``: PAG's delta goes
  through the pipeline's rescale rather than being added after it.
- Real checkpoints: Qwen-Image, Qwen-Image-Edit(-2509) 60 layers x 24 heads of 128.
"""

from diffusers import QwenImageTransformer2DModel

from .pipelines import CallPattern, register_pipeline
from .registry import Architecture, block_list, register_architecture

_layers, _blocks = block_list("transformer_blocks", attention="attn")


def _units(model) -> list[str]:
    if getattr(model.config, "zero_cond_t", False):
        raise ValueError(
            "QwenImageTransformer2DModel with zero_cond_t=True (Qwen-Image-Edit-2511) is not supported: its blocks "
            "get a timestep embedding of 2 x batch rows ([t..., 0...]) and a modulate_index with one row per "
            "img_shapes entry, which headpag cannot widen with the perturbed rows"
        )
    return _blocks(model)


QWENIMAGE = register_architecture(Architecture(
    QwenImageTransformer2DModel, "joint", _layers, _units,
    row_args=("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance",
              "attention_kwargs", "controlnet_block_samples", "additional_t_cond"),
    unit_row_args={"QwenImageTransformerBlock": ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                                                 "temb", "joint_attention_kwargs", "modulate_index")},
    processors=("QwenDoubleStreamAttnProcessor2_0",),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: t * 1000,
))

# True CFG (on with a negative prompt and true_cfg_scale > 1, the default 4.0): the cond rows under
# cache_context("cond"), then, in the same step, the uncond rows in a call of their own under cache_context("uncond").
# ``guidance_scale`` is the (unused) distilled-guidance input; CFG is turned off with true_cfg_scale=1.
_SEPARATE = CallPattern("separate", {"true_cfg_scale": 1.0})
for _pipeline in ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
                  "QwenImageEditPlusPipeline"):
    register_pipeline(_pipeline, _SEPARATE)
# Edit-inpaint (reference latents appended, known region blended back) and ControlNet (QwenImageControlNetModel
# residuals per row in controlnet_block_samples, the cond call's reused by the uncond call): the same true-CFG loop.
for _pipeline in ("QwenImageEditInpaintPipeline", "QwenImageControlNetPipeline"):
    register_pipeline(_pipeline, _SEPARATE)
