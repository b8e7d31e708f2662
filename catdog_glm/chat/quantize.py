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


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 rows, fp32 scale per row)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x @ (int8 W * per-row scale)^T + b, through torch's int8 weight-only kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight_int8, scales = _int8_rows(linear.weight)
        self.register_buffer("weight_int8", weight_int8)
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


# Groups of 32 weights per scale: on SmolLM2 greedy next-token agreement with bf16 was 96% at 32, 70-82% with
# groups of 64/128 (measured with benchmarks/bench_chat.py's prompts), for 0.35x instead of 0.33x of bf16 memory.
INT4_GROUP = 32


def _int4_layout(k: int) -> tuple[int, int] | None:
    group = INT4_GROUP if k % INT4_GROUP == 0 else None
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


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with a per-row scale, dequantized on lookup."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        weight_int8, scales = _int8_rows(embedding.weight)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales.to(embedding.weight.dtype))
        self.num_embeddings, self.embedding_dim = weight_int8.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


def _quantized(linear: nn.Linear, bits: int) -> nn.Module:
    if bits == 4 and linear.weight.device.type == "cpu" and (layout := _int4_layout(linear.in_features)):
        return Int4Linear(linear, *layout)
    return Int8Linear(linear)  # int8, or int4 where its kernel's layout or device does not fit


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    owner = root
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, leaf, module)


def quantize_linear_layers(model: nn.Module, bits: int) -> int:
    """Quantize every Linear of the transformer blocks to `bits`, and the output head and input embeddings to int8.

    The head and embeddings stay at 8 bits: they hold a large share of a small model's weights and are the most
    sensitive to rounding. Returns how many modules were replaced.
    """
    replaced = 0
    head = getattr(model, "lm_head", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(head, nn.Linear) and isinstance(embeddings, nn.Embedding) and head.weight is embeddings.weight
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Linear) and child.weight.device.type != "meta":
            _replace(model, name, Int8Linear(child) if child is head else _quantized(child, bits))
            replaced += 1
    if isinstance(embeddings, nn.Embedding):
        for name, child in list(model.named_modules()):
            if child is embeddings:
                table = Int8Embedding(child)
                _replace(model, name, table)
                replaced += 1
                if tied:  # one int8 table serves both, as the bf16 weight did
                    model.lm_head.weight_int8, model.lm_head.scales = table.weight_int8, table.scales
                break
    log.info("quantized %d modules (blocks int%d, head and embeddings int8)", replaced, bits)
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights included)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.inference_mode()
def greedy_agreement(reference: nn.Module, candidate: nn.Module, sequences: list[list[int]], prompt_lengths: list[int]):
    """Share of positions where `candidate`'s greedy next token equals `reference`'s, teacher-forced on `sequences`
    (each a prompt followed by the reference's own greedy continuation), counted over the continuation part."""
    agree = total = 0
    for ids, start in zip(sequences, prompt_lengths, strict=True):
        x = torch.tensor([ids])
        want = reference(input_ids=x).logits[0, start - 1 : -1].argmax(-1)
        got = candidate(input_ids=x).logits[0, start - 1 : -1].argmax(-1)
        agree += int((want == got).sum())
        total += len(want)
    return agree / max(total, 1)
