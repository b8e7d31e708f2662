"""Per-request sampling: each request in a batch keeps its own temperature, top-p, top-k, repetition penalty and
random generator, so what it gets does not depend on who else is being served in the same step."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from catdog_glm.errors import ConfigError

if TYPE_CHECKING:
    import torch

# ChatGLM3's demos sample with top_p 0.8, temperature 0.8.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class Sampling:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None  # ChatGLM style: prompt + new tokens
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> Sampling:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("top_k must be >= 0 and repetition_penalty > 0")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop must be a list of non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenSampler:
    """One request's next-token choice from its logits row. Seeded requests draw from their own generator, so a
    seed reproduces the same reply whatever else shares the batch."""

    def __init__(self, sampling: Sampling, prompt: list[int]):
        self.s = sampling
        self._prompt = prompt
        self._seen: torch.Tensor | None = None  # tokens the repetition penalty applies to (prompt + reply)
        self._generator: torch.Generator | None = None

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalty: the batch takes one argmax over all such rows at once."""
        return self.s.greedy and self.s.repetition_penalty == 1.0

    def observe(self, token: int) -> None:
        if self._seen is not None:
            self._seen[token] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits`: this request's float32 row [vocab]; it may be modified in place."""
        import torch

        s = self.s
        if s.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                self._seen[torch.tensor(self._prompt, dtype=torch.long, device=logits.device)] = True
            penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(self._seen, penalized, logits)
        if s.greedy:
            return int(logits.argmax())
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            self._generator.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
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
