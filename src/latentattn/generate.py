"""`latentattn generate`: sampling from a trained checkpoint through the attention caches.

A batch of ragged prompts is prefilled in one call (right padding, `n_new` = each prompt's length),
then decoded one token per step: MLA on its absorbed path over the latent cache, the MHA/GQA/MQA
family over its K/V cache. Prompts start with the checkpoint's BOS (a trained model's: the document
separator, as training documents do) and completions end at its EOS (`latentattn.tokens`).

Notation: B batch (prompts), vocab vocabulary size.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tokenizers import Tokenizer
from torch import Tensor

from latentattn.checkpoint import load_checkpoint
from latentattn.config import AttentionConfig, MLAConfig, mha_counterpart
from latentattn.model import LanguageModel
from latentattn.tokens import encode_prompt

MIN_TEMPERATURE = torch.finfo(torch.float32).tiny
"""The smallest normal float32: logits are sampled in fp32, where a subnormal divisor overflows them."""


@dataclass(frozen=True)
class SamplingConfig:
    """`temperature == 0` is greedy; `top_k` keeps the k likeliest tokens, `top_p` the smallest set whose
    probability reaches p (nucleus); both apply after the temperature. A positive temperature must be
    at least `MIN_TEMPERATURE` (below it, logits are divided into infinities or zeros)."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if (
            isinstance(t, bool)
            or not isinstance(t, int | float)
            or not (t == 0 or MIN_TEMPERATURE <= t < math.inf)
        ):
            raise ValueError(
                f"SamplingConfig.temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:.3g}, "
                f"got {t!r}"
            )
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"SamplingConfig.top_k must be positive, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must lie in (0, 1], got {self.top_p!r}")


