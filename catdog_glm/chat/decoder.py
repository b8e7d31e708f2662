"""The lean decoder: the scheduler's hot loop for the model families we serve, without transformers' per-call
machinery.

transformers' classes still load and check the weights (and serve plain forwards, `generate()` and the tests'
references); this module reads the loaded modules and runs a packed step itself: query/key/value as one matrix
product and gate/up as one (the three and two weights concatenated once, the original modules left as views into
them, so no memory is added), the model family's own rotary function, the attention of every running request in
one call of catdog's decode-attention kernel (each against its own KV cache; prompts through SDPA), the output head
only for the rows that sample. Measured on a 2-core Xeon, a decode step through transformers' modules spent
more time around the matrix products than in them on the 135M SmolLM2 (~8 of 18 ms in int4 kernels), and
~50 ms of a 215 ms ChatGLM3-6B step.

Families: decoder layers of `input_layernorm -> self_attn(q, k, v, o) -> post_attention_layernorm -> mlp` with a
gate/up MLP (Llama, SmolLM2, Qwen2, Mistral without a sliding window, and GLM, which ChatGLM3 loads as); others
(sliding windows, q/k norms, remote code) return None and keep transformers' path.
"""

from __future__ import annotations

import logging
import sys
from functools import partial

import torch
from torch import nn

from catdog_glm.chat.kernels import FEW_ROWS, MANY_ROWS
from catdog_glm.chat.kernels import available as kernels_available
from catdog_glm.chat.quantize import Int4Linear, Int8Linear, TorchInt4Linear

log = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what catdog::decode_attention computes in
ATTRIBUTE = "_catdog_decoder"  # where a model keeps its decoder (built once: building fuses weights in place)


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach() for p in parts], dim=0)


def _fuse(modules: list[nn.Module]) -> nn.Module | None:
    """One module computing the outputs of `modules` side by side (the same input), or None when they are not of
    one fusable kind. The originals are re-pointed at row views of the fused weights, so nothing is held twice."""
    kind = type(modules[0])
    if any(type(m) is not kind for m in modules) or kind not in (nn.Linear, Int4Linear, Int8Linear):
        return None
    biases = [m.bias for m in modules]
    bias = None
    present = [b for b in biases if b is not None]
    if present:
        like = present[0]  # a missing bias is zeros of the others' dtype, on their device
        bias = _concat(
            [b if b is not None else like.new_zeros(m.out_features) for m, b in zip(modules, biases, strict=True)]
        )
    if kind is nn.Linear:
        with torch.device("meta"):
            fused = nn.Linear(modules[0].in_features, sum(m.out_features for m in modules), bias=bias is not None)
        fused.weight = nn.Parameter(_concat([m.weight for m in modules]), requires_grad=False)
        tensors = ["weight"]
    elif kind is Int4Linear:
        if len({m.mins is None for m in modules}) != 1:
            return None
        mins = None if modules[0].mins is None else _concat([m.mins for m in modules])
        fused = Int4Linear(_concat([m.qweight for m in modules]), _concat([m.scales for m in modules]), None, mins)
        tensors = ["qweight", "scales"] + ([] if mins is None else ["mins"])
    else:
        if len({m.scales.dtype for m in modules}) != 1:
            return None
        fused = Int8Linear(_concat([m.weight_int8 for m in modules]), _concat([m.scales for m in modules]))
        tensors = ["weight_int8", "scales"]
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    start = 0
    for module in modules:
        rows = slice(start, start + module.out_features)
        for name in tensors:
            view = getattr(fused, name)[rows]
            if isinstance(getattr(module, name), nn.Parameter):
                setattr(module, name, nn.Parameter(view, requires_grad=False))
            else:
                setattr(module, name, view)
        if module.bias is not None:
            module.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
        start += module.out_features
    return fused


def _project(module: nn.Module, x: torch.Tensor, decode_rows: int) -> torch.Tensor:
    """module(x) for x [1, tokens, features] whose first `decode_rows` rows are decode tokens and the rest prompt
    tokens. catdog's quantized layers are told which kernel each part takes (int8 activations for decode rows, a
    dequantized GEMM for prompt rows) so that a request's numbers never depend on what else shares the step."""
    # called as modules (not .forward): forward hooks a user registered still run
    if not isinstance(module, (Int4Linear, Int8Linear, TorchInt4Linear)):
        return module(x)
    if type(module) is Int4Linear and x.device.type == "cpu" and not _hooked(module):
        # straight to the kernel: a module call and its forward cost ~50 us of Python, 4 calls a layer (SmolLM2:
        # ~0.8 ms of a 10 ms step)
        module = partial(
            torch.ops.catdog.q4_linear, qweight=module.qweight, scales=module.scales, mins=module.mins, bias=module.bias
        )
    tokens = x.shape[1]
    if decode_rows >= tokens:
        return module(x, path=FEW_ROWS)
    if decode_rows == 0:
        return module(x, path=MANY_ROWS)
    return torch.cat([module(x[:, :decode_rows], path=FEW_ROWS), module(x[:, decode_rows:], path=MANY_ROWS)], dim=1)


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as modules

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or modules._global_forward_hooks
        or modules._global_forward_pre_hooks
    )


