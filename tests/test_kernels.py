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
