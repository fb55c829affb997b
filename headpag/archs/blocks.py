"""Per-row arguments of diffusers' transformer block classes that several families share."""

#: ``JointTransformerBlock`` (SD3) and Flux's double- and single-stream blocks.
TRANSFORMER_BLOCK_ROW_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")

#: ``BasicTransformerBlock`` (PixArt, DiT).
BASIC_BLOCK_ROW_ARGS = (
    "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
    "cross_attention_kwargs", "class_labels", "added_cond_kwargs",
)

#: The UNet blocks' argument groups (``UNet2DConditionModel``'s and ``UNetMotionModel``'s down / mid / up blocks).
CROSS_ATTENTION_ARGS = ("encoder_hidden_states", "attention_mask", "cross_attention_kwargs", "encoder_attention_mask")
RESNET_ARGS = ("hidden_states", "temb")
SKIP_ARGS = ("res_hidden_states_tuple",)
