"""catdog's CPU kernels (chat/kernels) against the plain reference: odd shapes, 1-16 and 256 rows, 1 and 2 threads,
every instruction-set path this CPU has, and the fallback to torch's kernels without a compiler."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from catdog_glm.chat import kernels
from catdog_glm.chat.kernels import reference
from tests.conftest import catdog_env

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"catdog kernels not built: {kernels.status()}")

# K: a multiple of 128, one that ends with a chunk of 64, SmolLM2's 576 and ChatGLM3's 13696 (107 x 128)
SHAPES = [(7, 128), (33, 192), (64, 576), (5, 13696)]
ROWS = [1, 2, 3, 4, 5, 9, 16]


@pytest.fixture(params=kernels.load().supported_isas() if kernels.available() else [])
def isa(request):
    module = kernels.load()
    chosen = module.isa()
    module.set_isa(request.param)
    yield request.param
    module.set_isa(chosen)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * scale)


def _q4(n: int, k: int, seed: int = 0):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, scales, _ = torch.ops.catdog.q4_quantize(weight)
    return weight, packed, scales


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("asymmetric", [False, True])
def test_int4_few_rows_match_the_reference_on_every_path(isa, n, k, asymmetric):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.01
    packed, scales, mins = torch.ops.catdog.q4_quantize(weight, asymmetric)
    mins = mins if asymmetric else None
    bias = torch.randn(n)
    for rows in ROWS:
        x = torch.randn(rows, k)
        got = torch.ops.catdog.q4_linear(x, packed, scales, mins, bias)
        _close(got, reference.q4_linear(x, packed, scales, mins, bias=bias))


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_few_rows_match_the_reference_on_every_path(isa, n, k):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, generator=generator) / 100
    for rows in ROWS:
        x = torch.randn(rows, k, generator=generator)
        _close(torch.ops.catdog.q8_linear(x, weight, scales), reference.q8_linear(x, weight, scales))


def test_many_rows_go_through_dequantized_weights_and_a_float_gemm():
    _, packed, scales = _q4(48, 576)
    x = torch.randn(256, 576)
    want = x @ reference.dequantize_q4(packed, scales).t()
    _close(torch.ops.catdog.q4_linear(x, packed, scales), want)
    # bf16 activations: the weights dequantized to bf16, the GEMM in bf16
    got = torch.ops.catdog.q4_linear(x.bfloat16(), packed, scales)
    assert got.dtype == torch.bfloat16
    _close(got, want, rtol=2e-2)


def test_one_and_two_threads_give_identical_results():
    _, packed, scales = _q4(96, 4096)
    x = torch.randn(3, 4096)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.catdog.q4_linear(x, packed, scales)
        torch.set_num_threads(2)
        two = torch.ops.catdog.q4_linear(x, packed, scales)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is summed by one thread in one order


def test_activations_keep_their_dtype_and_shape():
    _, packed, scales = _q4(16, 128)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = torch.ops.catdog.q4_linear(x, packed, scales)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    _close(y, reference.q4_linear(x.float(), packed, scales), rtol=1e-2)


def test_the_int4_layout_round_trips_and_dequantizes_exactly():
    weight, packed, scales = _q4(20, 192)
    levels = reference.unpack_q4(packed)
    assert levels.min() >= 0 and levels.max() <= 15
    assert torch.equal(reference.pack_q4(levels), packed)
    want = reference.dequantize_q4(packed, scales)
    assert torch.equal(torch.ops.catdog.q4_dequantize(packed, scales, None, torch.float32), want)
    assert torch.equal(torch.ops.catdog.q4_dequantize(packed, scales, None, torch.bfloat16), want.bfloat16())


def test_weights_already_on_an_asymmetric_grid_are_kept_exactly():
    """A Q4_1-style source (q * d + m per 32, as the embedded SmolLM2's GGUF) is requantized onto the same grid;
    other weights take the symmetric 4.5-bit format."""
    from catdog_glm.chat.quantize import quantize_q4

    generator = torch.Generator().manual_seed(4)
    d = (torch.rand(96, 6, 1, generator=generator) * 0.01).half().float()
    m = (-torch.rand(96, 6, 1, generator=generator) * 0.05).half().float()
    levels = torch.randint(0, 16, (96, 6, 32), generator=generator).float()
    levels[:, :, 0], levels[:, :, 1] = 0, 15  # each group spans its grid, as a quantizer's output does
    on_grid = (levels * d + m).reshape(96, 192)
    packed, scales, mins = quantize_q4(on_grid)
    assert mins is not None
    torch.testing.assert_close(reference.dequantize_q4(packed, scales, mins), on_grid, rtol=0, atol=1e-6)
    assert torch.equal(
        torch.ops.catdog.q4_dequantize(packed, scales, mins, torch.float32),
        reference.dequantize_q4(packed, scales, mins),
    )
    _, _, none = quantize_q4(torch.randn(96, 192, generator=generator))
    assert none is None


def test_the_quantizer_beats_plain_rounding_of_max_to_minus_eight():
    """The least-squares choice of each group's scale (as llama.cpp's make_qx_quants) against Q4_0's plain rule."""
    weight, packed, scales = _q4(256, 512, seed=3)
    ours = (reference.dequantize_q4(packed, scales) - weight).pow(2).mean()
    groups = weight.reshape(-1, 32)
    biggest = groups.gather(1, groups.abs().argmax(1, keepdim=True))
    d = biggest / -8
    plain_levels = torch.round(groups / d).clamp(-8, 7)
    plain = (plain_levels * d - groups).pow(2).mean()
    assert ours < 0.9 * plain
    assert ours / weight.pow(2).mean() < 0.01  # 4 bits: about 1% of the weights' energy


