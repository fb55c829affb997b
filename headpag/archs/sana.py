"""Sana: ``SanaTransformer2DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn1``: self-attention over the image tokens. Text (Gemma-2 tokens) enters
  through the cross-attention ``attn2`` only (softmax attention with the prompt's mask), never a layer. Fork unit:
  ``transformer_blocks[i]``.
- ``attn1`` is ReLU *linear* attention (``SanaLinearAttnProcessor2_0``): per head, with ``phi = relu``,
  ``out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)``, computed as
  ``(V phi(K)^T) phi(Q)`` without forming the maps and without calling any attention function (neither
  ``dispatch_attention_fn`` nor ``F.scaled_dot_product_attention``), so headpag's softmax kernel cannot stand in
  for it. Its maps ``A_ij = phi(q_i) . phi(k_j) / sum_j phi(q_i) . phi(k_j)`` are row-stochastic all the same, and
  perturbing them is exact in factored form: ``((1 - u) A + u I) V = (1 - u) (A V) + u V`` per head, which
  :func:`perturbed_linear_attention` computes (``u = 1``: ``V``, what diffusers' ``PAGCFGSanaLinearAttnProcessor2_0``
  / ``PAGIdentitySanaLinearAttnProcessor2_0`` compute for their perturbed rows). The guided step calls it
  through ``Architecture.perturbed_attention`` instead of routing an attention call.
- No joint attention: ``mode="joint"`` and ``"image"`` both mean the identity over the image tokens.
- Per row: the timestep (one per row), the caption embeddings and their mask (cross-attention only), ``guidance``
  (Sana-Sprint), ControlNet residuals.
- Timesteps: ``SanaPipeline`` passes ``t * config.timestep_scale`` (1.0 for Sana and Sana 1.5, so the scheduler's
  as they are; ``SanaPAGPipeline`` never scales).
- Real checkpoints: Sana 1600M 20 layers x 70 heads of 32 (diffusers' ``SanaTransformer2DModel`` defaults, the
  config of ``Efficient-Large-Model/Sana_1600M_*``); Sana 600M 28 layers x 36 heads of 32.
"""


import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel

from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

def perturbed_linear_attention(attn, args: tuple, kwargs: dict, u: torch.Tensor, *,
                               materialise: bool = False) -> torch.Tensor:
    """``attn``'s forward (an ``Attention`` whose processor is ``SanaLinearAttnProcessor2_0``) with each head's maps
    ``A`` replaced by ``(1 - u) A + u I``, ``u`` a float32 ``(rows, heads)`` tensor.

    Factored (``materialise=False``): the processor's own arithmetic for ``A V``, then ``(1 - u) (A V) + u V``;
    rows and heads with ``u = 0`` are the processor's output bit for bit, those with ``u = 1`` are ``V``. With
    ``materialise`` the ``(N, N)`` maps are built and mixed with the identity explicitly (the eager oracle).
    """
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
        raise ValueError("Sana's linear self-attention takes no encoder states or mask on a selected layer")
    if u.shape != (hidden_states.shape[0], attn.heads):
        raise RuntimeError(f"perturbed linear attention: u has shape {tuple(u.shape)}, expected "
                           f"({hidden_states.shape[0]}, {attn.heads})")
    original_dtype = hidden_states.dtype
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # (B, H, D, N), (B, H, N, D), (B, H, D, N): the processor's layouts
    query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
    key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
    value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
    query, key, value = F.relu(query).float(), F.relu(key).float(), value.float()
    w = u.to(value.device, torch.float32)[:, :, None, None]
    if materialise:
        scores = torch.matmul(key, query).transpose(2, 3)  # (B, H, N_q, N_k): phi(q_i) . phi(k_j)
        maps = scores / (scores.sum(-1, keepdim=True) + 1e-15)
        eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
        out = torch.matmul(value, ((1 - w) * maps + w * eye).transpose(2, 3))  # (B, H, D, N_q)
    else:
        out = torch.matmul(torch.matmul(F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0), key), query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out * (1 - w) + value * w
    out = out.flatten(1, 2).transpose(1, 2).to(original_dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if original_dtype == torch.float16:
        out = out.clip(-65504, 65504)
    return out


SANA = register_architecture(Architecture(
    SanaTransformer2DModel, "self", *block_list("transformer_blocks", attention="attn1"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "guidance", "encoder_attention_mask",
              "attention_mask", "attention_kwargs", "controlnet_block_samples"),
    unit_row_args={"SanaTransformerBlock": ("hidden_states", "attention_mask", "encoder_hidden_states",
                                            "encoder_attention_mask", "timestep")},
    processors=("SanaLinearAttnProcessor2_0",),
    perturbed_attention=perturbed_linear_attention,
))

register_pipeline("SanaPipeline", "uncond_cond")
