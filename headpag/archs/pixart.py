"""PixArt-alpha / PixArt-Sigma: ``PixArtTransformer2DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn1``: self-attention over the image tokens (text enters through the
  cross-attention ``attn2``, never a layer). Fork unit: ``transformer_blocks[i]``.
- Per row beyond the inputs: ``added_cond_kwargs`` (resolution, aspect ratio) and the embedded timestep.
- Real checkpoints: PixArt-Sigma 28 layers x 16 heads of 72.
"""

from diffusers import PixArtTransformer2DModel

from .blocks import BASIC_BLOCK_ROW_ARGS
from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

PIXART = register_architecture(Architecture(
    PixArtTransformer2DModel, "self", *block_list("transformer_blocks", attention="attn1"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "added_cond_kwargs", "cross_attention_kwargs",
              "attention_mask", "encoder_attention_mask"),
    unit_row_args={"BasicTransformerBlock": BASIC_BLOCK_ROW_ARGS},
    processors=("AttnProcessor2_0",),
))

for _pipeline in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
    register_pipeline(_pipeline, "uncond_cond_local")
