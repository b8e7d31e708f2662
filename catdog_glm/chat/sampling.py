"""Per-request sampling: each request in a batch keeps its own temperature, top-p, top-k, penalties, logit bias,
token mask and random generator, so what it gets does not depend on who else is being served in the same step.

Why by hand and not transformers' logits processors: they take the whole [batch, sequence] of ids at every step and
apply one setting to every row, where each row here has its own settings and keeps its own running state (the tokens
it has seen, how often each came), updated in O(1) per token instead of rebuilding an id tensor per step. The
repetition penalty is exactly `RepetitionPenaltyLogitsProcessor`'s rule (tested against it); transformers has no
frequency/presence penalty (OpenAI's rule, as vLLM applies it); the nucleus draw is below.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from catdog_glm.errors import ConfigError

if TYPE_CHECKING:
    import torch

# ---- every sampling default and limit, imported by the engine, the API's protocol, the pages and the CLI --------
# Where a request's defaults come from, first match wins: what the request sets; the model's own defaults
# (`ChatModel.sampling_defaults`: the generation_config.json a model folder ships, as vLLM's
# `--generation-config auto` reads it, or for the embedded SmolLM2 what its model card recommends); these.
DEFAULT_TEMPERATURE = 0.8  # ChatGLM3's demos sample with top_p 0.8, temperature 0.8
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_NEW_TOKENS = 512
MAX_NEW_TOKENS_CAP = 2048  # serve-chat's --max-tokens: the most new tokens one API request may ask for
DEFAULT_MAX_LENGTH = 8192  # the pages' "Maximum length" (prompt + reply) slider: ChatGLM3's Gradio demo
GREEDY_BELOW = 1e-5  # a smaller temperature samples as greedy
MAX_TOP_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's generator takes; negatives are used modulo 2**64
MODEL_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")  # read from generation_config.json
GENERATION_CONFIG = "generation_config.json"
# SmolLM2-135M-Instruct's model card (HuggingFaceTB/SmolLM2-135M-Instruct) samples with temperature 0.2, top_p 0.9;
# the embedded GGUF carries no generation_config. At 0.8/0.8 the book's "What is the capital of France?" named Paris
# in 4 of 10 tries and sometimes rambled to the token limit.
SMOLLM2_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def wrap_seed(seed: int) -> int:
    """A seed in SEED_RANGE as torch's generator takes it (0..2**64-1; negatives wrap, as in torch)."""
    return seed % 2**64


