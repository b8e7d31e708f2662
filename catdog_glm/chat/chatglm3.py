"""ChatGLM3 without its remote code: the SentencePiece tokenizer and prompt, and the weights mapped onto
transformers' built-in `GlmForCausalLM`.

ChatGLM3's own modelling/tokenizer code only runs on old transformers and executes Python from the model folder;
these few mappings are all it takes to load the published checkpoints with the maintained GLM implementation.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from catdog_glm.errors import ModelError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")
EOS_ID = 2


class ChatGLM3Tokenizer:
    """SentencePiece pieces, then the nine special tokens right after them (ids derived from the piece count)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.n_pieces = self.sp.get_piece_size()
        self.special = {name: self.n_pieces + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = self.n_pieces + len(SPECIAL_TOKENS)
        self.stop_ids = {EOS_ID, self.special["<|user|>"], self.special["<|observation|>"]}

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; special tokens never leak into it."""
        return self.sp.decode([i for i in ids if 0 <= i < self.n_pieces])

    def build_prompt(self, messages: list[dict]) -> list[int]:
        """`[gMASK] sop`, then `<|role|>` + encode(f"{metadata}\\n") + encode(content) per message, `<|assistant|>`."""
        ids = [self.special["[gMASK]"], self.special["sop"]]
        for message in messages:
            role = message["role"]
            if role not in ROLES:
                raise ModelError(f"unknown chat role {role!r}; use one of {', '.join(ROLES)}")
            ids.append(self.special[f"<|{role}|>"])
            ids += self.encode(f"{message.get('metadata', '')}\n")
            ids += self.encode(message["content"])
        ids.append(self.special["<|assistant|>"])
        return ids


def is_chatglm3_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "chatglm"
    except (OSError, json.JSONDecodeError):
        return False


def glm_config(chatglm: dict):
    """The `GlmConfig` equivalent of a ChatGLM3 config.json."""
    from transformers import GlmConfig

    heads = chatglm["num_attention_heads"]
    kv_heads = chatglm.get("multi_query_group_num", heads) if chatglm.get("multi_query_attention", True) else heads
    head_dim = chatglm.get("kv_channels", chatglm["hidden_size"] // heads)
    return GlmConfig(
        vocab_size=chatglm["padded_vocab_size"],
        hidden_size=chatglm["hidden_size"],
        intermediate_size=chatglm["ffn_hidden_size"],
        num_hidden_layers=chatglm["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=chatglm.get("seq_length", 8192),
        rms_norm_eps=chatglm.get("layernorm_epsilon", 1e-5),
        attention_bias=chatglm.get("add_qkv_bias", True),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * chatglm.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def map_weights(name: str, tensor, config) -> dict:
    """One ChatGLM3 weight -> the GlmForCausalLM weights it becomes (empty for the unused rotary inv_freq)."""
    if name.endswith("rotary_pos_emb.inv_freq"):
        return {}
    if name == "transformer.embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": tensor}
    if name == "transformer.encoder.final_layernorm.weight":
        return {"model.norm.weight": tensor}
    if name == "transformer.output_layer.weight":
        return {"lm_head.weight": tensor}
    prefix = "transformer.encoder.layers."
    if not name.startswith(prefix):
        raise ModelError(f"unexpected ChatGLM3 weight {name!r}")
    layer, rest = name[len(prefix) :].split(".", 1)
    out = f"model.layers.{layer}."
    if rest.startswith("self_attention.query_key_value."):
        kind = rest.rsplit(".", 1)[1]  # weight or bias
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        q_part, k_part, v_part = tensor.split([q, kv, kv], dim=0)
        return {
            f"{out}self_attn.q_proj.{kind}": q_part,
            f"{out}self_attn.k_proj.{kind}": k_part,
            f"{out}self_attn.v_proj.{kind}": v_part,
        }
    renames = {
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # gate first, as GLM expects
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    }
    if rest not in renames:
        raise ModelError(f"unexpected ChatGLM3 weight {name!r}")
    return {out + renames[rest]: tensor}


def weight_shards(path: Path) -> list[Path]:
    """The weight files of a ChatGLM3 folder, from its index json when it has one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted({path / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ModelError(f"{path} is missing weight shard(s) listed in {index_name}: {', '.join(missing)}")
            return shards
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise ModelError(
        f"{path} has no weights: expected model-*.safetensors or pytorch_model-*.bin shards with their "
        "index json, or a single model.safetensors / pytorch_model.bin"
    )


def read_shard_tensors(shard: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of one weight file, read lazily (safetensors or memory-mapped .bin), never running
    pickled code."""
    import torch

    if shard.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelError(f"{shard} is not a readable safetensors file ({e})") from e
        return
    try:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a legacy (pre-zip) torch.save file cannot be memory-mapped: read it whole, still weights only
            state = torch.load(shard, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"refused to load {shard}: it is not a plain weights file (it holds Python objects that could run code)"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{shard} is not a readable PyTorch weights file ({e})") from e
    if not isinstance(state, dict):
        raise ModelError(f"{shard} does not hold a dict of weights")
    while state:  # hand each tensor over and drop our reference, so a converted copy never doubles the shard
        name = next(iter(state))
        yield name, state.pop(name)


def read_chatglm3_folder(path: Path):
    """(GlmConfig, ChatGLM3Tokenizer) of a ChatGLM3 folder, checked to fit each other."""
    for required in ("config.json", "tokenizer.model"):
        if not (path / required).is_file():
            raise ModelError(f"{path} is not a complete ChatGLM3 folder: {required} is missing")
    config = glm_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    tokenizer = ChatGLM3Tokenizer(path / "tokenizer.model")
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(
            f"{path}: tokenizer.model has {tokenizer.vocab_size} ids but padded_vocab_size is {config.vocab_size}"
        )
    return config, tokenizer


def load_chatglm3(path: str | Path, *, dtype=None, on_shard: Callable[[int, int], None] | None = None):
    """(GlmForCausalLM, ChatGLM3Tokenizer) from a published ChatGLM3 folder, one shard in memory at a time."""
    import torch
    from transformers import GlmForCausalLM

    path = Path(path)
    config, tokenizer = read_chatglm3_folder(path)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    shards = weight_shards(path)
    for i, shard in enumerate(shards):
        mapped = {}
        for name, tensor in read_shard_tensors(shard):
            for new_name, value in map_weights(name, tensor, config).items():
                mapped[new_name] = value.to(dtype)
        model.load_state_dict(mapped, strict=False, assign=True)
        loaded |= set(mapped)
        del mapped
        if on_shard:
            on_shard(i + 1, len(shards))
    missing = sorted(expected - loaded)
    if missing:
        raise ModelError(f"{path}: the shards lack {len(missing)} weight(s), e.g. {missing[0]}")
    # The rotary frequencies are a computed buffer, still on the meta device: build them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.generation_config.eos_token_id = sorted(tokenizer.stop_ids)
    return model.eval(), tokenizer
