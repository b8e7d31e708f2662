"""`catdog export chat`: a published ChatGLM3 folder -> a standard transformers folder that any engine serves
without remote code (vLLM, SGLang, TGI, plain `AutoModelForCausalLM`).

What the folder holds, and why each piece:
- `config.json` for the built-in `GlmForCausalLM` (model_type `glm`): the same architecture, maintained upstream.
- `model-XXXXX-of-YYYYY.safetensors` + `model.safetensors.index.json`: the weights renamed by `chatglm3.map_weights`,
  written shard by shard so that memory holds one output shard, never the whole model.
- `tokenizer.json`: ChatGLM3's SentencePiece model converted to a fast tokenizer, with the nine special tokens at
  the ids ChatGLM3 gives them (right after the pieces). ChatGLM3's own tokenizer is remote code that no longer runs
  on transformers >= 4.45.
- `tokenizer_config.json` with a chat template that renders exactly the ids of `ChatGLM3Tokenizer.build_prompt`.
- `generation_config.json` whose `eos_token_id` lists `</s>`, `<|user|>` and `<|observation|>`, so every engine stops
  where ChatGLM3 means to stop without hand-set stop ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from catdog_glm.chat.chatglm3 import (
    EOS_ID,
    ROLES,
    SPECIAL_TOKENS,
    is_chatglm3_folder,
    map_weights,
    read_chatglm3_folder,
    read_shard_tensors,
    weight_shards,
)
from catdog_glm.config import parse_size
from catdog_glm.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Sampling defaults copied from the source folder's generation_config.json when it has them.
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "max_length", "repetition_penalty")

# Renders what `ChatGLM3Tokenizer.build_prompt` builds: `[gMASK]sop`, then per message `<|role|>`,
# encode(metadata + "\n") and encode(content), then `<|assistant|>`. ChatGLM3 encodes the "\n" and the content
# separately, so the content gets its own SentencePiece dummy prefix; the space before it here is that prefix
# (the fast tokenizer turns it into the same "▁"). Empty content encodes to nothing, hence the `if`.
CHAT_TEMPLATE = (
    "[gMASK]sop"
    "{%- for message in messages -%}"
    f"{{%- if message['role'] not in {list(ROLES)!r} -%}}"
    "{{ raise_exception('ChatGLM3 knows the roles system, user, assistant and observation, not ' ~ message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['metadata'] is defined and message['metadata'] -%}{{ message['metadata'] }}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- if message['content'] -%}{{ ' ' + message['content'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


@dataclass
class ExportedChat:
    path: Path
    parameters: int
    shards: int
    dtype: str
    bytes: int
    seconds: float


def _read_spm_proto(model_file: Path):
    """The SentencePiece ModelProto. transformers ships its own compiled schema; sentencepiece's needs protobuf>=7,
    which swanlab's pin (<7) rules out, so use transformers' directly."""
    from transformers.utils import sentencepiece_model_pb2_new as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf raises DecodeError, which has no common base worth importing
        raise ModelError(f"{model_file} is not a SentencePiece model ({e})") from e
    return proto


def build_fast_tokenizer(model_file: str | Path):
    """A `tokenizers.Tokenizer` that encodes like ChatGLM3's SentencePiece model, special tokens at their ids.

    transformers' `SpmConverter.build_tokenizer_from_spm_proto` follows the model's own normalizer spec (dummy
    prefix, whitespace handling, byte fallback); each text between special tokens gets its own dummy prefix, as
    ChatGLM3 encodes every part of a prompt separately.
    """
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    model_file = Path(model_file)
    proto = _read_spm_proto(model_file)
    if proto.trainer_spec.model_type != 2:  # ChatGLM3 ships BPE; a Unigram model would be some other tokenizer
        raise ModelError(f"{model_file} is not a BPE SentencePiece model, as ChatGLM3's is")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    for offset, name in enumerate(SPECIAL_TOKENS):  # ChatGLM3's ids: right after the pieces, in this order
        if tokenizer.token_to_id(name) != len(proto.pieces) + offset:
            raise ModelError(f"{model_file}: the piece {name!r} already exists, so ChatGLM3's special ids do not fit")
    # Like ChatGLM3's tokenizer, plain `tokenizer(text)` starts with [gMASK] sop (raw completions in vLLM etc.).
    gmask, sop = tokenizer.token_to_id("[gMASK]"), tokenizer.token_to_id("sop")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", pair="[gMASK] sop $A $B", special_tokens=[("[gMASK]", gmask), ("sop", sop)]
    )
    return tokenizer


def tokenizer_config(pieces, context_window: int) -> dict:
    """tokenizer_config.json for `PreTrainedTokenizerFast`, which transformers 4.x and 5 and the serving engines
    all read (transformers 5's own save writes a class name older versions do not know)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": pieces[EOS_ID],
        "unk_token": pieces[0],
        "pad_token": pieces[0],
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_window,
        "chat_template": CHAT_TEMPLATE,
    }


