"""Weight-only int8 / int4 quantization of the Linear layers inside the transformer blocks.

Written here because no maintained library does it on the CPU for transformers 5 without CUDA (bitsandbytes and
ChatGLM3's own `.quantize()` need CUDA; torchao's int8 weight-only path measured slower than bf16 here). torch
itself ships the kernels: `aten._weight_int8pack_mm` (per-channel int8) and `aten._weight_int4pack_mm_for_cpu`
(group-wise int4); this module only packs the weights for them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class Int8Linear(nn.Module):
    """y = x @ (int8 W * per-row scale)^T + b, through torch's int8 weight-only kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # the packed kernel is CPU-only; elsewhere dequantize on the fly
            y = x @ (self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None]).t()
        else:
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _int4_layout(k: int) -> tuple[int, int] | None:
    group = next((g for g in (128, 64, 32) if k % g == 0), None)
    tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    return (group, tiles) if group and tiles else None


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights through torch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear, group: int, tiles: int):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        chunks = w.reshape(-1, group)
        low, high = chunks.amin(dim=1, keepdim=True), chunks.amax(dim=1, keepdim=True)
        scales = (high - low).clamp(min=1e-6) / 15
        zeros = low + scales * 8
        q = chunks.sub(low).div(scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, tiles)
        scales_and_zeros = torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], 2).transpose(0, 1)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous().to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.group, self.in_features, self.out_features = group, k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight_int4, self.group, self.scales_and_zeros.to(x.dtype)
        )
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize_linear_layers(model: nn.Module, bits: int) -> int:
    """Replace the Linear layers inside the transformer blocks (not embeddings or lm_head). Returns how many."""
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else model
    replaced = 0
    for block in layers.modules() if not isinstance(layers, nn.ModuleList) else layers:
        for name, child in list(block.named_modules()):
            if not isinstance(child, nn.Linear) or child.weight.device.type == "meta":
                continue
            *parents, leaf = name.split(".")
            owner = block
            for part in parents:
                owner = getattr(owner, part)
            if bits == 8:
                setattr(owner, leaf, Int8Linear(child))
            else:
                layout = _int4_layout(child.in_features)
                if layout is None or child.weight.device.type != "cpu":
                    setattr(owner, leaf, Int8Linear(child))  # int4 kernel layout does not fit: int8 instead
                else:
                    setattr(owner, leaf, Int4Linear(child, *layout))
            replaced += 1
    log.info("quantized %d Linear layers to int%d", replaced, bits)
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights included)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())
