"""Continuous batching over a model-wide paged cache (iteration-level scheduling, as Orca and vLLM).

Every `step`:
1. applies cancellations and takes newly submitted requests into the waiting queue;
2. schedules: each running request gets one token (decode) or its next prompt chunk, decodes first,
   at most `max_batch_tokens` tokens in all; when the blocks they need are not free, blocks only the
   prefix cache holds are evicted, then the newest running requests are preempted (their blocks freed,
   they go back to the front of the queue and are recomputed later); then waiting requests are admitted
   in arrival order while the blocks for their whole current tokens are free and fewer than
   `max_batch_seqs` run, sharing the cached blocks of their longest known prefix;
3. runs the one-token rows (decodes) in one batched forward and the prompt chunks in another, ragged
   (`n_new[b]` = row b's chunk; decodes are never padded to a chunk's length), and samples a token
   for every row that reached the end of its tokens.

A request that could never fit (its prompt plus `max_tokens` beyond the model's context, or more blocks
than the whole cache) is rejected by `submit` with the reason. The cache never holds more blocks than
its budget: a step is only planned once its blocks are free. `start` runs the loop in a worker thread;
`submit`/`cancel`/`shutdown` may be called from any thread, and outputs reach each request's `sink`
from the worker thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from latentattn.caches import PagedModelCache
from latentattn.config import check_positive_ints
from latentattn.model import LanguageModel
from latentattn.serve.prefix_cache import PrefixCache, extend_hashes
from latentattn.serve.request import Output, Request
from latentattn.serve.sampling import SamplingParams, sample_rows

log = logging.getLogger(__name__)

RATE_WINDOW_SECONDS = 10.0
"""Tokens/s are averaged over this many most recent seconds."""


class RequestRejected(ValueError):
    """The request can never be served (too long for the context or the cache); the message says why."""


class QueueFull(RuntimeError):
    """`max_queue` requests are waiting already; try again later."""


class ShuttingDown(RuntimeError):
    """The engine admits no new requests."""


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler limits: sequences per step, tokens per step (prompt chunks plus decodes), and waiting
    requests before `submit` refuses more."""

    max_batch_seqs: int = 32
    max_batch_tokens: int = 512
    max_queue: int = 256
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(
            "EngineConfig",
            max_batch_seqs=self.max_batch_seqs,
            max_batch_tokens=self.max_batch_tokens,
            max_queue=self.max_queue,
        )


@dataclass
class EngineStats:
    """Counters since start; seconds are sums over steps."""

    steps: int = 0
    step_seconds: float = 0.0
    scheduler_seconds: float = 0.0
    last_step_seconds: float = 0.0
    prompt_tokens: int = 0
    """Tokens fed as prompt chunks (recomputed ones after a preemption included)."""
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    max_running: int = 0
    recent: deque = field(default_factory=deque)
    """(time, tokens generated) per step of the last `RATE_WINDOW_SECONDS` (the engine's thread appends
    and trims; readers copy it first)."""

    def add_tokens(self, now: float, n: int) -> None:
        self.generated_tokens += n
        self.recent.append((now, n))
        while self.recent[0][0] < now - RATE_WINDOW_SECONDS:
            self.recent.popleft()

    def tokens_per_s(self, now: float) -> float:
        recent = [(t, n) for t, n in list(self.recent) if t >= now - RATE_WINDOW_SECONDS]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], RATE_WINDOW_SECONDS / 10)


