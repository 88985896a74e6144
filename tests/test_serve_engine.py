"""The continuous-batching engine: admission, chunked prefill, preemption, prefix sharing, cancellation.

Oracles: `latentattn.generate.generate` (contiguous cache, one prompt at a time) for greedy tokens
(fp64: identical tokens); the same request served alone for batch invariance (fp64: identical tokens,
fp32: logits within 1e-4 relative); the paged cache's reference counts (`check_invariants`) for leaks.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentattn.generate import SamplingConfig, generate
from latentattn.metrics import relative_error
from latentattn.serve import engine as engine_module
from latentattn.serve.engine import Engine, EngineConfig, QueueFull, RequestRejected, ShuttingDown
from latentattn.serve.request import Output
from latentattn.serve.sampling import SamplingParams
from test_generate import _context_sensitive_model
from test_paged_cache import check_invariants

BLOCK = 4
GREEDY = SamplingParams(max_tokens=10, temperature=0)
MODELS = {kind: _context_sensitive_model(kind) for kind in ("mla", "gqa")}
PROMPTS = [[5, 17, 42, 7, 99, 3, 250], [11], [64, 8, 300, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7]]


class Collector:
    """Outputs per request, as a sink."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []

    def __call__(self, output: Output) -> None:
        self.outputs.append(output)

    @property
    def tokens(self) -> list[int]:
        return [t for output in self.outputs for t in output.token_ids]

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[-1].finish_reason if self.outputs else None


def new_engine(kind="mla", num_blocks=64, model=None, **config) -> Engine:
    model = model or MODELS[kind]
    return Engine(
        model, model.new_paged_cache(num_blocks=num_blocks, block_size=BLOCK), EngineConfig(**config)
    )


def drain(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


def serve(engine: Engine, prompts, params=GREEDY, stagger: int = 0) -> list[Collector]:
    """Submit `prompts` (one every `stagger` steps) and run until all finish."""
    sinks = []
    for prompt in prompts:
        sinks.append(Collector())
        engine.submit(prompt, params, sinks[-1])
        for _ in range(stagger):
            engine.step()
    drain(engine)
    return sinks


def assert_no_leak(engine: Engine) -> None:
    check_invariants(engine.cache)
    assert not engine.cache.tables  # no sequence left
    cached = len(engine.prefix.blocks) if engine.prefix else 0
    assert engine.cache.num_free_blocks + cached == engine.cache.num_blocks


@pytest.mark.parametrize("kind", ["mla", "gqa"])
@pytest.mark.parametrize("stagger", [0, 1, 3])
def test_greedy_tokens_equal_generate_whatever_the_batch(kind, stagger):
    """Chunked prefill (8 tokens a step) alongside decodes, requests arriving mid-run: each request's
    tokens equal `generate` on its prompt alone (fp64, identical)."""
    model = MODELS[kind]
    expected = [
        generate(model, [p], max_new_tokens=10, sampling=SamplingConfig(temperature=0)).tokens[0]
        for p in PROMPTS
    ]
    engine = new_engine(kind, max_batch_tokens=8)
    sinks = serve(engine, PROMPTS, stagger=stagger)
    assert [s.tokens for s in sinks] == expected
    assert {s.finish_reason for s in sinks} == {"length"}
    assert sinks[0].outputs[-1].completion_tokens == 10 and sinks[0].outputs[-1].prompt_tokens == 7
    assert_no_leak(engine)


def test_int8_latents_serve_the_tokens_generate_gives_with_int8_latents():
    """Oracle: `generate` over the contiguous cache with the same 8-bit latents (same stored values)."""
    model = MODELS["mla"]
    greedy = SamplingConfig(temperature=0)
    expected = [
        generate(model, [p], max_new_tokens=10, sampling=greedy, latent_format="int8").tokens[0]
        for p in PROMPTS
    ]
    cache = model.new_paged_cache(num_blocks=64, block_size=BLOCK, latent_format="int8")
    engine = Engine(model, cache, EngineConfig(max_batch_tokens=8))
    assert [s.tokens for s in serve(engine, PROMPTS, stagger=1)] == expected
    assert_no_leak(engine)


def test_fp32_logits_do_not_depend_on_the_batch(monkeypatch):
    """Each sampled row's logits, served alone vs among other requests: within 1e-4 relative (fp32)."""
    torch.manual_seed(0)
    model = _context_sensitive_model("mla").float()
    seen: list[list[torch.Tensor]] = []
    original = engine_module.sample_rows

    def recording(logits, configs, generators):
        seen.append([row.clone() for row in logits])
        return original(logits, configs, generators)

    monkeypatch.setattr(engine_module, "sample_rows", recording)
    serve(new_engine(model=model), [PROMPTS[0]])
    alone = [rows[0] for rows in seen]
    seen.clear()
    serve(new_engine(model=model, max_batch_tokens=6), [PROMPTS[0], *PROMPTS[1:]])
    mixed = [rows[0] for rows in seen[: len(alone)]]  # request 0 is row 0 while it runs (oldest first)
    assert len(mixed) == len(alone) == 10
    for a, m in zip(alone, mixed, strict=True):
        assert relative_error(m, a) <= 1e-4


def test_admission_is_capped_by_max_batch_seqs():
    engine = new_engine(max_batch_seqs=2)
    sinks = []
    for prompt in PROMPTS:
        sinks.append(Collector())
        engine.submit(prompt, GREEDY, sinks[-1])
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    drain(engine)
    assert engine.stats.max_running == 2 and all(s.finish_reason == "length" for s in sinks)


def test_prefill_runs_in_chunks_of_max_batch_tokens(monkeypatch):
    chunks = []
    engine = new_engine(max_batch_tokens=6)
    original = engine._run
    monkeypatch.setattr(engine, "_run", lambda rows: (chunks.append([n for _, n in rows]), original(rows)))
    serve(engine, [list(range(1, 16))], SamplingParams(max_tokens=2, temperature=0))
    assert chunks == [[6], [6], [3], [1]]  # 15 prompt tokens in chunks of 6, then one decode
    assert engine.stats.prompt_tokens == 15 and engine.stats.generated_tokens == 2


def test_preemption_under_a_tiny_budget_recomputes_and_changes_no_token():
    """6 blocks of 4 tokens: three requests of 7 + 10 tokens cannot all hold their blocks; the newest are
    preempted and recomputed, and every request still gets `generate`'s tokens."""
    prompts = [PROMPTS[0], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 8]]
    expected = [
        generate(MODELS["mla"], [p], max_new_tokens=10, sampling=SamplingConfig(temperature=0)).tokens[0]
        for p in prompts
    ]
    engine = new_engine(num_blocks=6, prefix_caching=False)
    sinks = serve(engine, prompts)
    assert engine.stats.preemptions > 0
    assert [s.tokens for s in sinks] == expected
    assert_no_leak(engine)


