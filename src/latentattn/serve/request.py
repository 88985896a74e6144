"""One request's state in the engine: its tokens, how many the cache holds, its text and how it ended.

A request's `tokens` are its prompt then its output, append-only; `computed` of them are in the paged
cache (0 again after a preemption: they are recomputed), so the next step feeds `tokens[computed:]`
(the whole rest of the prompt in chunks, then one token per step). Output text is detokenized token by
token; text that could begin a stop string is held back until the next token decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from latentattn.generate import Detokenizer
from latentattn.serve.sampling import SamplingParams, find_stop, held_back

FinishReason = str
""""stop" (EOS or a stop string), "length" (max_tokens), "cancelled" (the client left; the engine shut
down) or "error" (the model failed: `Output.error` says why)."""


@dataclass(frozen=True)
class Output:
    """What a request's consumer receives after a step: the new tokens and text; `finish_reason` on
    the last one."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """A prompt, its sampling parameters and its progress; `sink` receives each `Output` (called from the
    engine's thread); its random generator lives on the model's `device`."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        sink: Callable[[Output], None],
        *,
        tokenizer: Tokenizer | None = None,
        eos_ids: tuple[int, ...] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.id = request_id
        self.tokens = list(prompt)
        self.n_prompt = len(prompt)
        self.params = params
        self.config = params.config
        self.generator = params.generator(device)
        self.sink = sink
        self.eos_ids = frozenset(eos_ids)
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.text = ""
        self.streamed = 0  # characters of `text` sent to `sink`
        self.seq: int | None = None  # the paged cache's sequence id while running
        self.computed = 0
        self.block_hashes: list[bytes] = []
        self.finish_reason: FinishReason | None = None
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.tokens) - self.computed

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    def append(self, token: int) -> None:
        """Take a sampled token: update the text and decide whether the request is done."""
        self.tokens.append(token)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        stop = self.params.stop
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif self.detokenizer is not None:
            self.text += self.detokenizer.add(token)
            cut = find_stop(self.text, stop) if stop else None
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def emit(self, new_tokens: list[int], *, error: str | None = None) -> None:
        """Send `new_tokens` and the text that is certain by now (all of it once finished)."""
        end = len(self.text)
        if self.finish_reason is None and self.params.stop:
            end -= held_back(self.text, self.params.stop)
        text, self.streamed = self.text[self.streamed : end], max(self.streamed, end)
        self.sink(
            Output(
                token_ids=new_tokens,
                text=text,
                finish_reason=self.finish_reason,
                prompt_tokens=self.n_prompt,
                completion_tokens=len(self.output_ids),
                error=error,
            )
        )
