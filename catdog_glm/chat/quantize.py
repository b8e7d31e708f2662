"""Weight-only int8 / int4 quantization of the Linear layers inside the transformer blocks.

Written here because no maintained library does it on the CPU for transformers 5 without CUDA (bitsandbytes and
ChatGLM3's own `.quantize()` need CUDA; torchao's int8 weight-only path measured slower than bf16 here).
On the CPU the layers run catdog's own kernels (chat/kernels: int4 in groups of 32 as llama.cpp's Q4_0, int8 rows,
both multiplied with int8 activations by VNNI); where those cannot be built, torch's own kernels:
`aten._weight_int8pack_mm` (per-channel int8) and `aten._weight_int4pack_mm_for_cpu` (group-wise int4, with its own
packing, made by `TorchInt4Linear`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


# Quantizing works on blocks of rows so that a 27392 x 4096 weight never needs more than a few MB of float
# temporaries: at the size users run, loading holds one source tensor plus the quantized model, nothing more.
ROW_BLOCK = 1024


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 rows, fp32 scale per row)."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, ROW_BLOCK):
        w = weight[start : start + ROW_BLOCK].detach().to(torch.float32, copy=True)
        s = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q[start : start + ROW_BLOCK] = w.div_(s[:, None]).round_().clamp_(-128, 127)
        scales[start : start + ROW_BLOCK] = s
    return q, scales


# Groups of 32 weights per scale: on SmolLM2 greedy next-token agreement with bf16 was 96% at 32, 70-82% with
# groups of 64/128 (measured with benchmarks/bench_chat.py's prompts), for 0.35x instead of 0.33x of bf16 memory.
INT4_GROUP = 32
INT4_TILES = 8  # inner k tiles of torch's CPU int4 packing: the CPU layout ignores it (same bytes for 2, 4, 8)


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether torch's CPU int4 kernel takes this shape (else the layer stays int8)."""
    return in_features % INT4_GROUP == 0 and out_features % 16 == 0


def quantize_int4_groups(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 in torch's CPU packing: (uint8 [n, k/2], scales_and_zeros [k/group, n, 2] fp32).

    Packed a block of rows at a time: the CPU packing of rows is independent in blocks of 16 rows."""
    n, k = weight.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    scales_and_zeros = torch.empty((k // group, n, 2), dtype=torch.float32)
    for start in range(0, n, ROW_BLOCK):
        rows = weight[start : start + ROW_BLOCK].detach().to(torch.float32, copy=True)
        m = rows.shape[0]
        chunks = rows.reshape(-1, group)
        low, high = chunks.amin(dim=1, keepdim=True), chunks.amax(dim=1, keepdim=True)
        scales = (high - low).clamp_(min=1e-6).div_(15)
        zeros = low + scales * 8
        q = chunks.sub_(low).div_(scales).round_().clamp_(0, 15).to(torch.int32).reshape(m, k)
        packed[start : start + m] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_TILES)
        scales_and_zeros[:, start : start + m, 0] = scales.reshape(m, -1).t()
        scales_and_zeros[:, start : start + m, 1] = zeros.reshape(m, -1).t()
    return packed, scales_and_zeros


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)


class Int8Linear(nn.Module):
    """y = x @ (int8 W * per-row scale)^T + b, through torch's int8 weight-only kernel."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = _frozen(bias)
        self.out_features, self.in_features = weight_int8.shape
        self.use_catdog_kernel = q4_fits(self.in_features) and catdog_kernels()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=None) -> Int8Linear:
        weight_int8, scales = quantize_int8_rows(weight)
        dtype = dtype or weight.dtype
        return cls(weight_int8, scales.to(dtype), None if bias is None else bias.to(dtype))

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, dtype) -> Int8Linear:
        """A shell on the meta device, filled later from a cached conversion."""
        with torch.device("meta"):
            return cls(
                torch.empty(out_features, in_features, dtype=torch.int8),
                torch.empty(out_features, dtype=dtype),
                torch.empty(out_features, dtype=dtype) if bias else None,
            )

    def forward(self, x: torch.Tensor, path: int = 0) -> torch.Tensor:
        """path: which kernel catdog's takes (chat/kernels: AUTO, FEW_ROWS, MANY_ROWS); torch's has one."""
        if x.device.type != "cpu":  # the packed kernel is CPU-only; elsewhere dequantize on the fly
            y = x @ (self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None]).t()
        elif self.use_catdog_kernel:
            return torch.ops.catdog.q8_linear(x, self.weight_int8, self.scales, self.bias, path)
        else:
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def catdog_kernels() -> bool:
    """Whether catdog's CPU kernels run here (built and self-checked once per process; else torch's kernels)."""
    from catdog_glm.chat import kernels

    return kernels.available()


