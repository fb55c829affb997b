"""``perturbed_attention`` in plain torch: for CPUs, systems without Triton, and the meta device.

Attention comes from ``F.scaled_dot_product_attention`` and only for the (row, head) pairs whose code needs
it; identity heads in joint mode return ``v`` and never form ``q k^T``. Joint mode works on groups of rows with
the same codes (a guided call has two: the unperturbed rows and the twins), one SDPA call per group on views of
q, k, v where its rows and heads are contiguous, so the common case gathers and scatters no (row, head) pairs.
Image mode computes the perturbed rows from an ``N_img x N_text`` score block plus the diagonal, never an
``N x N`` map. Everything is driven by the host-side codes (PLAIN / SOFT / IDENTITY per (row, head)), so the same
code runs on meta tensors and is costed there by ``FlopCounterMode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import IDENTITY, SOFT


def _pairs(keep: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-row and head indices of the pairs where ``keep`` holds, on ``device``."""
    b, h = keep.nonzero(as_tuple=True)
    return b.to(device), h.to(device)


def _sdpa_pairs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """SDPA over gathered pairs ``(M, N, D)`` with their score ``bias`` ``(M, N or 1, N)`` (or None), run as one
    ``(1, M, N, D)`` batch: torch's fused CPU kernels take 4-D inputs only, and a 3-D call falls back to the math
    path, which materialises the N x N maps."""
    mask = None if bias is None else bias[None].to(q.dtype)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)[0]


Index = slice | torch.Tensor  # rows or heads: a slice where they are contiguous, else an index tensor


def _index(ids: list[int], device: torch.device) -> Index:
    """``ids`` (ascending) as a slice when contiguous, else as an index tensor on ``device``."""
    if ids[-1] - ids[0] == len(ids) - 1:
        return slice(ids[0], ids[-1] + 1)
    return torch.tensor(ids, device=device)


def _read(t: torch.Tensor, rows: Index, heads: Index) -> torch.Tensor:
    """``t[rows][:, heads]`` of a ``(B, H, ...)`` tensor: a view where both are slices."""
    t = t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
    return t[:, heads] if isinstance(heads, slice) else t.index_select(1, heads)


def _write(out: torch.Tensor, rows: Index, heads: Index, value: torch.Tensor) -> None:
    """``out[rows][:, heads] = value`` in place."""
    if isinstance(rows, slice):
        out[rows][:, heads] = value
    elif isinstance(heads, slice):
        out[rows, heads] = value
    else:
        out[rows[:, None], heads] = value


def _code_groups(codes: list[int], H: int) -> list[tuple[list[int], list[int]]]:
    """``(rows, codes of each of them)`` for every distinct row of the flat row-major ``(B, H)`` codes, in first-row
    order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b in range(len(codes) // H):
        groups.setdefault(tuple(codes[b * H:(b + 1) * H]), []).append(b)
    return [(rows, list(row)) for row, rows in groups.items()]


def _group_bias(bias: torch.Tensor | None, B: int, H: int, rows: Index, heads: Index) -> torch.Tensor | None:
    """The score bias ``(B or 1, H or 1, N or 1, N)`` of the given rows and heads (broadcast dims kept)."""
    if bias is None:
        return None
    return _read(bias, rows if bias.shape[0] == B else slice(None), heads if bias.shape[1] == H else slice(None))


def _bias_rows(bias: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The query rows ``rows`` of a gathered bias ``(M, N or 1, N)`` (a bias shared by every query row stays so)."""
    return bias if bias is None or bias.shape[1] == 1 else bias[:, rows]


def _perturbed_image_rows(q_img, k_img, v_img, k_txt, v_txt, scale: float, bias, img: slice, txt: slice) -> torch.Tensor:
    """``P v`` for image queries: softmax over the text keys and the query's own key, in float32 or wider.

    Shapes ``(M, N_img, D)`` for the image tensors and ``(M, N_txt, D)`` for the text ones; ``bias`` is the pairs'
    gathered score bias ``(M, N or 1, N)`` or None, ``img`` / ``txt`` the token ranges. A row whose every key is
    masked gets 0.
    """
    dtype = torch.promote_types(q_img.dtype, torch.float32)
    q_img, k_img, v_img, k_txt, v_txt = (t.to(dtype) for t in (q_img, k_img, v_img, k_txt, v_txt))
    s_diag = (q_img * k_img).sum(-1, keepdim=True) * scale
    s_txt = q_img @ k_txt.transpose(-1, -2) * scale
    if bias is not None:
        bias = bias.to(dtype)
        if bias.shape[1] == 1:
            s_diag = s_diag + bias[:, 0, img][..., None]
            s_txt = s_txt + bias[:, :, txt]
        else:
            s_diag = s_diag + bias[:, img, img].diagonal(dim1=-2, dim2=-1)[..., None]
            s_txt = s_txt + bias[:, img, txt]
    m = torch.maximum(s_txt.amax(-1, keepdim=True), s_diag) if s_txt.shape[-1] else s_diag
    m = m.masked_fill(m == float("-inf"), 0.0)
    e_txt = torch.exp(s_txt - m)
    e_diag = torch.exp(s_diag - m)
    total = e_txt.sum(-1, keepdim=True) + e_diag
    return (e_txt @ v_txt + e_diag * v_img) / total.masked_fill(total == 0, 1.0)