# RMSNorm modules written as `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`, what catdog::rms_norm computes
_RMS_NORMS = {"LlamaRMSNorm", "GlmRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}


def _rms_norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    if type(norm).__name__ not in _RMS_NORMS or not hasattr(norm, "variance_epsilon"):
        return None
    return norm.weight, float(norm.variance_epsilon)


def _is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


class _Layer:
    """One decoder layer's pieces, read from the transformers module."""

    def __init__(self, layer: nn.Module, index: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.index = index
        self.in_norm = layer.input_layernorm.forward
        self.post_norm = layer.post_attention_layernorm.forward
        self.norm_weights = [_rms_norm_weight(n) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.sizes = [m.out_features for m in projections]
        self.qkv = _fuse(projections)
        self.q, self.k, self.v = projections
        self.o = attn.o_proj
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        if hasattr(mlp, "gate_up_proj"):  # GLM: [gate | up] in one matrix, up * act(gate)
            self.gate_up = mlp.gate_up_proj
            self.act = mlp.activation_fn.forward
            self.silu = _is_silu(mlp.activation_fn)
        else:
            self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
            self.gate, self.up = mlp.gate_proj, mlp.up_proj
            self.act = mlp.act_fn.forward
            self.silu = _is_silu(mlp.act_fn)
        self.down = mlp.down_proj

    def attention_inputs(self, h: torch.Tensor, decode_rows: int):
        if self.qkv is not None:
            return _project(self.qkv, h, decode_rows).split(self.sizes, dim=-1)
        return tuple(_project(m, h, decode_rows) for m in (self.q, self.k, self.v))

    @property
    def fusable(self) -> bool:
        """Whether catdog's fused ops compute this layer's norms and activation (RMSNorm, SiLU, gate/up fused)."""
        return self.silu and self.gate_up is not None and all(w is not None for w in self.norm_weights)

    def mlp(self, h: torch.Tensor, decode_rows: int, fused: bool = False) -> torch.Tensor:
        if fused:
            return _project(self.down, torch.ops.catdog.silu_mul(_project(self.gate_up, h, decode_rows)), decode_rows)
        if self.gate_up is not None:
            gate, up = _project(self.gate_up, h, decode_rows).chunk(2, dim=-1)
        else:
            gate, up = _project(self.gate, h, decode_rows), _project(self.up, h, decode_rows)
        return _project(self.down, up * self.act(gate), decode_rows)


# The families whose decoder layer is exactly what LeanDecoder computes (a family with extra norms, multipliers,
# clipping or per-layer rotary choices, as GLM-4, Granite, OLMo or SmolLM3, keeps transformers' own layers).
FAMILIES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GlmForCausalLM"}


def _supported(model: nn.Module) -> str | None:
    """Why the lean decoder cannot run this model (None: it can)."""
    if type(model).__name__ not in FAMILIES:
        return f"{type(model).__name__} is not one of {', '.join(sorted(FAMILIES))}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return "not a decoder-only transformers model with the usual parts"
    if sys.modules.get(type(model).__module__) is None or not hasattr(
        sys.modules[type(model).__module__], "apply_rotary_pos_emb"
    ):
        return "its modeling module has no apply_rotary_pos_emb"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "its attention is not q/k/v/o projections"
        if getattr(attn, "sliding_window", None) or hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "sliding-window attention or q/k norms"
        gate_up = hasattr(mlp, "gate_up_proj") and hasattr(mlp, "activation_fn")
        separate = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "act_fn"))
        if not (gate_up or separate) or not hasattr(mlp, "down_proj"):
            return "its MLP is not gate/up/down"
        if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
            return "its layers are not pre-norm"
    return None


class LeanDecoder:
    """Runs one packed step of a loaded model: every request's new tokens in one row, logits for the sampling rows."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.embed = inner.embed_tokens.forward
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.forward
        self.head = model.lm_head
        self.rope = sys.modules[type(model).__module__].apply_rotary_pos_emb
        # GLM rotates interleaved pairs over part of each head; Llama, Qwen2 and Mistral the two halves of all of it
        self.interleaved_rope = type(model).__name__ == "GlmForCausalLM"
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.layers = [_Layer(layer, i) for i, layer in enumerate(inner.layers)]
        self.head_dim = self.layers[0].head_dim
        self.fusable = all(layer.fusable for layer in self.layers)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, segments: list, last: torch.Tensor):
        """ids, positions: [tokens]; segments: (start, count, SequenceKV) of each request's tokens in the row, running
        requests (one token each) first; last: the rows whose next token is sampled. Returns logits [len(last),
        vocab]. Writes this step's keys and values into the caches; the caller advances their lengths."""
        from torch.nn.functional import scaled_dot_product_attention

        x = self.embed(ids[None])
        cos, sin = self.rotary(x, positions[None])
        tokens = ids.shape[0]
        grouped = self.kv_heads != self.heads
        decode_rows = 0
        for _, count, _ in segments:
            if count != 1:
                break
            decode_rows += 1
        for _, count, kv in segments:
            kv.ensure(count, self.kv_heads, self.head_dim, x)
        # every running request's attention in one kernel call (catdog's, CPU); prompts and other devices: SDPA
        batched = decode_rows > 0 and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and kernels_available()
        if batched:
            caches = [kv.data for _, _, kv in segments[:decode_rows]]
            lengths = [kv.length for _, _, kv in segments[:decode_rows]]
        # catdog's fused norms, rotary and SiLU on the CPU (a dozen aten ops per call fewer); elsewhere the modules'
        fused = (
            self.fusable
            and x.device.type == "cpu"
            and x.dtype in _KERNEL_DTYPES
            and all(w.dtype == x.dtype for layer in self.layers for w, _ in layer.norm_weights)
            and kernels_available()
        )
        if fused:
            cos, sin = cos[0].contiguous(), sin[0].contiguous()
            weight, eps = self.layers[0].norm_weights[0]
            h = torch.ops.catdog.rms_norm(x, weight, eps)
        for i, layer in enumerate(self.layers):
            if not fused:
                h = layer.in_norm(x)
            q, k, v = layer.attention_inputs(h, decode_rows)
            if fused:
                q = q.reshape(tokens, -1, layer.head_dim).contiguous()
                k = k.reshape(tokens, -1, layer.head_dim).contiguous()
                torch.ops.catdog.rope_(q, k, cos, sin, self.interleaved_rope)
            else:
                # [1, tokens, heads, head_dim]: a token's heads side by side, as the kernel and projections want them
                q, k = self.rope(
                    q.view(1, tokens, -1, layer.head_dim),
                    k.view(1, tokens, -1, layer.head_dim),
                    cos,
                    sin,
                    unsqueeze_dim=2,
                )
                q, k = q[0], k[0]
            v = v.view(tokens, -1, layer.head_dim)
            outputs = []
            each = segments
            if batched:
                attended = torch.ops.catdog.decode_attention(
                    q[:decode_rows], k[:decode_rows], v[:decode_rows], caches, layer.index, lengths, layer.scaling
                )
                outputs.append(attended.view(decode_rows, -1))
                each = segments[decode_rows:]
            for start, count, kv in each:
                span = slice(start, start + count)
                keys, values = kv.write(layer.index, k[span], v[span])
                # a prefill (count > 1) starts from an empty cache, so SDPA's own causal flag is the right mask
                attended = scaled_dot_product_attention(
                    q[span].transpose(0, 1)[None],
                    keys,
                    values,
                    is_causal=count > 1,
                    scale=layer.scaling,
                    enable_gqa=grouped,
                )
                outputs.append(attended[0].transpose(0, 1).reshape(count, -1))
            attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
            attended = _project(layer.o, attended[None], decode_rows)
            if not fused:
                x = x + attended
                x = x + layer.mlp(layer.post_norm(x), decode_rows)
                continue
            weight, eps = layer.norm_weights[1]
            x, h = torch.ops.catdog.add_rms_norm(x, attended, weight, eps)  # residual + attention, then the norm
            out = layer.mlp(h, decode_rows, fused=True)
            if i + 1 < len(self.layers):
                weight, eps = self.layers[i + 1].norm_weights[0]
                x, h = torch.ops.catdog.add_rms_norm(x, out, weight, eps)
            else:
                x = x + out
        rows = last.shape[0]  # one per request: always the few-rows kernel
        return _project(self.head, self.norm(x[:, last]), rows)[0]


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """The model's lean decoder (built on first use, weights fused in place), or None where it cannot run (logged)."""
    if hasattr(model, ATTRIBUTE):
        return getattr(model, ATTRIBUTE)
    reason = _supported(model)
    decoder = None
    if reason is None:
        try:
            # fused weights made outside inference mode (the scheduler steps inside it), so the model's tensors
            # stay ordinary ones that load_state_dict or fine-tuning may update later
            with torch.inference_mode(False), torch.no_grad():
                decoder = LeanDecoder(model)
        except (AttributeError, TypeError, ValueError) as e:  # an unexpected variant of a supported family
            reason = f"{type(e).__name__}: {e}"
    if decoder is None:
        log.info("lean decoder not used for %s (%s): transformers' modules run each step", type(model).__name__, reason)
    object.__setattr__(model, ATTRIBUTE, decoder)  # not a submodule: keeps it out of state_dict() and .to()
    return decoder
