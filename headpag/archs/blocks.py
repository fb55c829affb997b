"""Per-row arguments of diffusers' transformer block classes that several families share."""

#: ``JointTransformerBlock`` (SD3) and Flux's double- and single-stream blocks.
TRANSFORMER_BLOCK_ROW_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")

#: ``BasicTransformerBlock`` (PixArt, DiT).
BASIC_BLOCK_ROW_ARGS = (
    "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
    "cross_attention_kwargs", "class_labels", "added_cond_kwargs",
)