def _generation_config(source: Path, stop_ids: list[int]) -> dict:
    config = {"eos_token_id": stop_ids, "pad_token_id": 0}
    path = source / "generation_config.json"
    if path.is_file():
        try:
            original = json.loads(path.read_text(encoding="utf-8"))
            config |= {k: original[k] for k in _SAMPLING_KEYS if k in original}
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable %s (%s)", path, e)
    return config


class _ShardWriter:
    """Collects converted tensors and writes a safetensors shard whenever `max_bytes` is reached."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f".part-{len(self.files) + 1:05d}.safetensors"
        # transformers refuses safetensors files without format=pt
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards as transformers does and write the index; returns the shard count."""
        self.flush()
        count = len(self.files)
        if count == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        return count


def _add_legacy_config_keys(path: Path) -> None:
    """Also state the rotary settings and dtype as transformers 4.x spells them: serving engines pinned to 4.x read
    `rope_theta` / `partial_rotary_factor` / `torch_dtype` and would silently use defaults otherwise."""
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    legacy = {
        "rope_theta": rope.get("rope_theta"),
        "partial_rotary_factor": rope.get("partial_rotary_factor"),
        "torch_dtype": config.get("dtype"),
    }
    config |= {k: v for k, v in legacy.items() if v is not None and k not in config}
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out must be a folder")


def export_chatglm3(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
) -> ExportedChat:
    """Write `source` (a ChatGLM3 folder in the official layout) to `out` as a plain transformers folder."""
    import torch
    from transformers import GlmForCausalLM

    started = time.perf_counter()
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"the precision (--precision) must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size, option="--max-shard-size", minimum=2**20)
    if not source.is_dir():
        raise ModelError(f"{source} is not a folder; pass the ChatGLM3 folder (config.json, tokenizer.model, shards)")
    if not is_chatglm3_folder(source):
        raise ModelError(f"{source} is not a ChatGLM3 folder: its config.json does not say model_type chatglm")
    config, chat_tokenizer = read_chatglm3_folder(source)
    _check_out(out, overwrite)
    if out.resolve() == source.resolve():
        raise ConfigError("--out must differ from --model")
    shards = weight_shards(source)
    torch_dtype = getattr(torch, EXPORT_DTYPES[dtype])
    fast = build_fast_tokenizer(source / "tokenizer.model")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GlmForCausalLM(config).state_dict().items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        writer = _ShardWriter(tmp, max_bytes)
        written: set[str] = set()
        parameters = 0
        for i, shard in enumerate(shards, start=1):
            for name, tensor in read_shard_tensors(shard):
                for new_name, value in map_weights(name, tensor, config).items():
                    if expected.get(new_name) != tuple(value.shape):
                        raise ModelError(
                            f"{shard.name}: {name} has shape {tuple(value.shape)}, but config.json implies "
                            f"{expected.get(new_name)} for {new_name}"
                        )
                    # copy=True: the q/k/v parts are views into one fused tensor, safetensors wants their own storage
                    writer.add(new_name, value.to(dtype=torch_dtype, memory_format=torch.contiguous_format, copy=True))
                    written.add(new_name)
                    parameters += value.numel()
            if on_shard:
                on_shard(i, len(shards))
        missing = sorted(set(expected) - written)
        if missing:
            raise ModelError(f"{source}: the shards lack {len(missing)} weight(s), e.g. {missing[0]}")
        shard_count = writer.finish()

        config.architectures = ["GlmForCausalLM"]
        config.eos_token_id = sorted(chat_tokenizer.stop_ids)
        config.pad_token_id = 0
        config.dtype = torch_dtype
        config.save_pretrained(str(tmp))
        _add_legacy_config_keys(tmp / "config.json")
        generation = _generation_config(source, sorted(chat_tokenizer.stop_ids))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        fast.save(str(tmp / "tokenizer.json"))
        pieces = [chat_tokenizer.sp.id_to_piece(i) for i in range(chat_tokenizer.n_pieces)]
        tok_config = tokenizer_config(pieces, int(config.max_position_embeddings))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), "utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportedChat(
        path=out,
        parameters=parameters,
        shards=shard_count,
        dtype=dtype,
        bytes=writer.total_bytes,
        seconds=time.perf_counter() - started,
    )
