"""`--quantize` on a GPU is real 4-bit: bitsandbytes NF4 (or LLM.int8) on CUDA, torch's packed kernels on the CPU.

The CUDA tests need a GPU and are skipped without one; the layer construction and the selection are tested here
on the CPU, where bitsandbytes runs the same code (slowly)."""

from __future__ import annotations

import sys

import pytest
import torch

from catdog_glm.chat.quantize import backend, bitsandbytes_linear, parameter_count, quantized_linear
from catdog_glm.errors import ModelError
from tests.chatglm_tiny import make_tiny_chatglm3

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_each_device_gets_its_quantization_backend():
    from catdog_glm.chat import kernels

    cpu = "catdog" if kernels.available() else "torch"
    assert backend("cpu", 4) == f"{cpu}-int4-cpu" and backend("cpu", 8) == f"{cpu}-int8-cpu"
    assert backend("cuda", 4) == "bitsandbytes-nf4" and backend("cuda", 8) == "bitsandbytes-int8"
    assert backend("mps", 4) == "int8-dequantize"


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_layers_hold_the_weight_at_the_asked_bits(bits):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight, bias, x = torch.randn(64, 128) * 0.05, torch.randn(64) * 0.1, torch.randn(3, 128)
    layer = bitsandbytes_linear(weight, bias, bits, torch.float32, "cpu")
    if bits == 4:
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
        assert layer.weight.numel() * layer.weight.element_size() == weight.numel() // 2  # 4 bits a weight
    else:
        assert isinstance(layer, bnb.nn.Linear8bitLt)
    want = x @ weight.T + bias
    with torch.inference_mode():
        got = layer(x)
    assert (got - want).norm() / want.norm() < (0.12 if bits == 4 else 0.03)
    assert parameter_count(torch.nn.Sequential(layer)) == weight.numel() + bias.numel()


def test_the_cpu_keeps_its_own_kernels_and_cuda_without_bitsandbytes_says_what_to_install(monkeypatch):
    weight = torch.randn(64, 128)
    assert type(quantized_linear(weight, None, 4, device="cpu")).__name__ in ("Int4Linear", "TorchInt4Linear")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelError, match="pip install bitsandbytes"):
        quantized_linear(weight, None, 4, device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_chatglm3_streams_onto_the_gpu_quantized(tmp_path, bits):
    import bitsandbytes as bnb

    from catdog_glm.chat.engine import ChatEngine
    from catdog_glm.chat.loading import load_chat_model

    folder = make_tiny_chatglm3(tmp_path / "m", "safetensors", shards=2, hidden_size=128, ffn_hidden_size=256)
    dense = load_chat_model(str(folder), device="cuda", dtype="bf16")
    chat = load_chat_model(str(folder), device="cuda", dtype="bf16", quantize=bits)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    layers = [m for m in chat.model.modules() if isinstance(m, kind)]
    assert len(layers) == 6 * 2  # q k v o gate_up down in each of the 2 layers; the head stays dense
    assert all(p.device.type == "cuda" for p in chat.model.parameters())
    assert chat.info["weight_bytes"] < dense.info["weight_bytes"]
    assert chat.quantization.startswith("nf4" if bits == 4 else "int8")
    reply = ChatEngine(chat).chat([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=8)
    assert reply.completion_tokens > 0