def q4_fits(in_features: int) -> bool:
    """Whether catdog's int4 layout takes rows of this length (whole chunks of 64 weights)."""
    return in_features % 64 == 0


# A weight whose rows already lie on an asymmetric 4-bit grid of 32 (q * d + m: a model that was a Q4_1 GGUF, as the
# embedded SmolLM2) loses almost nothing requantized that way (relative error ~2e-6 there), while the symmetric
# format's rounding costs ~6e-3 (greedy agreement with bf16: 100% against 75% on SmolLM2). Weights of an fp16/bf16
# checkpoint sit at ~5e-3 either way and take the smaller symmetric format.
ON_GRID_ERROR = 1e-4
GRID_PROBE_ROWS = 64


def lies_on_asymmetric_grid(weight: torch.Tensor) -> bool:
    """Whether the first rows of `weight` are reproduced by asymmetric int4 groups of 32 (fp16 scale and min)."""
    rows = weight[:GRID_PROBE_ROWS].detach().float()
    packed, scales, mins = torch.ops.catdog.q4_quantize(rows, True)
    error = (torch.ops.catdog.q4_dequantize(packed, scales, mins, torch.float32) - rows).pow(2).mean()
    return bool(error <= ON_GRID_ERROR * rows.pow(2).mean().clamp(min=1e-30))


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int4 in groups of 32 in catdog's packing: (uint8 [n, k/2], fp16 scales [n, k/32], fp16 mins [n, k/32] or
    None): symmetric (4.5 bits a weight), or asymmetric (5 bits) for weights already on such a grid. A block of rows
    at a time, so that no more than a few MB of float temporaries exist; both cores quantize each block."""
    n, k = weight.shape
    asymmetric = lies_on_asymmetric_grid(weight)
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    scales = torch.empty((n, k // INT4_GROUP), dtype=torch.float16)
    mins = torch.empty((n, k // INT4_GROUP), dtype=torch.float16) if asymmetric else None
    for start in range(0, n, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        block_packed, block_scales, block_mins = torch.ops.catdog.q4_quantize(weight[rows].detach(), asymmetric)
        packed[rows], scales[rows] = block_packed, block_scales
        if asymmetric:
            mins[rows] = block_mins
    return packed, scales, mins


class Int4Linear(nn.Module):
    """int4 weights in groups of 32 through catdog's CPU kernel (`catdog::q4_linear`): symmetric, 4.5 bits a weight,
    or with a min per group too (`mins`, 5 bits) for weights that already lie on such a grid (see quantize_q4)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None, mins: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)  # None: symmetric, and then absent from the state dict
        self.bias = _frozen(bias)
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=None) -> Int4Linear:
        packed, scales, mins = quantize_q4(weight)
        dtype = dtype or weight.dtype
        return cls(packed, scales, None if bias is None else bias.to(dtype), mins)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, dtype) -> Int4Linear:
        with torch.device("meta"):
            return cls(
                torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                torch.empty(out_features, in_features // INT4_GROUP, dtype=torch.float16),
                torch.empty(out_features, dtype=dtype) if bias else None,
            )

    def forward(self, x: torch.Tensor, path: int = 0) -> torch.Tensor:
        """path: which kernel runs (chat/kernels: AUTO by row count, FEW_ROWS, MANY_ROWS)."""
        if x.device.type != "cpu":  # the kernel is CPU-only; elsewhere dequantize on the fly
            from catdog_glm.chat.kernels.reference import dequantize_q4

            mins = None if self.mins is None else self.mins.cpu()
            weight = dequantize_q4(self.qweight.cpu(), self.scales.cpu(), mins).to(x.device, x.dtype)
            y = x @ weight.t()
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return torch.ops.catdog.q4_linear(x, self.qweight, self.scales, self.mins, self.bias, path)


class TorchInt4Linear(nn.Module):
    """Group-wise asymmetric int4 weights through torch's CPU int4 kernel (where catdog's kernels cannot be built)."""

    def __init__(
        self, weight_int4: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.register_buffer("weight_int4", weight_int4)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = _frozen(bias)
        self.group = group
        self.out_features, self.in_features = weight_int4.shape[0], weight_int4.shape[1] * 2

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=None) -> TorchInt4Linear:
        packed, scales_and_zeros = quantize_int4_groups(weight, INT4_GROUP)
        dtype = dtype or weight.dtype
        return cls(packed, scales_and_zeros.to(dtype), INT4_GROUP, None if bias is None else bias.to(dtype))

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, dtype) -> TorchInt4Linear:
        with torch.device("meta"):
            return cls(
                torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                torch.empty(in_features // INT4_GROUP, out_features, 2, dtype=dtype),
                INT4_GROUP,
                torch.empty(out_features, dtype=dtype) if bias else None,
            )

    def forward(self, x: torch.Tensor, path: int = 0) -> torch.Tensor:  # one kernel: `path` changes nothing
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight_int4, self.group, self.scales_and_zeros.to(x.dtype)
        )
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with a per-row scale, dequantized on lookup."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.num_embeddings, self.embedding_dim = weight_int8.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype=None) -> Int8Embedding:
        weight_int8, scales = quantize_int8_rows(weight)
        return cls(weight_int8, scales.to(dtype or weight.dtype))

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, dtype) -> Int8Embedding:
        with torch.device("meta"):
            return cls(
                torch.empty(num_embeddings, embedding_dim, dtype=torch.int8), torch.empty(num_embeddings, dtype=dtype)
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


class Int4Embedding(nn.Module):
    """An embedding table in catdog's int4 layout (as Int4Linear), dequantized on lookup: for untied input
    embeddings of `--quantize 4` models (as llama.cpp's Q4_0 keeps token_embd), which would otherwise be the one
    large table left at 8 bits (ChatGLM3-6B: 254 MB of its 3.4 GB)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype, mins: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        # one element whose dtype is the lookup's: kept with the weights, so a cached conversion knows it too
        self.register_buffer("output_dtype", torch.zeros(1, dtype=dtype))
        self.num_embeddings, self.embedding_dim = qweight.shape[0], qweight.shape[1] * 2

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype=None) -> Int4Embedding:
        packed, scales, mins = quantize_q4(weight)
        return cls(packed, scales, dtype or weight.dtype, mins)

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, dtype) -> Int4Embedding:
        with torch.device("meta"):
            return cls(
                torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8),
                torch.empty(num_embeddings, embedding_dim // INT4_GROUP, dtype=torch.float16),
                dtype,
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        mins = None if self.mins is None else self.mins[flat]
        rows = torch.ops.catdog.q4_dequantize(self.qweight[flat], self.scales[flat], mins, self.output_dtype.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)


def expect_optional_buffers(model: nn.Module, names: set[str]) -> None:
    """Before filling a shell from a cached conversion: give int4 modules whose cached weights carry `mins` (weights
    that were on an asymmetric grid) an empty slot for them, so that loading expects them."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if leaf == "mins":
            try:
                module = model.get_submodule(owner)
            except AttributeError:  # not a module of this model: loading then reports the weight as unexpected
                continue
            if isinstance(module, (Int4Linear, Int4Embedding)) and module.mins is None:
                module.mins = torch.empty(module.scales.shape, dtype=torch.float16, device="meta")


def embedding_kind(bits: int, embedding_dim: int, tied: bool) -> type[nn.Module]:
    """Int4 for an untied table of a --quantize 4 model where catdog's kernels run, else int8 (a table tied to the
    output head stays int8: the head is the layer most sensitive to rounding)."""
    if bits == 4 and not tied and q4_fits(embedding_dim) and catdog_kernels():
        return Int4Embedding
    return Int8Embedding


def int4_kind(out_features: int, in_features: int) -> type[nn.Module] | None:
    """The int4 Linear that runs here for this shape: catdog's, torch's, or None (the layer stays int8)."""
    if q4_fits(in_features) and catdog_kernels():
        return Int4Linear
    if int4_fits(out_features, in_features):
        return TorchInt4Linear
    return None


def backend(device_type: str, bits: int) -> str:
    """Which implementation `--quantize bits` gets on a device: catdog's CPU kernels (else torch's own packed
    kernels) on the CPU, bitsandbytes (NF4 for 4 bits, LLM.int8 for 8, as transformers' BitsAndBytesConfig uses
    them) on CUDA, where the CPU kernels do not run; elsewhere int8 weights dequantized in every forward."""
    if device_type == "cpu":
        return f"catdog-int{bits}-cpu" if catdog_kernels() else f"torch-int{bits}-cpu"
    if device_type == "cuda":
        return "bitsandbytes-nf4" if bits == 4 else "bitsandbytes-int8"
    return "int8-dequantize"


def bitsandbytes_linear(weight: torch.Tensor, bias: torch.Tensor | None, bits: int, dtype, device) -> nn.Module:
    """A bitsandbytes 4-bit NF4 (or 8-bit) Linear holding `weight`, quantized as it moves to `device`."""
    from catdog_glm.errors import ModelError

    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ModelError(
            "--quantize on a CUDA GPU uses bitsandbytes: pip install bitsandbytes (or drop --quantize)"
        ) from e
    out_features, in_features = weight.shape
    weight = weight.detach().to(dtype, copy=True)
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=dtype, quant_type="nf4", device="meta"
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype, copy=True), requires_grad=False)
    return layer.to(device)


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, bits: int, *, head: bool = False, dtype=None, device=None
) -> nn.Module:
    """The quantized replacement of one Linear, on `device` (default: where the weight is). On the CPU: int4 where
    `bits` is 4 and an int4 kernel takes the shape (catdog's, else torch's), else int8; the output head always int8
    (the layer most sensitive to rounding). On CUDA: bitsandbytes, the head kept in `dtype` as transformers does."""
    device = torch.device(device or weight.device)
    dtype = dtype or weight.dtype
    if device.type == "cuda":
        if head:
            return _dense(weight, bias, dtype, device)
        return bitsandbytes_linear(weight, bias, bits, dtype, device)
    kind = int4_kind(*weight.shape) if bits == 4 and not head and weight.device.type == "cpu" else None
    return (kind or Int8Linear).quantize(weight, bias, dtype)


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, dtype, device) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach().to(device, dtype, copy=True), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device, dtype, copy=True), requires_grad=False)
    return layer


