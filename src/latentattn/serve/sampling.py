"""Per-request sampling: the parameters an API request carries, its own random generator, stop strings.

The rules themselves (temperature, top-k, top-p) are `latentattn.generate`'s `SamplingConfig` and
`sample_next`; a request adds `max_tokens`, a `seed` and `stop` strings. Each request draws from its own
`torch.Generator`, so a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from latentattn.generate import SamplingConfig, sample_next

MAX_STOP_STRINGS = 4
"""OpenAI's limit on `stop` strings per request."""


@dataclass(frozen=True)
class SamplingParams:
    """`temperature` 0 is greedy; `top_k`/`top_p` as in `SamplingConfig`; at most `max_tokens` new tokens;
    the completion ends before the first of the `stop` strings it would contain."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, int | float) or math.isnan(self.top_p)):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        self.config  # noqa: B018 - SamplingConfig checks temperature, top_k and top_p

    @property
    def config(self) -> SamplingConfig:
        """The sampling rules (`top_k` 0 or -1 means no top-k, as in vLLM; `top_p` 1 means none)."""
        try:
            return SamplingConfig(
                temperature=self.temperature,
                top_k=None if self.top_k in (None, 0, -1) else self.top_k,
                top_p=None if self.top_p in (None, 1) else self.top_p,
            )
        except ValueError as error:
            raise ValueError(str(error).removeprefix("SamplingConfig.")) from None

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator of this request's own: seeded with `seed`, else with fresh random bits."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)


def sample_rows(
    logits: Tensor, configs: list[SamplingConfig], generators: list[torch.Generator]
) -> list[int]:
    """One token per row of `logits: [B, V]`, row b under `configs[b]` with `generators[b]`: greedy rows
    in one argmax, the others one by one (each request's generator draws only its own tokens)."""
    tokens = logits.argmax(dim=-1).tolist()
    for b, (config, generator) in enumerate(zip(configs, generators, strict=True)):
        if config.temperature != 0:
            tokens[b] = int(sample_next(logits[b : b + 1], config, generator)[0])
    return tokens


def find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first of the `stop` strings starts in `text`, or None."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could begin a stop string: not streamed until the next
    token shows whether the stop string follows."""
    return max(
        (n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
        default=0,
    )