def generation_config_defaults(folder) -> dict:
    """The sampling defaults a model folder ships in generation_config.json (temperature, top_p, top_k,
    repetition_penalty: what vLLM's `--generation-config auto` applies); {} when it has none. A value that
    `Sampling` would refuse is left out, with a warning, rather than failing every request."""
    import json
    import logging
    from pathlib import Path

    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logging.getLogger(__name__).warning("ignoring %s: %s", path, e)
        return {}
    out = {}
    for key in MODEL_DEFAULT_KEYS:
        if isinstance(config, dict) and config.get(key) is not None:
            try:
                Sampling(**{key: config[key]}).validate()
            except ConfigError as e:
                logging.getLogger(__name__).warning("ignoring %s's %s: %s", path, key, e)
                continue
            out[key] = config[key]
    return out


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return value


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass
class Sampling:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None  # ChatGLM style: prompt + new tokens
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = (
        1.0  # ChatGLM3/HF style, over prompt + reply: divides positive logits, multiplies negative
    )
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # OpenAI's penalties over the tokens generated so far: logit -= count * frequency + (count > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: bool = False  # each completion token's logprob (and, with top_logprobs, the most likely alternatives)
    top_logprobs: int = 0  # 0..20

    def validate(self, vocab_size: int | None = None) -> Sampling:
        """Check every field (NaN and infinities included); `vocab_size` bounds the logit_bias ids."""
        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            _real(name, getattr(self, name))
        for name in ("max_new_tokens", "top_k", "top_logprobs"):
            _integer(name, getattr(self, name))
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("top_k must be >= 0 and repetition_penalty > 0")
        if self.max_length is not None and _integer("max_length", self.max_length) < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop must be a list of non-empty strings")
        if self.seed is not None and not SEED_RANGE[0] <= _integer("seed", self.seed) <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be a 64-bit integer (0 to 2**64 - 1), got {self.seed}")
        if not isinstance(self.logprobs, bool):
            raise ConfigError(f"logprobs must be true or false, got {self.logprobs!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if not isinstance(self.logit_bias, dict):
            raise ConfigError("logit_bias must map token ids to numbers")
        for token, bias in self.logit_bias.items():
            _integer("a logit_bias key (a token id)", token)
            _real(f"logit_bias[{token}]", bias)
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                within = f" (0..{vocab_size - 1})" if vocab_size else ""
                raise ConfigError(f"logit_bias has token id {token}, outside this model's vocabulary{within}")
        return self

    @property
    def greedy(self) -> bool:
        # below vLLM's _SAMPLING_EPS, logits / temperature overflow to inf and the probabilities to NaN: greedy is
        # what such a temperature means anyway
        return self.temperature < GREEDY_BELOW

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty or bias changes the logits (and so, maybe, the greedy choice)."""
        return bool(
            self.repetition_penalty != 1.0 or self.frequency_penalty or self.presence_penalty or self.logit_bias
        )


class TokenSampler:
    """One request's next-token choice from its logits row. Seeded requests draw from their own generator, so a
    seed reproduces the same reply whatever else shares the batch."""

    def __init__(self, sampling: Sampling, prompt: list[int]):
        self.s = sampling
        self._prompt = prompt
        self._seen: torch.Tensor | None = None  # tokens the repetition penalty applies to (prompt + reply)
        self._counts: torch.Tensor | None = None  # how often each token came in the reply (frequency/presence)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) on the device
        self._made: list[int] = []  # reply tokens observed before the count tensor existed
        self._generator: torch.Generator | None = None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batch takes one argmax over all such rows at once."""
        return self.s.greedy and not self.s.adjusts_logits

    def observe(self, token: int) -> None:
        if self._seen is not None:
            self._seen[token] = True
        if self._counts is not None:
            self._counts[token] += 1
        elif self.s.frequency_penalty or self.s.presence_penalty:
            self._made.append(token)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The row after the repetition penalty, frequency/presence penalties and logit bias (a new tensor)."""
        import torch

        s = self.s
        if s.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                self._seen[torch.tensor(self._prompt, dtype=torch.long, device=logits.device)] = True
            penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(self._seen, penalized, logits)
        if s.frequency_penalty or s.presence_penalty:
            if self._counts is None:
                self._counts = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
                for token in self._made:
                    self._counts[token] += 1
                self._made = []
            logits = logits - self._counts * s.frequency_penalty - (self._counts > 0) * s.presence_penalty
        if s.logit_bias:
            if self._bias is None:
                ids = torch.tensor(list(s.logit_bias), dtype=torch.long, device=logits.device)
                values = torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                self._bias = ids, values
            logits = logits.index_add(0, *self._bias)
        return logits

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """`logits`: this request's float32 row [vocab]; `allowed`: a bool mask of the tokens a constraint allows
        (at least one), or None."""
        import torch

        s = self.s
        if s.adjusts_logits:
            logits = self.adjust(logits)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if s.greedy:
            return int(logits.argmax())
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            seed = wrap_seed(s.seed) if s.seed is not None else secrets.randbits(63)
            self._generator.manual_seed(seed)
        logits = logits / s.temperature
        index = None  # candidates' token ids, when sampling among a few (most likely first)
        if s.top_k:
            probs, index = logits.topk(min(s.top_k, logits.numel()))
            probs = probs.softmax(-1)
        else:
            probs = logits.softmax(-1)
            if s.top_p < 1:
                probs, index = _most_likely_covering(probs, s.top_p)
        if s.top_p < 1:  # the nucleus: most likely first, until top_p is covered (always the first one)
            keep = int(((probs.cumsum(0) - probs) < s.top_p).sum())
            probs, index = probs[:keep], index[:keep]
        # one uniform draw against the cumulative distribution: the same law as torch.multinomial, a fraction of
        # its time over a 65k vocabulary
        cumulative = probs.cumsum(0)
        u = torch.rand((), generator=self._generator, device=probs.device) * cumulative[-1]
        choice = min(int(torch.searchsorted(cumulative, u, right=True)), probs.numel() - 1)
        return int(index[choice]) if index is not None else choice


def _most_likely_covering(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens, sorted, enough of them to hold `mass` of the probability: a top-256 (or 4096) is a
    fraction of the time of sorting the whole vocabulary and gives the same nucleus whenever it holds the mass."""
    for k in (256, 4096):
        if k >= probs.numel():
            break
        values, index = probs.topk(k)
        if float(values.sum()) >= mass:
            return values, index
    return probs.sort(descending=True)