def test_requests_sharing_a_prefix_share_its_blocks():
    """Two 13-token prompts with the same first 12 tokens: the second reuses the first's 3 full blocks
    (12 tokens of 13 asked: at least one token is always computed) and its tokens are unchanged."""
    prefix = list(range(20, 32))
    engine = new_engine()
    first, second = serve(engine, [[*prefix, 1]]), None
    blocks_before = engine.cache.num_used_blocks
    second = serve(engine, [[*prefix, 2]])
    assert engine.prefix.hit_tokens == 12 and engine.prefix.query_tokens == 26
    alone = serve(new_engine(prefix_caching=False), [[*prefix, 2]])
    assert second[0].tokens == alone[0].tokens and first[0].tokens != second[0].tokens
    assert engine.cache.num_used_blocks == blocks_before + 2  # only the second's own full blocks are new
    assert_no_leak(engine)


def test_cancellation_frees_blocks_at_the_next_step():
    engine = new_engine()
    sink = Collector()
    request = engine.submit(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0), sink)
    engine.step()
    engine.step()
    assert engine.cache.tables
    engine.cancel(request)
    engine.step()
    assert sink.finish_reason == "cancelled" and not engine.busy
    assert_no_leak(engine)


def test_requests_that_can_never_fit_are_rejected_with_the_reason():
    engine = new_engine(num_blocks=4)
    with pytest.raises(RequestRejected, match="exceed the model's context of 64 tokens"):
        engine.submit([1] * 60, SamplingParams(max_tokens=5), Collector())
    with pytest.raises(RequestRejected, match="need 5 blocks of 4 tokens; the whole KV cache holds 4"):
        engine.submit([1] * 10, SamplingParams(max_tokens=8), Collector())
    with pytest.raises(RequestRejected, match="prompt is empty"):
        engine.submit([], SamplingParams(), Collector())
    with pytest.raises(RequestRejected, match=r"lie in \[0, 384\)"):
        engine.submit([384], SamplingParams(), Collector())
    assert engine.stats.rejected == 4 and not engine.busy