def sample_next(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids `[B]` from logits `[B, vocab]`."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature  # <= 0: never +inf
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= sampling.top_p  # mass before this token already >= p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass(frozen=True)
class Generation:
    """Generated ids per prompt plus timing and cache figures of the run."""

    tokens: list[list[int]]
    prefill_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cache_tokens: int
    """Tokens held by the cache at the end, all sequences together."""
    cache_used_bytes: int
    cache_bytes_per_token: int
    """All layers together, in the cache's dtype."""

    @property
    def new_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else float("nan")


@torch.inference_mode()
def generate(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    eos_id: int | Sequence[int] | None = None,
    on_tokens: Callable[[list[int | None]], None] | None = None,
    latent_format: str | None = None,
) -> Generation:
    """Sample up to `max_new_tokens` per prompt through the model's cache (MLA: 8-bit latents with
    `latent_format` "int8" or "fp8").

    Prompts may have different lengths. A sequence stops after it emits `eos_id` (or any of several);
    `on_tokens` receives
    each step's new token per sequence (None for stopped ones).
    """
    lengths = [len(prompt) for prompt in prompts]
    if not prompts or min(lengths) == 0:
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    context = model.config.max_seq_len
    if max(lengths) + max_new_tokens > context:
        raise ValueError(
            f"prompt of {max(lengths)} tokens plus {max_new_tokens} new tokens exceeds the model's context "
            f"of {context} tokens"
        )
    device = model.embed.weight.device
    batch = len(prompts)
    padded = torch.zeros(batch, max(lengths), dtype=torch.long, device=device)  # [B, T] right-padded
    for b, prompt in enumerate(prompts):
        padded[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    n_new = torch.tensor(lengths, device=device)
    cache = model.new_cache(batch, max(lengths) + max_new_tokens, latent_format=latent_format)
    decode_mode = "absorbed" if isinstance(model.config.attention, MLAConfig) else "auto"
    stop_ids = torch.tensor(
        [eos_id] if isinstance(eos_id, int) else list(eos_id or ()), dtype=torch.long, device=device
    )

    start = time.perf_counter()
    logits = model(padded, cache, n_new=n_new)  # [B, T, vocab]
    logits = logits[torch.arange(batch, device=device), n_new - 1]  # [B, vocab] at each prompt's last token
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    outputs: list[list[int]] = [[] for _ in prompts]
    running = torch.ones(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample_next(logits, sampling, generator)  # [B]
        emitted = [
            int(t) if alive else None for t, alive in zip(token.tolist(), running.tolist(), strict=True)
        ]
        for b, t in enumerate(emitted):
            if t is not None:
                outputs[b].append(t)
        if on_tokens is not None:
            on_tokens(emitted)
        running &= ~torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        # Stopped sequences take no new token (n_new 0); their rows are computed and ignored.
        logits = model(token[:, None], cache, n_new=running.long(), mode=decode_mode)[:, 0]  # [B, vocab]
    decode_seconds = time.perf_counter() - start
    return Generation(
        tokens=outputs,
        prefill_tokens=sum(lengths),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        cache_tokens=int(cache.lengths.sum()),
        cache_used_bytes=cache.used_bytes,
        cache_bytes_per_token=cache.bytes_per_token,
    )


class Detokenizer:
    """One sequence's text, token by token: `add` returns the new text, holding back an incomplete UTF-8
    character; special tokens (BOS, EOS) add nothing."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.written = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        new = text[self.written :]
        self.written = max(self.written, len(text))
        return new


class _Streamer:
    """Writes the prompt, then its completion as the tokens arrive, to `out`."""

    def __init__(self, tokenizer: Tokenizer, prompt: str, out: TextIO) -> None:
        self.text, self.out = Detokenizer(tokenizer), out
        out.write(prompt)

    def __call__(self, tokens: list[int | None]) -> None:
        if tokens[0] is not None:
            self.out.write(self.text.add(tokens[0]))
            self.out.flush()

    def close(self) -> None:
        self.out.write("\n")


class _LineStreamer:
    """Writes a batch's completions to `out` as they arrive, one finished line at a time as `[i] line`
    (i: the prompt's number, from 1); a sequence's last partial line follows when it emits one of
    `eos_ids`, or at `close`."""

    def __init__(
        self, tokenizer: Tokenizer, prompts: Sequence[str], out: TextIO, eos_ids: Sequence[int]
    ) -> None:
        self.texts = [Detokenizer(tokenizer) for _ in prompts]
        self.pending = list(prompts)  # per sequence: the unfinished line, not written yet
        self.out, self.eos_ids = out, set(eos_ids)

    def __call__(self, tokens: list[int | None]) -> None:
        for i, token in enumerate(tokens):
            if token is None:
                continue
            *lines, self.pending[i] = (self.pending[i] + self.texts[i].add(token)).split("\n")
            self.out.write("".join(f"[{i + 1}] {line}\n" for line in lines))
            if token in self.eos_ids:
                self._finish(i)
        self.out.flush()

    def close(self) -> None:
        for i in range(len(self.pending)):
            self._finish(i)

    def _finish(self, i: int) -> None:
        if self.pending[i]:
            self.out.write(f"[{i + 1}] {self.pending[i]}\n")
            self.pending[i] = ""


def run_generate(
    checkpoint: str | Path,
    *,
    prompts: Sequence[str] = ("",),
    max_new_tokens: int = 200,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    latent_format: str | None = None,
    device: torch.device | str = "cpu",
    out: TextIO | None = None,
) -> Generation:
    """Load `checkpoint` onto `device`, sample a completion for each prompt and print it, then the speed
    and cache size (MLA models may keep their latents in 8 bits: `latent_format` "int8" or "fp8").

    Text streams to `out` (default stdout) as it is produced: one prompt as plain text, several line by
    line, each line prefixed with its prompt's number (`[2] ...`). A completion ends at the checkpoint's
    EOS, which is not printed.
    """
    out = out or sys.stdout
    for i, prompt in enumerate(prompts):
        check_utf8(prompt, f"prompt {i + 1}")
    loaded = load_checkpoint(checkpoint, device=device)
    tokenizer, config, tokens = loaded.tokenizer, loaded.config, loaded.tokens
    encoded = [encode_prompt(tokenizer, tokens, prompt) for prompt in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i + 1} is empty and the model has no BOS token to start from")
        if len(ids) >= config.max_seq_len:
            raise ValueError(
                f"prompt {i + 1} has {len(ids)} tokens (with BOS); the model's context "
                f"is {config.max_seq_len}"
            )
    room = config.max_seq_len - max(map(len, encoded))
    if max_new_tokens > room:
        print(
            f"note: the model's context is {config.max_seq_len} tokens; generating {room} new tokens, "
            f"not {max_new_tokens}",
            file=sys.stderr,
        )
        max_new_tokens = room
    streamer = (
        _Streamer(tokenizer, prompts[0], out)
        if len(prompts) == 1
        else _LineStreamer(tokenizer, prompts, out, tokens.eos_ids)
    )
    result = generate(
        loaded.model,
        encoded,
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingConfig(),
        generator=torch.Generator(device=device).manual_seed(seed),
        eos_id=tokens.eos_ids,
        on_tokens=streamer,
        latent_format=latent_format,
    )
    streamer.close()
    out.write("\n")
    out.write(_report(result, config.attention, config.n_layers, loaded.model.embed.weight.element_size()))
    return result


def check_utf8(text: str, name: str) -> None:
    """Raise a ValueError naming the first byte of `text` that is not UTF-8: command-line arguments
    carry such bytes as lone surrogates (Python's surrogateescape), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = text[error.start]
        byte = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        raise ValueError(f"{name} is not valid UTF-8 text: {byte} at character {error.start}") from None


def _report(result: Generation, attention: AttentionConfig, n_layers: int, element_size: int) -> str:
    mha_bytes_per_token = mha_counterpart(attention).cache_width * n_layers * element_size
    mha_bytes = result.cache_tokens * mha_bytes_per_token
    kind = attention.kind.upper()
    return (
        f"{result.new_tokens} new tokens in {result.decode_seconds:.2f} s: "
        f"{result.decode_tokens_per_s:.1f} tokens/s decode "
        f"(prefill {result.prefill_tokens} tokens in {result.prefill_seconds * 1e3:.0f} ms)\n"
        f"KV cache: {result.cache_tokens} tokens x {result.cache_bytes_per_token:,} B/token = "
        f"{result.cache_used_bytes:,} B with {kind}; MHA of the same shape "
        f"({mha_bytes_per_token:,} B/token): {mha_bytes:,} B "
        f"({mha_bytes / max(1, result.cache_used_bytes):.1f}x)\n"
    )
