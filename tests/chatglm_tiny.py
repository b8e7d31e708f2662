"""A tiny random ChatGLM3 checkpoint in the official layout (config names, weight names, shards + index), with a
SentencePiece model trained here, and an independent plain-torch forward of the ChatGLM3 block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

CORPUS = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "What is the capital of France? Paris is the capital of France.",
    "你好，很高兴认识你。今天天气很好。",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "def main():\n\treturn 42  # code with tabs and   spaces",
    "猫和狗是人类的好朋友。",
] * 20

CONFIG = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 96,
    "layernorm_epsilon": 1e-5,
    "seq_length": 256,
    "add_qkv_bias": True,
    "rmsnorm": True,
    "rope_ratio": 1,
}


# ChatGLM3's tokenizer.model keeps text as written (no NFKC, spaces not collapsed); SentencePiece's defaults differ.
CHATGLM3_NORMALIZER = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False}


def train_tokenizer(folder: Path, **normalizer) -> int:
    """A 400-piece BPE SentencePiece model with byte fallback, like ChatGLM3's in kind (keyword args: normalizer)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **normalizer,
    )
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return sp.get_piece_size()


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v, f = cfg["hidden_size"], cfg["padded_vocab_size"], cfg["ffn_hidden_size"]
    d, nh, ng = cfg["kv_channels"], cfg["num_attention_heads"], cfg["multi_query_group_num"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {
        "transformer.embedding.word_embeddings.weight": rand(v, h, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, d // 2, 2).float() / (d // 2))),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rand(h, scale=0.1)
        w[p + "self_attention.query_key_value.weight"] = rand((nh + 2 * ng) * d, h)
        w[p + "self_attention.query_key_value.bias"] = rand((nh + 2 * ng) * d)
        w[p + "self_attention.dense.weight"] = rand(h, nh * d)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(h, scale=0.1)
        w[p + "mlp.dense_h_to_4h.weight"] = rand(2 * f, h)
        w[p + "mlp.dense_4h_to_h.weight"] = rand(h, f)
    w["transformer.encoder.final_layernorm.weight"] = 1 + rand(h, scale=0.1)
    w["transformer.output_layer.weight"] = rand(v, h)
    return w


def make_tiny_chatglm3(folder: Path, fmt: str = "bin", shards: int = 2, **config) -> Path:
    """Write config.json, tokenizer.model and weight shards with their index (fmt: bin or safetensors);
    `config` overrides the tiny sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = train_tokenizer(folder, **CHATGLM3_NORMALIZER)
    cfg = dict(CONFIG, padded_vocab_size=int(math.ceil((pieces + 9) / 64) * 64)) | config
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "modeling_chatglm.py").write_text("raise RuntimeError('remote code must never run')\n")
    weights = random_weights(cfg)
    names = list(weights)
    parts = [names[i * len(names) // shards : (i + 1) * len(names) // shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        if fmt == "bin":
            shard = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
            torch.save({n: weights[n] for n in part}, folder / shard)
        else:
            from safetensors.torch import save_file

            shard = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({n: weights[n].contiguous() for n in part}, str(folder / shard))
        weight_map |= dict.fromkeys(part, shard)
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference_logits(weights: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """ChatGLM3's forward written from its description: fused qkv, interleaved rotary on half the head dim,
    grouped kv, SwiGLU with the gate first, RMSNorm. Plain torch, fp32, no transformers."""
    d, nh, ng = cfg["kv_channels"], cfg["num_attention_heads"], cfg["multi_query_group_num"]
    eps = cfg["layernorm_epsilon"]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotary(x):  # x: [T, heads, d]; rotate the first d/2 dims in interleaved pairs
        t = x.shape[0]
        rot = d // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
        angles = torch.outer(torch.arange(t).float(), inv_freq)  # [T, rot/2]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        return torch.cat([out, x_pass], dim=-1)

    x = weights["transformer.embedding.word_embeddings.weight"][ids]
    t = len(ids)
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms(x, weights[p + "input_layernorm.weight"])
        qkv = (
            h @ weights[p + "self_attention.query_key_value.weight"].T
            + weights[p + "self_attention.query_key_value.bias"]
        )
        q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
        q, k, v = rotary(q.view(t, nh, d)), rotary(k.view(t, ng, d)), v.view(t, ng, d)
        k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, nh * d)
        x = x + attn @ weights[p + "self_attention.dense.weight"].T
        h = rms(x, weights[p + "post_attention_layernorm.weight"])
        gate, up = (h @ weights[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ weights[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, weights["transformer.encoder.final_layernorm.weight"])
    return x @ weights["transformer.output_layer.weight"].T
