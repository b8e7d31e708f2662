#!/usr/bin/env python3
"""Run llama.cpp's convert_hf_to_gguf.py on a ChatGLM3 folder that has no remote code (no tokenization_chatglm.py).

Everything is the vendored converter except the vocabulary step: `ChatGLMModel.set_vocab_chatglm3` normally builds
the vocabulary through `AutoTokenizer(..., trust_remote_code=True)`; here it is rebuilt straight from the
SentencePiece `tokenizer.model` with the same rules as THUDM's tokenization_chatglm.py:

- ids < sp.vocab_size(): the SentencePiece pieces with their scores and types (ids 0/1/2 named <unk>/<bos>/<eos>),
- the next nine ids: ChatGLM3's special tokens ([MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|>
  <|observation|>) as CONTROL tokens,
- the rest up to config.json's padded_vocab_size (65024): "[PAD{id}]" UNUSED tokens,

and the same keys: tokenizer model "llama", pre-tokenizer "chatglm-spm", token list/scores/types, special token ids
from SpecialVocab (config.json: eos 2, pad 0).

Usage (same arguments as convert_hf_to_gguf.py), for benchmarks/bench_chat_fullsize.py --llama-gguf:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    LLAMA_CPP_DIR=llama_cpp_python-0.3.36/vendor/llama.cpp python convert_chatglm3.py MODEL_DIR --outtype f16 \\
        --outfile f16.gguf
    python quantize_q4_0.py f16.gguf q4_0.gguf    # with llama-cpp-python installed

On this AMD EPYC (AVX-512) machine the default native build of llama-cpp-python 0.3.36 died with SIGILL in ggml's
AMX kernel; it ran once rebuilt with AMX off (CMAKE_ARGS with -DGGML_NATIVE=OFF and the AVX-512 / AVX512_VNNI /
AVX512_BF16 GGML_* options on), which keeps Q4_0 weight repacking.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# the llama.cpp source tree inside llama-cpp-python's sdist (pip download --no-binary :all: llama-cpp-python)
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", "llama_cpp_python-0.3.36/vendor/llama.cpp"))
sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
sys.path.insert(1, str(LLAMA_CPP))

import convert_hf_to_gguf  # noqa: E402
import gguf  # noqa: E402
from conversion.base import SentencePieceTokenTypes  # noqa: E402
from conversion.chatglm import ChatGLMModel  # noqa: E402

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS.append("<|observation|>")


def chatglm3_vocab(model_file: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and token types exactly as set_vocab_chatglm3 derives them from THUDM's tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n_pieces = sp.vocab_size()
    if n_pieces + len(SPECIAL_TOKENS) > vocab_size:
        raise SystemExit(f"{model_file}: {n_pieces} pieces + {len(SPECIAL_TOKENS)} special tokens > {vocab_size}")
    tokens: list[bytes] = []
    scores: list[float] = []
    toktypes: list[int] = []
    for token_id in range(vocab_size):
        if token_id < n_pieces:
            piece = {0: "<unk>", 1: "<bos>", 2: "<eos>"}.get(token_id, sp.id_to_piece(token_id))
            toktype = SentencePieceTokenTypes.NORMAL
            if sp.is_unknown(token_id):
                toktype = SentencePieceTokenTypes.UNKNOWN
            elif sp.is_control(token_id):
                toktype = SentencePieceTokenTypes.CONTROL
            elif sp.is_unused(token_id):
                toktype = SentencePieceTokenTypes.UNUSED
            elif sp.is_byte(token_id):
                toktype = SentencePieceTokenTypes.BYTE
            tokens.append(piece.encode("utf-8"))
            scores.append(sp.get_score(token_id) if piece else 0.0)
            toktypes.append(toktype)
        elif token_id < n_pieces + len(SPECIAL_TOKENS):
            tokens.append(SPECIAL_TOKENS[token_id - n_pieces].encode("utf-8"))
            scores.append(0.0)
            toktypes.append(SentencePieceTokenTypes.CONTROL)
        else:
            tokens.append(f"[PAD{token_id}]".encode())
            scores.append(0.0)
            toktypes.append(SentencePieceTokenTypes.UNUSED)
    return tokens, scores, toktypes


def set_vocab_chatglm3(self) -> None:
    vocab_size = self.hparams["padded_vocab_size"]
    tokens, scores, toktypes = chatglm3_vocab(self.dir_model / "tokenizer.model", vocab_size)
    self.gguf_writer.add_tokenizer_model("llama")
    # glm3 prompt: "[gMASK]sop<|user|>\n" + prompt + "<|assistant|>"
    self.gguf_writer.add_tokenizer_pre("chatglm-spm")
    self.gguf_writer.add_token_list(tokens)
    self.gguf_writer.add_token_scores(scores)
    self.gguf_writer.add_token_types(toktypes)
    special_vocab = gguf.SpecialVocab(self.dir_model, n_vocab=len(tokens))
    special_vocab.add_to_gguf(self.gguf_writer)


def set_vocab(self) -> None:
    set_vocab_chatglm3(self)  # no remote tokenizer code here: always the SentencePiece path


ChatGLMModel.set_vocab_chatglm3 = set_vocab_chatglm3
ChatGLMModel.set_vocab = set_vocab

if __name__ == "__main__":
    convert_hf_to_gguf.main()
