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

from catdog_glm.errors import ConfigError, ModelError

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

    eos_token_id = EOS_ID

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

    @property
    def all_special_ids(self) -> list[int]:
        """SentencePiece's control and unknown pieces (<unk>, <s>, </s>) and the nine special tokens."""
        sp = self.sp
        pieces = [i for i in range(self.n_pieces) if sp.is_control(i) or sp.is_unknown(i)]
        return pieces + sorted(self.special.values())

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes (for constrained decoding and logprobs): "▁" is a space, "<0xNN>" that byte; special
        tokens: their names."""
        sp, out = self.sp, []
        for i in range(self.n_pieces):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                out.append(piece.encode("utf-8"))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out + [name.encode("utf-8") for name in SPECIAL_TOKENS]

    def build_prompt(self, messages: list[dict], continue_final: bool = False) -> list[int]:
        """`[gMASK] sop`, then `<|role|>` + encode(f"{metadata}\\n") + encode(content) per message, `<|assistant|>`
        (as THUDM's build_chat_input), for messages in ChatGLM3's roles (chat/formats/chatglm3.py writes OpenAI tools
        and tool turns into them); a system message's `tools` follow its content as json.dumps(indent=4).
        `continue_final`: the last message, the assistant's, is continued: no `<|assistant|>`."""
        if continue_final and (not messages or messages[-1]["role"] != "assistant"):
            raise ConfigError("only a conversation that ends with an assistant message can be continued")
        ids = [self.special["[gMASK]"], self.special["sop"]]
        for message in messages:
            role = message["role"]
            if role not in ROLES:
                raise ModelError(f"unknown chat role {role!r}; use one of {', '.join(ROLES)}")
            content = message["content"] or ""
            if role == "system" and message.get("tools"):
                content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids.append(self.special[f"<|{role}|>"])
            ids += self.encode(f"{message.get('metadata') or ''}\n")
            ids += self.encode(content)
        if not continue_final:
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


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


def release_pages(tensor) -> None:
    """Drop the resident pages of a tensor that lives in a private file mapping (a memory-mapped shard), once it has
    been copied out. Without this every page read stays resident until the whole shard is unmapped, so loading a 6B
    model would hold a quantized model plus a 1.8 GB shard. The mapping stays valid: a later read re-reads the file."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    start, end = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _mapped_safetensors(shard: Path) -> Iterator[tuple[str, Any]]:
    """Tensors of a safetensors file as views of one private memory map, so each can be released after use
    (`safe_open` copies out of a mapping it keeps resident until closed). safe_open validates the file first."""
    import struct

    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 - safe_open is not a dict
    except SafetensorError as e:
        raise ModelError(f"{shard} is not a readable safetensors file ({e})") from e
    with open(shard, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_size))
    storage = torch.UntypedStorage.from_file(str(shard), shared=False, nbytes=shard.stat().st_size)
    base = 8 + header_size
    for name in names:
        meta = header[name]
        start, end = meta["data_offsets"]
        dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, base + start, (end - start,))
        if (base + start) % dtype.itemsize:  # unaligned (old writers): copy rather than view
            raw = raw.clone()
        yield name, raw.view(dtype).reshape(meta["shape"])


def read_shard_tensors(shard: Path, release: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of one weight file, read lazily (safetensors or memory-mapped .bin), never running
    pickled code. With `release`, each tensor's file pages are dropped once the caller asks for the next one, so the
    caller must have copied what it keeps."""
    import torch

    if shard.suffix == ".safetensors":
        for name, tensor in _mapped_safetensors(shard):
            yield name, tensor
            if release:
                release_pages(tensor)
        return
    mapped = True
    try:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a legacy (pre-zip) torch.save file cannot be memory-mapped: read it whole, still weights only
            state, mapped = torch.load(shard, map_location="cpu", weights_only=True), False
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
        tensor = state.pop(name)
        yield name, tensor
        if release and mapped and isinstance(tensor, torch.Tensor):
            release_pages(tensor)


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


def new_glm_model(config):
    """A `GlmForCausalLM` with every weight on the meta device (no memory), to be filled tensor by tensor."""
    import torch
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        return GlmForCausalLM(config)


def finish_glm_model(model, tokenizer: ChatGLM3Tokenizer, source: Path):
    """Check that every weight arrived, build the computed rotary buffer, set ChatGLM3's stop ids."""
    import itertools

    missing = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    missing = [n for n in missing if "rotary_emb" not in n]
    if missing:
        raise ModelError(f"{source}: the shards lack {len(missing)} weight(s), e.g. {missing[0]}")
    # The rotary frequencies are a computed buffer, still on the meta device: build them for real.
    device = next(model.parameters()).device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    model.generation_config.eos_token_id = sorted(tokenizer.stop_ids)
    return model.eval()


def _place(model, name: str, value, dtype, quantize: int | None, device) -> None:
    """Put one mapped weight into the meta model on `device`: copied to `dtype`, or quantized right away when
    `quantize` is set and it is a Linear/Embedding weight, so the full-precision model never exists."""
    from torch import nn

    from catdog_glm.chat import quantize as q

    module_name, leaf = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    embedding = isinstance(module, nn.Embedding) and device.type == "cpu"  # on CUDA, bitsandbytes keeps it dense
    if quantize and leaf == "weight" and (isinstance(module, nn.Linear) or embedding):
        if embedding:  # ChatGLM3's input and output tables are separate
            replacement = q.embedding_kind(quantize, module.embedding_dim, tied=False).quantize(value, dtype)
        else:
            bias = module.bias if module.bias is not None and not module.bias.is_meta else None
            head = module_name == "lm_head"
            replacement = q.quantized_linear(value, bias, quantize, head=head, dtype=dtype, device=device)
            if module.bias is not None and bias is None:
                replacement.bias = module.bias  # still on meta: its value comes later in the shards
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        return
    setattr(module, leaf, nn.Parameter(value.to(device, dtype, copy=True), requires_grad=False))


def load_chatglm3(
    path: str | Path,
    *,
    dtype=None,
    quantize: int | None = None,
    device=None,
    on_shard: Callable[[int, int], None] | None = None,
):
    """(GlmForCausalLM, ChatGLM3Tokenizer) from a published ChatGLM3 folder, streamed: each tensor is mapped,
    converted to `dtype` (or quantized to `quantize` bits), put on `device` and its file pages released before the
    next is read, so peak memory is the loaded model plus one tensor."""
    import torch

    path = Path(path)
    config, tokenizer = read_chatglm3_folder(path)
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    model = new_glm_model(config)
    shards = weight_shards(path)
    with torch.no_grad():
        for i, shard in enumerate(shards):
            for name, tensor in read_shard_tensors(shard, release=True):
                for new_name, value in map_weights(name, tensor, config).items():
                    _place(model, new_name, value, dtype, quantize, device)
                tensor = value = None  # the last view of a shard would keep its whole mapping alive
            if on_shard:
                on_shard(i + 1, len(shards))
    return finish_glm_model(model, tokenizer, path), tokenizer