def test_the_ops_have_shapes_for_torch_compile():
    _, packed, scales = _q4(16, 128)
    x = torch.randn(3, 128)
    torch.library.opcheck(
        torch.ops.catdog.q4_linear.default, (x, packed, scales, None, None), test_utils="test_faketensor"
    )
    weight = torch.randint(-127, 128, (16, 128), dtype=torch.int8)
    torch.library.opcheck(
        torch.ops.catdog.q8_linear.default, (x, weight, torch.rand(16), None), test_utils="test_faketensor"
    )


def _attention_case(batch, heads, kv_heads, head_dim, dtype, seed=0, layers=3):
    generator = torch.Generator().manual_seed(seed)
    lengths = [(7 * b + 3 * seed) % 50 for b in range(batch)]  # ragged, an empty cache among them
    q = torch.randn(batch, heads, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    caches = [
        torch.randn(layers, 2, kv_heads, n + 1 + b % 3, head_dim, generator=generator).to(dtype)
        for b, n in enumerate(lengths)
    ]
    return q, k, v, caches, lengths


# head_dim: SmolLM2's 64, ChatGLM3's 128 and an odd one (the plain loop); heads per key head: 1, 3 (SmolLM2), 16 (GLM)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (9, 3, 64), (32, 2, 128), (6, 2, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_decode_attention_matches_sdpa_per_request_on_every_path(isa, heads, kv_heads, head_dim, dtype, batch):
    q, k, v, caches, lengths = _attention_case(batch, heads, kv_heads, head_dim, dtype)
    want_caches = [c.clone() for c in caches]
    got = torch.ops.catdog.decode_attention(q, k, v, caches, 1, lengths, head_dim**-0.5)
    want = reference.decode_attention(q, k, v, want_caches, 1, lengths, head_dim**-0.5)
    _close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert got.dtype == dtype
    for got_cache, want_cache in zip(caches, want_caches, strict=True):  # the new key/value written, nothing else
        assert torch.equal(got_cache, want_cache)


def test_decode_attention_gives_the_same_numbers_on_one_and_two_threads():
    q, k, v, caches, lengths = _attention_case(7, 9, 3, 64, torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.catdog.decode_attention(q, k, v, [c.clone() for c in caches], 0, lengths, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_decode_attention_refuses_a_full_cache_and_mismatched_inputs():
    q, k, v, caches, lengths = _attention_case(2, 4, 2, 64, torch.float32)
    full = [c[:, :, :, :n].contiguous() for c, n in zip(caches, lengths, strict=True)]
    full[0] = caches[0]
    with pytest.raises(RuntimeError, match="is full"):
        torch.ops.catdog.decode_attention(q, k, v, full, 0, lengths, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        torch.ops.catdog.decode_attention(q[:, :3], k, v, caches, 0, lengths, 0.125)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.catdog.decode_attention(q, k.double(), v, caches, 0, lengths, 0.125)
    with pytest.raises(RuntimeError, match="one cache and one length"):
        torch.ops.catdog.decode_attention(q, k, v, caches[:1], 0, lengths, 0.125)
    torch.library.opcheck(
        torch.ops.catdog.decode_attention.default, (q, k, v, caches, 0, lengths, 0.125), test_utils="test_faketensor"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [576, 4096, 37])  # SmolLM2, ChatGLM3, odd
def test_fused_rms_norm_matches_the_transformers_module(isa, dtype, width):
    from transformers.models.glm.modeling_glm import GlmRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(width)
    x, delta = (torch.randn(3, 19, width, generator=generator).to(dtype) for _ in range(2))
    for norm in (LlamaRMSNorm(width, eps=1e-5), GlmRMSNorm(width, eps=1e-6)):
        norm.weight.data = torch.rand(width, generator=generator) + 0.5
        norm.to(dtype).requires_grad_(False)
        want = norm(x + delta)
        total, got = torch.ops.catdog.add_rms_norm(x, delta, norm.weight, norm.variance_epsilon)
        assert torch.equal(total, x + delta)
        # the mean square in double against torch's fp32 sum: at most one rounding apart (in bf16, rarely)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp)
        if dtype == torch.bfloat16:
            assert (got != want).float().mean() < 0.01
        plain = torch.ops.catdog.rms_norm(x, norm.weight, norm.variance_epsilon)
        torch.testing.assert_close(plain, norm(x), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_embeddings_match_llama_and_glm_exactly(isa, dtype):
    from transformers.models.glm import modeling_glm
    from transformers.models.llama import modeling_llama

    generator = torch.Generator().manual_seed(3)
    positions = torch.arange(11)[None]
    for module, head_dim, width, interleaved in ((modeling_llama, 64, 64, False), (modeling_glm, 128, 64, True)):
        q = torch.randn(11, 32, head_dim, generator=generator).to(dtype)
        k = torch.randn(11, 2, head_dim, generator=generator).to(dtype)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, width, 2).float() / width))
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # [1, tokens, width], as rotary_emb returns
        want_q, want_k = module.apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
        torch.ops.catdog.rope_(q, k, cos[0].contiguous(), sin[0].contiguous(), interleaved)
        assert torch.equal(q, want_q[0]) and torch.equal(k, want_k[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_times_up_matches_the_mlp(isa, dtype):
    generator = torch.Generator().manual_seed(5)
    gate_up = torch.randn(7, 2 * 1539, generator=generator).to(dtype) * 6  # an odd width: the vector loop's tail
    gate, up = gate_up.chunk(2, dim=-1)
    want = up * torch.nn.functional.silu(gate)
    got = torch.ops.catdog.silu_mul(gate_up)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:  # the vectorized exp is within ~1e-7 of libm's
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for op, args in (
        (torch.ops.catdog.silu_mul.default, (gate_up,)),
        (torch.ops.catdog.rms_norm.default, (gate, torch.ones(1539, dtype=dtype), 1e-6)),
    ):
        torch.library.opcheck(op, args, test_utils="test_faketensor")


def test_a_kernel_that_disagrees_with_the_reference_is_not_used(monkeypatch):
    monkeypatch.setattr(
        reference, "q4_linear", lambda x, w, s, mins=None, bias=None: torch.zeros(x.shape[0], w.shape[0])
    )
    problem = kernels.self_check(kernels.load())
    assert problem and "int4 kernel disagrees" in problem


FALLBACK_CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from catdog_glm.chat import kernels
from catdog_glm.chat.loading import load_chat_model
from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.quantize import TorchInt4Linear
chat = load_chat_model(sys.argv[1], dtype="fp32", quantize=4)
kinds = sorted({type(m).__name__ for m in chat.model.modules()})
engine = ChatEngine(chat)
reply = engine.chat([{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=4)
engine.close()
print(json.dumps({"status": kernels.status(), "kinds": kinds, "tokens": reply.completion_tokens}))
"""


def test_without_a_compiler_one_line_says_so_and_torch_kernels_run(tmp_path):
    from tests.chatglm_tiny import make_tiny_chatglm3

    folder = make_tiny_chatglm3(tmp_path / "model", "safetensors", shards=1)
    env = catdog_env() | {
        "CATDOG_CACHE_DIR": str(tmp_path / "cache"),
        "CATDOG_KERNELS_DIR": str(tmp_path / "kernels"),
        "CXX": str(tmp_path / "no-such-compiler"),
    }
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_CHILD, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"]["kernels"] == "torch" and "could not build" in result["status"]["why_not"]
    assert "TorchInt4Linear" in result["kinds"] and "Int4Linear" not in result["kinds"]
    assert result["tokens"] >= 1
    warnings = [line for line in done.stderr.splitlines() if "kernels are not used" in line]
    assert len(warnings) == 1, done.stderr[-2000:]
