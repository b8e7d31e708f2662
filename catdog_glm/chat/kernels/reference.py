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
