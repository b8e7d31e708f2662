"""Constrained decoding: a grammar (JSON object, JSON schema, Lark, regex) turned into a token mask per step.

llguidance (CPU, no dependencies) does the work: `compile(chat_model, constraint)` turns a `Constraint` into a
checked grammar and a matcher over the model's vocabulary (cached per model and constraint), and each request gets
its own copy of the matcher: before each token the scheduler asks it which tokens may come (`ConstraintState.allowed`,
a bool mask the sampler applies as -inf), after it the token is consumed. Once the grammar is complete only a stop
token may come, and the scheduler ends the reply at once.

The vocabulary llguidance needs (each token's bytes) comes from the model's tokenizer: a fast Hugging Face tokenizer
(`llguidance.hf.from_tokenizer`), ChatGLM3's SentencePiece tokenizer or any tokenizer with a `token_bytes()` method
(tests' fake model), via `token_bytes()` and `all_special_ids`. The same table gives logprobs their token bytes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catdog_glm.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KINDS = ("json_object", "json_schema", "lark", "regex")
# JSON between tokens (llguidance's `whitespace_pattern`): one space, or one line break and an indent of at most 32
# spaces or tabs, so pretty-printed JSON still fits but a weak model cannot spend its max_tokens on whitespace
# (llguidance's default allows any amount; a run of 48 with any number of line breaks was allowed here before)
JSON_WHITESPACE = r"(?:\x20?|\x0A[\x20\x09]{0,32})"
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}  # every JSON grammar the server builds
CACHE_SIZE = 64  # compiled constraints kept per model
_lock = threading.Lock()


@dataclass(frozen=True)
class Constraint:
    """What a reply must match. kind: "json_object" (any JSON object), "json_schema" (spec: the schema dict),
    "lark" (spec: an llguidance Lark grammar, which may embed JSON schemas with %json{...}), "regex" (spec: str)."""

    kind: str
    spec: Any = None
    # end the reply at the first point where the grammar may end and the model's own first choice is a token the
    # grammar does not allow (the model wants to go on with something else): parallel tool calls end once the calls
    # are complete, instead of the grammar forcing the model to open call after call until the token limit
    end_when_unwanted: bool = False

    def grammar(self) -> str:
        """The llguidance grammar (not yet checked against a vocabulary); ConfigError for a malformed spec."""
        from llguidance import LLMatcher

        options = dict(JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options)
        if self.kind == "json_schema":
            spec = self.spec
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except ValueError as e:
                    raise ConfigError(f"the JSON schema is not valid JSON: {e}") from e
            if not isinstance(spec, (dict, bool)):
                raise ConfigError("a JSON schema must be a JSON object")
            check_schema_depth(spec)
            try:
                return LLMatcher.grammar_from_json_schema(spec, defaults=options)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"invalid JSON schema: {_first_line(e)}") from e
        if self.kind in ("lark", "regex"):
            if not isinstance(self.spec, str) or not self.spec:
                raise ConfigError(f"a {self.kind} constraint needs its {self.kind} text")
            if self.kind == "lark":
                return LLMatcher.grammar_from_lark(self.spec)
            return LLMatcher.grammar_from_regex(self.spec)
        raise ConfigError(f"unknown constraint kind {self.kind!r}; use one of {', '.join(KINDS)}")

    def key(self) -> str:
        try:
            spec = json.dumps(self.spec, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the {self.kind} constraint cannot be written as JSON: {e}") from e
        return f"{self.kind}\0{int(self.end_when_unwanted)}\0{spec}"


MAX_SCHEMA_DEPTH = 256  # nested objects/arrays in a JSON schema, its $refs followed


def check_schema_depth(schema, what: str = "the JSON schema") -> None:
    """ConfigError when `schema`, with its local `$ref`s followed, nests deeper than MAX_SCHEMA_DEPTH: llguidance
    compiles schemas recursively, and a chain of $refs some hundreds of levels deep (a 100 KB body) overflows its
    stack, which kills the process (a segfault, no exception). Recursive schemas (a $ref back into its own path) are
    fine: llguidance expands those lazily."""
    memo: dict[str, int] = {}

    def too_deep() -> ConfigError:
        return ConfigError(f"{what} nests more than {MAX_SCHEMA_DEPTH} levels deep (counting the $refs it follows)")

    def height(node, depth: int, active: frozenset) -> int:
        if depth > MAX_SCHEMA_DEPTH:
            raise too_deep()
        if isinstance(node, list):
            return max((height(v, depth, active) for v in node if isinstance(v, (dict, list))), default=0)
        best = 0
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and ref not in active:
            if ref not in memo:
                target = _pointer(schema, ref)
                memo[ref] = height(target, depth, active | {ref}) if isinstance(target, (dict, list)) else 0
            best = memo[ref]
        for key, value in node.items():
            if key != "$ref" and isinstance(value, (dict, list)):
                best = max(best, 1 + height(value, depth + 1, active))
        if depth + best > MAX_SCHEMA_DEPTH:
            raise too_deep()
        return best

    if isinstance(schema, dict):
        height(schema, 0, frozenset())


def _pointer(document, ref: str):
    """The node a local JSON pointer ("#/$defs/name") names, or None."""
    node = document
    for part in ref[1:].split("/")[1:] if ref.startswith("#/") else ([] if ref == "#" else [None]):
        if part is None:
            return None
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isascii() and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _BytesTokenizer:
    """What llguidance's TokenizerWrapper reads, from a tokenizer with `token_bytes()` (and `all_special_ids`).
    Text is tokenized greedily (longest token first) over those same bytes: llguidance tokenizes forced text with
    it, and a tokenizer whose output disagrees with the table (SentencePiece adds a leading "▁") breaks its masks."""

    def __init__(self, tokenizer):
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = list(getattr(tokenizer, "all_special_ids", ()))
        special = set(self.special_token_ids)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.tokens):
            if piece and i not in special:
                self._ids.setdefault(piece, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text):
        if not isinstance(text, str):
            raise TypeError("text only")  # llguidance then passes str
        data, ids, at = text.encode("utf-8"), [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at : at + size])
                if token is not None:
                    ids.append(token)
                    at += size
                    break
            else:
                at += 1  # a byte no token spells: it cannot be generated anyway
        return ids


def _model_cache(chat_model) -> dict:
    return chat_model.__dict__.setdefault("_catdog_constraints", {})


def vocabulary(chat_model):
    """llguidance's tokenizer for this model (cached): every token's bytes, with the model's stop tokens as EOS.
    ConfigError when the tokenizer cannot be read (a slow HF tokenizer without token_bytes())."""
    import llguidance

    stops = sorted(chat_model.stop_ids)
    cache = _model_cache(chat_model)
    with _lock:
        entry = cache.get("vocabulary")
        if entry is not None and entry[0] == stops:
            return entry[1]
    tokenizer = chat_model.tokenizer
    eos = stops or None
    if hasattr(tokenizer, "token_bytes"):
        tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_BytesTokenizer(tokenizer)), eos_token=eos)
    else:
        import transformers

        if not isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
            raise ConfigError(
                f"constrained decoding and logprobs need a fast tokenizer; {chat_model.name} has "
                f"{type(tokenizer).__name__}"
            )
        import llguidance.hf

        tok = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
    with _lock:
        cache["vocabulary"] = (stops, tok)
    return tok


def token_bytes_of(chat_model) -> Callable[[int], bytes]:
    """id -> the token's bytes (special tokens: their name), for logprobs."""
    tok = vocabulary(chat_model)
    size = tok.vocab_size

    def token_bytes(token: int) -> bytes:
        return tok.decode_bytes([token]) if 0 <= token < size else b""

    return token_bytes


