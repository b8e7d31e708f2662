"""Build a full-size ChatGLM3-6B with random weights in THUDM's published layout (7 fp16 `.bin` shards that follow
the real index, the real config), so load time, peak memory and speed can be measured at the size users run.

The layout comes from ../shared/models/chatglm3-6b-layout (config.json, pytorch_model.bin.index.json,
tokenizer_config.json, copied from the real repo). The weights are noise; the tokenizer is a small SentencePiece model
trained here (any model with fewer than 65,024 - 9 pieces fits the embedding table).

    python benchmarks/fullsize_chatglm3.py [OUT_DIR]     # default: $CATDOG_FULLSIZE_DIR or ~/.cache/catdog-glm/fullsize
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO.parent / "shared" / "models" / "chatglm3-6b-layout"
DEFAULT_DIR = Path(
    os.environ.get("CATDOG_FULLSIZE_DIR") or Path.home() / ".cache" / "catdog-glm" / "fullsize" / "chatglm3-6b-random"
)
CORPUS = [
    "hello world, this is a small corpus for a small tokenizer.",
    "What is the capital of France? Paris is the capital of France.",
    "你好，很高兴认识你。今天天气很好。猫和狗是人类的好朋友。",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "def main():\n\treturn 42  # code with tabs and   spaces",
] * 40


def tensor_shape(name: str, cfg: dict) -> tuple[int, ...]:
    """The shape of one published ChatGLM3 weight, from its name and the config (see the layout folder's README)."""
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    kv = cfg["kv_channels"] * cfg["multi_query_group_num"]
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return (v, h)
    if name.endswith("query_key_value.weight"):
        return (h + 2 * kv, h)
    if name.endswith("query_key_value.bias"):
        return (h + 2 * kv,)
    if name.endswith("self_attention.dense.weight"):
        return (h, h)
    if name.endswith("dense_h_to_4h.weight"):
        return (2 * f, h)
    if name.endswith("dense_4h_to_h.weight"):
        return (h, f)
    if name.endswith("layernorm.weight"):
        return (h,)
    if name.endswith("rotary_pos_emb.inv_freq"):
        return (cfg["kv_channels"] // 4,)
    raise ValueError(f"unknown ChatGLM3 weight {name}")


def build(out: Path = DEFAULT_DIR, layout: Path = LAYOUT, verbose: bool = True) -> Path:
    """Write the full-size random checkpoint to `out` (skipped when a complete one is there). Returns `out`."""
    import sentencepiece as spm
    import torch

    index = json.loads((layout / "pytorch_model.bin.index.json").read_text())
    shards: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    done = out / ".complete"
    if done.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "pytorch_model.bin.index.json", "tokenizer_config.json"):
        shutil.copy(layout / name, out / name)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(out / "tokenizer"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    cfg = json.loads((layout / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for i, (shard, names) in enumerate(sorted(shards.items())):
        weights = {}
        for name in names:
            shape = tensor_shape(name, cfg)
            if name.endswith("inv_freq"):
                d = cfg["kv_channels"] // 2
                weights[name] = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            elif name.endswith("layernorm.weight"):
                weights[name] = torch.ones(shape, dtype=torch.float16)
            else:  # init-sized noise: activations stay in range through 28 layers
                weights[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
        tmp = out / f".{shard}.tmp"
        torch.save(weights, tmp)
        os.replace(tmp, out / shard)
        del weights
        if verbose:
            print(f"  wrote {shard} ({i + 1}/{len(shards)}, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    done.write_text("ok\n")
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