def torch_perturbed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    codes: list[int],
    *,
    layout: str,
    mode: str,
    n_text: int,
    text_first: bool,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validated inputs; ``u`` float32 ``(B, H)`` on q's device, ``codes`` the flat row-major ``B * H`` codes (Python
    ints), ``bias`` the float32 additive score bias ``(B or 1, H or 1, N or 1, N)`` of the attention mask, or None.

    Returns the output in q's layout, contiguous, q's dtype.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if layout == "bnhd":
        q, k, v, out_bhnd = (t.transpose(1, 2) for t in (q, k, v, out))
    else:
        out_bhnd = out
    B, H, N, _ = q.shape
    if len(codes) != B * H:
        raise ValueError(f"codes must hold B * H = {B * H} entries (row-major), got {len(codes)}")
    device = q.device

    def pair_bias(b, h):
        return None if bias is None else bias.expand(B, H, -1, -1)[b, h]

    compute = torch.promote_types(q.dtype, torch.float32)

    def blend(b, h, attention, identity_term):
        w = u[b, h].to(compute).view(-1, 1, 1)
        return ((1 - w) * attention.to(compute) + w * identity_term.to(compute)).to(q.dtype)

    if mode == "joint":
        if IDENTITY not in codes:
            mask = None if bias is None else bias.to(q.dtype)
            attention = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            if SOFT not in codes:
                out_bhnd.copy_(attention)
            else:
                w = u.to(compute)[:, :, None, None]
                out_bhnd.copy_(((1 - w) * attention.to(compute) + w * v.to(compute)).to(q.dtype))
            return out
        for row_ids, row_codes in _code_groups(codes, H):
            rows = _index(row_ids, device)
            identity = [h for h, c in enumerate(row_codes) if c == IDENTITY]
            if identity:
                heads = _index(identity, device)
                _write(out_bhnd, rows, heads, _read(v, rows, heads))
            if len(identity) == H:
                continue
            heads = _index([h for h, c in enumerate(row_codes) if c != IDENTITY], device)
            v_g = _read(v, rows, heads)
            mask = _group_bias(bias, B, H, rows, heads)
            attention = F.scaled_dot_product_attention(
                _read(q, rows, heads), _read(k, rows, heads), v_g, attn_mask=None if mask is None else mask.to(q.dtype),
                scale=scale)
            if SOFT in row_codes:
                w = _read(u, rows, heads).to(compute)[:, :, None, None]
                attention = ((1 - w) * attention.to(compute) + w * v_g.to(compute)).to(q.dtype)
            _write(out_bhnd, rows, heads, attention)
        return out

    code_of = torch.tensor(codes, dtype=torch.int8).view(B, H)
    attend = code_of != IDENTITY
    txt = slice(0, n_text) if text_first else slice(N - n_text, N)
    img = slice(n_text, N) if text_first else slice(0, N - n_text)
    # Pairs that need the full map A on every query row.
    b, h = _pairs(attend, device)
    if b.numel():
        out_bhnd[b, h] = _sdpa_pairs(q[b, h], k[b, h], v[b, h], scale, pair_bias(b, h))
    # Identity pairs still need A on their text rows (text rows of P equal A).
    b, h = _pairs(~attend, device)
    if b.numel() and n_text:
        out_bhnd[b, h, txt] = _sdpa_pairs(q[b, h, txt], k[b, h], v[b, h], scale, _bias_rows(pair_bias(b, h), txt))
    # Perturbed image rows: identity pairs take P v, soft pairs blend it with A v.
    for code in (IDENTITY, SOFT):
        b, h = _pairs(code_of == code, device)
        if b.numel() and N - n_text:
            perturbed = _perturbed_image_rows(q[b, h, img], k[b, h, img], v[b, h, img], k[b, h, txt], v[b, h, txt],
                                              scale, pair_bias(b, h), img, txt)
            out_bhnd[b, h, img] = perturbed.to(q.dtype) if code == IDENTITY else blend(b, h, out_bhnd[b, h, img], perturbed)
    return out
