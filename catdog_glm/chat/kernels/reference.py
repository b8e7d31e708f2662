"""Plain torch versions of the kernels' arithmetic, for tests and the self-check: the same int8 activation blocks and
integer sums, written with no cleverness so that they are easy to trust."""

from __future__ import annotations

import torch

GROUP = 32


def unpack_q4(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] packed bytes -> [N, K] levels 0..15 (chunks of 128: byte j = weight j | weight 64 + j << 4; a last
    chunk of 64: byte j = weight j | weight 32 + j << 4)."""
    n, half_k = qweight.shape
    k = half_k * 2
    levels = torch.empty((n, k), dtype=torch.int32)
    for start in range(0, k, 128):
        size = min(128, k - start)
        half = size // 2
        chunk = qweight[:, start // 2 : start // 2 + half].to(torch.int32)
        levels[:, start : start + half] = chunk & 15
        levels[:, start + half : start + size] = chunk >> 4
    return levels


def pack_q4(levels: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack_q4."""
    n, k = levels.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    for start in range(0, k, 128):
        size = min(128, k - start)
        half = size // 2
        low, high = levels[:, start : start + half], levels[:, start + half : start + size]
        packed[:, start // 2 : start // 2 + half] = (low | (high << 4)).to(torch.uint8)
    return packed


def dequantize_q4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric (q - 8) * d, or asymmetric q * d + m when `mins` is given."""
    asymmetric = mins is not None and mins.numel() > 0
    levels = unpack_q4(qweight).float() - (0 if asymmetric else 8)
    groups = levels.reshape(levels.shape[0], -1, GROUP) * scales.float()[:, :, None]
    if asymmetric:
        groups = groups + mins.float()[:, :, None]
    return groups.reshape(levels.shape)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x -> (int8 values as int64 [M, K], scale per block [M, K/32])."""
    blocks = x.float().reshape(x.shape[0], -1, GROUP)
    scale = blocks.abs().amax(-1) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(blocks * inverse[:, :, None]).clamp(-127, 127).to(torch.int64)
    return q.reshape(x.shape[0], -1), scale


def q4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins=None, bias=None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    q, sx = quantize_activations(rows)
    asymmetric = mins is not None and mins.numel() > 0
    w = unpack_q4(qweight).to(torch.int64) - (0 if asymmetric else 8)
    m, n, blocks = q.shape[0], w.shape[0], sx.shape[1]
    q_blocks = q.reshape(m, blocks, GROUP)
    dots = torch.einsum("mbt,nbt->mnb", q_blocks, w.reshape(n, blocks, GROUP)).float()
    y = (dots * sx[:, None, :] * scales.float()[None, :, :]).sum(-1)
    if asymmetric:  # + min x the block's dequantized activations' sum
        y = y + (mins.float()[None, :, :] * (sx * q_blocks.sum(-1).float())[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def q8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    q, sx = quantize_activations(rows)
    w = weight.to(torch.int64)
    m, n, blocks = q.shape[0], w.shape[0], sx.shape[1]
    dots = torch.einsum("mbt,nbt->mnb", q.reshape(m, blocks, GROUP), w.reshape(n, blocks, GROUP)).float()
    y = (dots * sx[:, None, :]).sum(-1) * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def decode_attention(q, k_new, v_new, caches, layer: int, lengths: list[int], scale: float) -> torch.Tensor:
    """What catdog::decode_attention computes, with torch's SDPA per request: the new keys/values written into each
    cache at its length, then each request's one query against its length + 1 positions. Mutates `caches`."""
    from torch.nn.functional import scaled_dot_product_attention

    out = []
    for b, (cache, length) in enumerate(zip(caches, lengths, strict=True)):
        cache[layer, 0, :, length] = k_new[b]
        cache[layer, 1, :, length] = v_new[b]
        keys, values = cache[layer, 0, :, : length + 1], cache[layer, 1, :, : length + 1]
        query = q[b][None, :, None].float()  # [1, heads, 1, D]
        attended = scaled_dot_product_attention(
            query, keys[None].float(), values[None].float(), scale=scale, enable_gqa=keys.shape[0] != q.shape[1]
        )
        out.append(attended[0, :, 0].to(q.dtype))
    return torch.stack(out) if out else q.new_empty(q.shape)


def rms_norm(x, weight, eps: float):
    """Llama's / GLM's RMSNorm, as transformers writes it."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(q, k, cos, sin, interleaved: bool):
    """transformers' apply_rotary_pos_emb for q, k [tokens, heads, head_dim] and cos, sin [tokens, width]: Llama's
    (halves, the whole head) or GLM's (interleaved pairs over the first `width` dimensions)."""
    cos, sin = cos[:, None], sin[:, None]
    if not interleaved:

        def rotate(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        width = cos.shape[-1]
        return tuple(
            torch.cat([x[..., :width] * cos + rotate(x[..., :width]) * sin, x[..., width:]], dim=-1) for x in (q, k)
        )
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    width = cos.shape[-1]

    def rotate_pairs(x):
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    return tuple(
        torch.cat([x[..., :width] * cos + rotate_pairs(x[..., :width]) * sin, x[..., width:]], dim=-1) for x in (q, k)
    )


def silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return up * torch.nn.functional.silu(gate)