def test_queue_full_and_shutting_down_refuse_new_requests():
    engine = new_engine(max_queue=2)
    engine.submit([1], GREEDY, Collector())
    engine.submit([2], GREEDY, Collector())
    with pytest.raises(QueueFull):
        engine.submit([3], GREEDY, Collector())
    engine.shutdown(grace_seconds=0)  # no worker thread: cancels at once
    with pytest.raises(ShuttingDown):
        engine.submit([3], GREEDY, Collector())
    assert not engine.busy
    assert_no_leak(engine)


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch():
    params = SamplingParams(max_tokens=12, temperature=1.5, top_k=50, seed=1234)
    alone = serve(new_engine(), [PROMPTS[0]], params)[0].tokens
    batch = serve(new_engine(max_batch_tokens=5), [PROMPTS[2], PROMPTS[0], PROMPTS[1]], params)
    assert batch[1].tokens == alone
    unseeded = SamplingParams(max_tokens=12, temperature=1.5, top_k=50)
    assert serve(new_engine(), [PROMPTS[0]], unseeded)[0].tokens != alone  # 384^-12 odds of a false alarm


def test_the_worker_thread_streams_to_asyncio_consumers():
    """`start` runs the loop in a thread; outputs reach an asyncio.Queue via call_soon_threadsafe."""
    engine = new_engine()
    engine.start()

    async def consume() -> list[int]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(PROMPTS[0], GREEDY, lambda output: loop.call_soon_threadsafe(queue.put_nowait, output))
        tokens = []
        while True:
            output = await asyncio.wait_for(queue.get(), timeout=30)
            tokens += output.token_ids
            if output.finish_reason:
                return tokens

    try:
        tokens = asyncio.run(consume())
    finally:
        engine.shutdown(grace_seconds=1)
    expected = generate(
        MODELS["mla"], [PROMPTS[0]], max_new_tokens=10, sampling=SamplingConfig(temperature=0)
    )
    assert tokens == expected.tokens[0]
    assert engine._thread is not None and not engine._thread.is_alive()


@settings(max_examples=25, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["submit", "submit", "cancel", "step", "step", "step"]),
            st.integers(1, 30),  # prompt length
            st.integers(1, 20),  # max_tokens
            st.integers(0, 3),  # prompt family: shared prefixes
        ),
        min_size=1,
        max_size=40,
    ),
    num_blocks=st.integers(3, 12),
    max_batch_tokens=st.integers(1, 12),
    max_batch_seqs=st.integers(1, 4),
)
def test_random_arrivals_cancels_and_finishes_never_leak_nor_exceed_the_budget(
    events, num_blocks, max_batch_tokens, max_batch_seqs
):
    """Every submitted request ends (length, or cancelled) or is rejected with a reason; reference
    counts stay exact after every step; at the end every block is free or held only by the prefix cache."""
    engine = new_engine(
        num_blocks=num_blocks, max_batch_tokens=max_batch_tokens, max_batch_seqs=max_batch_seqs, max_queue=100
    )
    submitted = []
    for op, length, max_tokens, family in events:
        if op == "submit":
            sink = Collector()
            prompt = [(family * 31 + i) % 384 for i in range(length)]
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            if -(-(length + max_tokens - 1) // BLOCK) > num_blocks:  # more blocks than the whole cache
                with pytest.raises(RequestRejected, match="the whole KV cache holds"):
                    engine.submit(prompt, params, sink)
            else:
                submitted.append((engine.submit(prompt, params, sink), sink))
        elif op == "cancel" and submitted:
            engine.cancel(submitted[length % len(submitted)][0])
        else:
            engine.step()
        check_invariants(engine.cache)
        assert engine.cache.num_used_blocks <= num_blocks and len(engine.running) <= max_batch_seqs
    drain(engine)
    for request, sink in submitted:
        assert sink.finish_reason in ("length", "cancelled")
        if sink.finish_reason == "length":
            assert len(sink.tokens) == request.params.max_tokens
    assert_no_leak(engine)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(monkeypatch):
    """A scheduler bug in the worker thread ends the requests with finish reason "error" (and the
    message) instead of hanging them; the next request is served."""
    engine = new_engine()
    original = engine._schedule
    calls = iter([True])
    monkeypatch.setattr(engine, "_schedule", lambda: original() if not next(calls, False) else 1 / 0)
    failed, served = Collector(), Collector()
    engine.submit(PROMPTS[0], GREEDY, failed)
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while failed.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(PROMPTS[1], GREEDY, served)
        while served.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.shutdown(grace_seconds=1)
    assert failed.finish_reason == "error" and "ZeroDivisionError" in failed.outputs[-1].error
    assert served.finish_reason == "length" and len(served.tokens) == 10
    metrics = engine.metrics()
    assert metrics["generated_tokens"] == 10 and metrics["tokens_per_s"] > 0
    assert_no_leak(engine)