class CompiledConstraint:
    """A constraint checked against one model's vocabulary; `start()` gives each request its own matcher."""

    def __init__(self, tokenizer, grammar: str, constraint: Constraint):
        from llguidance import LLMatcher

        self.constraint, self.tokenizer = constraint, tokenizer
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConfigError(f"invalid {constraint.kind} constraint: {_first_line(self._matcher.get_error())}")
        probe = self._matcher.deep_copy()  # some grammars fail only once asked for a token ($ref loops)
        if not any(probe.compute_logit_bias()) or probe.is_error():
            reason = _first_line(probe.get_error()) if probe.is_error() else "it allows no token"
            raise ConfigError(f"the {constraint.kind} constraint can match nothing: {reason}")
        self.eos = frozenset(tokenizer.eos_tokens)

    def start(self) -> ConstraintState:
        c = self.constraint
        return ConstraintState(
            self._matcher.deep_copy(),
            self.tokenizer.vocab_size,
            self.eos,
            c.kind,
            end_when_unwanted=c.end_when_unwanted,
        )


def compile(chat_model, constraint: Constraint) -> CompiledConstraint:  # noqa: A001 - the word the design uses
    """`constraint` compiled for `chat_model` (cached per model and constraint; a bad schema or grammar raises
    ConfigError with llguidance's first line)."""
    if not isinstance(constraint, Constraint):
        raise ConfigError(f"a constraint must be a Constraint, got {type(constraint).__name__}")
    key = constraint.key()
    stops = tuple(sorted(chat_model.stop_ids))
    cache = _model_cache(chat_model)
    with _lock:
        compiled_cache = cache.setdefault("compiled", OrderedDict())
        hit = compiled_cache.get((key, stops))
        if hit is not None:
            compiled_cache.move_to_end((key, stops))
            return hit
    compiled = CompiledConstraint(vocabulary(chat_model), constraint.grammar(), constraint)
    with _lock:
        compiled_cache[(key, stops)] = compiled
        while len(compiled_cache) > CACHE_SIZE:
            compiled_cache.popitem(last=False)
    return compiled