class Engine:
    """Serves requests for `model` from the blocks of `cache` (from `model.new_paged_cache`)."""

    def __init__(
        self,
        model: LanguageModel,
        cache: PagedModelCache,
        config: EngineConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.model = model.eval()
        self.cache = cache
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.device = model.embed.weight.device
        self.prefix = PrefixCache(cache) if self.config.prefix_caching else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.stats = EngineStats()
        self._condition = threading.Condition()
        self._incoming: list[Request] = []
        self._cancelled: list[Request] = []
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._planned = 0  # blocks the rows scheduled so far will take when the step begins

    # Any thread ------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        sink: Callable[[Output], None],
        request_id: str | None = None,
    ) -> Request:
        """Queue a request; raises RequestRejected (never servable), QueueFull or ShuttingDown."""
        try:
            self._check_servable(prompt, params)
        except RequestRejected:
            self.stats.rejected += 1
            raise
        with self._condition:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._incoming) + len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are waiting already")
            request = Request(
                request_id or f"req-{self._next_id}",
                prompt,
                params,
                sink,
                tokenizer=self.tokenizer,
                eos_ids=self.eos_ids,
                device=self.device,
            )
            self._next_id += 1
            self._incoming.append(request)
            self._condition.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step and free its blocks (nothing happens if it has finished)."""
        with self._condition:
            self._cancelled.append(request)
            self._condition.notify()

    def start(self) -> None:
        """Run the engine loop in a worker thread."""
        self._thread = threading.Thread(target=self._loop, name="latentattn-engine", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Serve one tiny request before the worker thread starts (a first forward loads kernels and
        allocates workspaces), then forget it: no prefix-cache entry, zeroed counters."""
        self.submit([0, 0], SamplingParams(max_tokens=2, temperature=0), lambda output: None)
        while self.busy:
            self.step()
        if self.prefix is not None:
            self.prefix.clear()
            self.prefix.query_tokens = self.prefix.hit_tokens = 0
        self.stats = EngineStats()

    def shutdown(self, grace_seconds: float) -> None:
        """Admit nothing new; let queued and running requests finish for up to `grace_seconds`, cancel the
        rest, then stop the worker thread."""
        with self._condition:
            self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self.busy and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.01)
        with self._condition:
            self._cancelled.extend(self._incoming + list(self.waiting) + self.running)
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._take_requests()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def busy(self) -> bool:
        return bool(self._incoming or self.waiting or self.running)

    @property
    def max_context(self) -> int:
        return self.model.config.max_seq_len

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for /metrics (read from any thread: plain numbers)."""
        cache, stats = self.cache, self.stats
        prefix = self.prefix
        return {
            "running": len(self.running),
            "waiting": len(self.waiting) + len(self._incoming),
            "max_running": stats.max_running,
            "preemptions": stats.preemptions,
            "finished": stats.finished,
            "cancelled": stats.cancelled,
            "rejected": stats.rejected,
            "blocks_total": cache.num_blocks,
            "blocks_free": cache.num_free_blocks,
            "blocks_used": cache.num_used_blocks,
            "blocks_prefix_cached": len(prefix.blocks) if prefix else 0,
            "kv_bytes_used": cache.used_bytes,
            "kv_bytes_total": cache.nbytes,
            "prefix_query_tokens": prefix.query_tokens if prefix else 0,
            "prefix_hit_tokens": prefix.hit_tokens if prefix else 0,
            "prefix_hit_rate": prefix.hit_rate if prefix else 0.0,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "tokens_per_s": stats.tokens_per_s(time.perf_counter()),
            "steps": stats.steps,
            "step_seconds": stats.step_seconds,
            "last_step_seconds": stats.last_step_seconds,
            "scheduler_seconds": stats.scheduler_seconds,
        }

    # The worker thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not (self._stopping or self.busy or self._cancelled):
                    self._condition.wait()
                if self._stopping and not (self._incoming or self._cancelled):
                    return
            try:
                self.step()
            except Exception as error:  # a scheduler bug: fail every request rather than hang them all
                log.exception("engine step failed")
                for request in [*self.running, *self.waiting]:
                    self._finish(request, "error", error=f"{type(error).__name__}: {error}")

    def step(self) -> bool:
        """One iteration: cancellations, admissions, one batched forward, sampling. Returns whether a
        forward ran."""
        start = time.perf_counter()
        self._take_requests()
        rows = self._schedule()
        scheduled = time.perf_counter()
        if rows:
            try:
                self._run(rows)
            except Exception as error:  # a bug or out of memory: fail this batch's requests, keep serving
                log.exception("engine step failed")
                for request, _ in rows:
                    self._finish(request, "error", error=f"{type(error).__name__}: {error}")
        end = time.perf_counter()
        stats = self.stats
        stats.steps += bool(rows)
        stats.scheduler_seconds += scheduled - start
        if rows:
            stats.step_seconds += end - start
            stats.last_step_seconds = end - start
        stats.max_running = max(stats.max_running, len(self.running))
        return bool(rows)

    def _check_servable(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise RequestRejected("the prompt is empty (and the model has no BOS token to start from)")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise RequestRejected(f"prompt token ids must lie in [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_context:
            raise RequestRejected(
                f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} exceed the "
                f"model's context of {self.max_context} tokens"
            )
        block = self.cache.block_size
        blocks = math.ceil((total - 1) / block)  # the last sampled token is never fed
        if blocks > self.cache.num_blocks:
            raise RequestRejected(
                f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} need {blocks} blocks "
                f"of {block} tokens; the whole KV cache holds {self.cache.num_blocks}"
            )
        if params.stop and self.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer; this engine has none")

    def _take_requests(self) -> None:
        with self._condition:
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, []
        self.waiting.extend(incoming)
        for request in cancelled:
            if request.finish_reason is None:
                self._finish(request, "cancelled")

    def _schedule(self) -> list[tuple[Request, int]]:
        """Rows `(request, tokens to feed)` of the next forward, blocks for them guaranteed free."""
        budget = self.config.max_batch_tokens
        rows: list[tuple[Request, int]] = []
        self._planned = 0
        decodes = [r for r in self.running if r.pending == 1]
        prefills = [r for r in self.running if r.pending > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.finish_reason is not None or request.seq is None:  # preempted this step
                continue
            n = min(request.pending, budget)
            if self._make_room(request, n, rows):
                rows.append((request, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_seqs:
            request = self.waiting[0]
            if not self._admit(request):
                break
            self.waiting.popleft()
            n = min(request.pending, budget)
            if self._make_room(request, n, rows):
                rows.append((request, n))
                budget -= n
        return rows

    def _available(self) -> int:
        return self.cache.num_free_blocks - self._planned

    def _make_room(self, request: Request, n: int, rows: list[tuple[Request, int]]) -> bool:
        """Plan the blocks `request` takes to feed `n` tokens: evict prefix-cache blocks, then preempt the
        newest unscheduled requests (this one last) until they are free. False if it was preempted."""
        need = self.cache.blocks_needed(request.seq, n)
        scheduled = {id(r) for r, _ in rows}
        while need > self._available():
            if self.prefix is not None and self.prefix.evict(need - self._available()):
                continue
            victims = [r for r in self.running if id(r) not in scheduled and r is not request]
            victim = victims[-1] if victims else request
            self._preempt(victim)
            if victim is request:
                return False
        self._planned += need
        return True

    def _admit(self, request: Request) -> bool:
        """Start `request` as a sequence over its longest cached prefix, if the blocks for all its current
        tokens are (or can be made) free; else leave it waiting."""
        block = self.cache.block_size
        prefix_blocks: list[int] = []
        if self.prefix is not None:
            hashes = extend_hashes(request.block_hashes, request.tokens, block)
            usable = hashes[: (len(request.tokens) - 1) // block]  # keep a token to compute the logits from
            prefix_blocks = self.prefix.lookup(usable)
        seq = self.cache.add_sequence(prefix_blocks)
        need = self.cache.blocks_needed(seq, len(request.tokens) - len(prefix_blocks) * block)
        evictable = self.prefix.evictable if self.prefix is not None else 0
        if need > self._available() + evictable:
            self.cache.free(seq)
            return False
        request.seq, request.computed = seq, len(prefix_blocks) * block
        self.running.append(request)
        if self.prefix is not None:
            self.prefix.count(len(request.tokens), len(prefix_blocks))
        return True

    def _preempt(self, request: Request) -> None:
        """Free `request`'s blocks and queue it first, to be recomputed from its tokens so far."""
        self.cache.free(request.seq)
        request.seq, request.computed = None, 0
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.stats.preemptions += 1

    def _forward(self, rows: list[tuple[Request, int]]) -> torch.Tensor:
        """One forward over `rows` (right-padded to the longest chunk); the logits `[B, V]` of each row's
        last real token."""
        width = max(n for _, n in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T]
        for b, (request, n) in enumerate(rows):
            tokens[b, :n] = torch.tensor(request.tokens[request.computed : request.computed + n])
        n_new = [n for _, n in rows]
        self.cache.select([request.seq for request, _ in rows])
        # Positions past a row's real tokens are padding (never written, masked): only real ends must fit
        # the context, which `submit` guarantees, so the model's whole-batch check is skipped.
        with self.cache.stepping(width, n_new) as step:
            logits = self.model.forward_step(tokens.to(self.device), self.cache, step)  # [B, T, V]
        last = torch.tensor(n_new, device=self.device) - 1
        return logits[torch.arange(len(rows), device=self.device), last]

    def _finish(
        self, request: Request, reason: str, new_tokens: list[int] | None = None, error: str | None = None
    ) -> None:
        """Free `request`'s blocks, take it off the queues and send its last output."""
        if request.seq is not None:
            self.cache.free(request.seq)
            request.seq = None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish_reason = reason
        self.stats.finished += reason in ("stop", "length")
        self.stats.cancelled += reason == "cancelled"
        request.emit(new_tokens or [], error=error)

    @torch.inference_mode()
    def _run(self, rows: list[tuple[Request, int]]) -> None:
        """The step's forwards, then sampling: decodes (one token each) in one batched forward, prompt
        chunks in another, so that no decode row is padded to a chunk's length."""
        decodes = [row for row in rows if row[1] == 1]
        chunks = [row for row in rows if row[1] > 1]
        groups = [group for group in (decodes, chunks) if group]
        last = torch.cat([self._forward(group) for group in groups])  # [rows, V]: each row's last logits
        rows = [row for group in groups for row in group]
        block = self.cache.block_size
        sampled = []
        for b, (request, n) in enumerate(rows):
            self.stats.prompt_tokens += min(n, max(0, request.n_prompt - request.computed))
            request.computed += n
            if request.pending == 0:
                sampled.append(b)
            if self.prefix is not None:
                full = self.cache.full_blocks(request.seq)
                hashes = extend_hashes(request.block_hashes, request.tokens[: len(full) * block], block)
                self.prefix.insert(hashes[: len(full)], full)
        if not sampled:
            return
        requests = [rows[b][0] for b in sampled]
        new = sample_rows(
            last[torch.tensor(sampled, device=self.device)],
            [r.config for r in requests],
            [r.generator for r in requests],
        )
        self.stats.add_tokens(time.perf_counter(), len(new))
        for request, token in zip(requests, new, strict=True):
            request.append(token)
            if request.finish_reason is None:
                request.emit([token])
            else:
                self._finish(request, request.finish_reason, [token])
