"""DiT: ``DiTTransformer2DModel`` (class-conditional, learned sigma).

- Layer ``i`` is ``transformer_blocks[i].attn1`` (self-attention). Fork unit: ``transformer_blocks[i]``.
- Per row: ``class_labels``; ``DiTPipeline`` puts the conditional rows first, then the null-label rows.
- Learned sigma: the output has twice the input channels; guidance applies to the first half only.
- Real checkpoints: DiT-XL/2 28 layers x 16 heads of 72.
"""

from diffusers import DiTTransformer2DModel

from .blocks import BASIC_BLOCK_ROW_ARGS
from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

DIT = register_architecture(Architecture(
    DiTTransformer2DModel, "self", *block_list("transformer_blocks", attention="attn1"),
    row_args=("hidden_states", "timestep", "class_labels", "cross_attention_kwargs"),
    unit_row_args={"BasicTransformerBlock": BASIC_BLOCK_ROW_ARGS},
    processors=("AttnProcessor2_0",),
))

register_pipeline("DiTPipeline", "cond_uncond")