def quantized_shell(linear: nn.Linear, bits: int, *, head: bool = False, dtype=None) -> nn.Module:
    """An empty quantized module of the kind `quantized_linear` makes for this Linear (for a cached conversion)."""
    kind = int4_kind(linear.out_features, linear.in_features) if bits == 4 and not head else None
    return (kind or Int8Linear).empty(
        linear.out_features, linear.in_features, linear.bias is not None, dtype or linear.weight.dtype
    )


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    owner = root
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, leaf, module)


def quantize_linear_layers(model: nn.Module, bits: int) -> int:
    """Quantize every Linear of the transformer blocks to `bits`, the output head to int8 and the input embeddings
    to int8 (int4 when untied, bits is 4 and catdog's kernels run: see Int4Embedding).

    The head stays at 8 bits: it holds a large share of a small model's weights and is the most sensitive to
    rounding. Returns how many modules were replaced.
    """
    replaced = 0
    head = getattr(model, "lm_head", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(head, nn.Linear) and isinstance(embeddings, nn.Embedding) and head.weight is embeddings.weight
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Linear) and child.weight.device.type != "meta":
            _replace(model, name, quantized_linear(child.weight, child.bias, bits, head=child is head))
            replaced += 1
    if isinstance(embeddings, nn.Embedding):
        for name, child in list(model.named_modules()):
            if child is embeddings:
                table = embedding_kind(bits, child.embedding_dim, tied).quantize(child.weight)
                _replace(model, name, table)
                replaced += 1
                if tied:  # one int8 table serves both, as the bf16 weight did
                    model.lm_head.weight_int8, model.lm_head.scales = table.weight_int8, table.scales
                break
    log.info("quantized %d modules (blocks int%d, head int8)", replaced, bits)
    return replaced


def quantize_shell(model: nn.Module, bits: int) -> nn.Module:
    """Replace the Linear and Embedding modules of a meta-device model by empty quantized modules of the kinds
    `quantize_linear_layers` would make, ready to be filled from a cached conversion."""
    head = getattr(model, "lm_head", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(head, nn.Linear) and isinstance(embeddings, nn.Embedding) and head.weight is embeddings.weight
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Linear):
            _replace(model, name, quantized_shell(child, bits, head=child is head))
        elif isinstance(child, nn.Embedding):
            kind = embedding_kind(bits, child.embedding_dim, tied)
            _replace(model, name, kind.empty(child.num_embeddings, child.embedding_dim, child.weight.dtype))
    return model


def parameter_count(model: nn.Module) -> int:
    """The model's parameter count as published (a quantized matrix counts as its full-precision shape)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear, TorchInt4Linear)) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        ):
            total += module.out_features * module.in_features
            total += 0 if getattr(module, "bias", None) is None else module.bias.numel()
            continue
        if isinstance(module, (Int8Embedding, Int4Embedding)):
            total += module.num_embeddings * module.embedding_dim
        total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


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