class ConstraintState:
    """One request's matcher: `allowed(row)` before a token, `consume(token)` after it."""

    def __init__(self, matcher, vocab_size: int, eos: frozenset[int], kind: str, *, end_when_unwanted: bool = False):
        self._matcher, self._size, self.eos, self.kind = matcher, vocab_size, eos, kind
        self.end_when_unwanted = end_when_unwanted

    def allowed(self, row: torch.Tensor) -> torch.Tensor | None:
        """A bool mask over `row`'s vocabulary of the tokens that may come next; None when the matcher failed or
        allows no token the model has (the request then ends)."""
        import torch

        bias = self._matcher.compute_logit_bias()  # one byte per token: 0 (not allowed) or 200
        if self._matcher.is_error():
            log.warning("constrained decoding stopped: %s", _first_line(self._matcher.get_error()))
            return None
        mask = torch.frombuffer(bytearray(bias), dtype=torch.uint8).bool()
        width = row.shape[-1]
        if width > mask.numel():  # padded vocabulary rows (ChatGLM3): never allowed
            mask = torch.cat([mask, mask.new_zeros(width - mask.numel())])
        mask = mask[:width].to(row.device)
        if not bool(mask.any()):
            log.warning("constrained decoding stopped: the grammar allows no token of this model")
            return None
        if self.end_when_unwanted:
            ends = [t for t in self.eos if t < width and mask[t]]
            if ends and not bool(mask[int(row.argmax())]):
                mask = torch.zeros_like(mask)
                mask[ends] = True  # the grammar may end here and the model wants what it cannot have: end
        return mask

    def is_end(self, token: int) -> bool:
        """Whether `token` is one the matcher takes as the end of the reply."""
        return token in self.eos

    def consume(self, token: int) -> bool:
        """Take the sampled token; False once the reply must end (the grammar is complete, or the matcher failed)."""
        if not self._matcher.consume_token(token):
            log.warning("constrained decoding stopped: %s", _first_line(self._matcher.get_error()))
            return False
        return not self._matcher.is_stopped()
