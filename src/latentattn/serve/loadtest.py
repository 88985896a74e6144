"""`latentattn loadtest URL`: drive an OpenAI-compatible /v1/completions endpoint and report its latency.

Requests stream (`stream_options.include_usage`), so each gives its time to first token (TTFT), the
gaps between streamed chunks (inter-token latency, ITL), its end-to-end latency and its output tokens
(from `usage`). They are sent either by `concurrency` clients one after another, or at a Poisson
`rate` (exponential gaps, whatever the server's speed), until `requests` have been sent or `duration`
seconds have passed. Prompts are random token ids (the API accepts token lists) of lengths drawn
uniformly from `prompt_tokens`; `max_tokens` from `output_tokens`. The report matches vLLM's serving
benchmark: requests/s, output tokens/s, TTFT, ITL and end-to-end p50/p90/p99, errors by status.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from rich.table import Table

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LoadConfig:
    """The workload: `(low, high)` token ranges (inclusive), and either `concurrency` or `rate`."""

    url: str
    requests: int = 100
    duration: float | None = None
    concurrency: int | None = 8
    rate: float | None = None
    prompt_tokens: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (16, 64)
    vocab: int = 256
    """Prompt token ids are drawn from [0, vocab)."""
    temperature: float = 0.0
    timeout: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give either --concurrency or --rate (requests per second), not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be positive, got {self.rate}")
        if self.requests < 1:
            raise ValueError(f"--requests must be at least 1, got {self.requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"--duration must be positive, got {self.duration}")
        for name in ("prompt_tokens", "output_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be LOW:HIGH with 1 <= LOW <= HIGH, got {low}:{high}"
                )
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"URL must start with http:// or https://, got {self.url!r}")


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """`"32"` → (32, 32); `"16:64"` → (16, 64)."""
    try:
        low, _, high = text.partition(":")
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"{flag} must be N or LOW:HIGH (token counts), got {text!r}") from None


@dataclass
class Result:
    """One request: HTTP status (None: no response), seconds, output tokens, chunk arrival times."""

    status: int | None
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)


async def _one(client: httpx.AsyncClient, config: LoadConfig, rng: random.Random) -> Result:
    prompt = [rng.randrange(config.vocab) for _ in range(rng.randint(*config.prompt_tokens))]
    body = {
        "prompt": prompt,
        "max_tokens": rng.randint(*config.output_tokens),
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    result = Result(status=None)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                result.error = response.text[:200]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_load(config: LoadConfig) -> tuple[list[Result], float]:
    """Send the workload; returns each request's result and the wall-clock seconds taken."""
    rng = random.Random(config.seed)
    deadline = None if config.duration is None else time.monotonic() + config.duration
    results: list[Result] = []
    limits = httpx.Limits(max_connections=None if config.rate else config.concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=config.url, timeout=config.timeout, limits=limits) as client:
        sent = 0

        def more() -> bool:
            return sent < config.requests and (deadline is None or time.monotonic() < deadline)

        async def send() -> None:
            nonlocal sent
            sent += 1
            results.append(await _one(client, config, rng))

        if config.rate is not None:
            tasks = []
            while more():
                tasks.append(asyncio.create_task(send()))
                await asyncio.sleep(rng.expovariate(config.rate))
            await asyncio.gather(*tasks)
        else:

            async def worker() -> None:
                while more():
                    await send()

            await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    return results, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def summarize(config: LoadConfig, results: list[Result], seconds: float) -> dict:
    """The report: throughput, latency percentiles (seconds), errors by status."""
    ok = [r for r in results if r.status == 200 and r.error is None]
    errors = Counter(str(r.status) if r.status is not None else "no response" for r in results if r not in ok)
    output = sum(r.output_tokens for r in ok)
    return {
        "url": config.url,
        "mode": f"rate {config.rate}/s" if config.rate else f"concurrency {config.concurrency}",
        "requests": len(results),
        "completed": len(ok),
        "errors": dict(errors),
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds if seconds else 0.0,
        "output_tokens": output,
        "output_tokens_per_s": output / seconds if seconds else 0.0,
        "ttft_s": _percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _percentiles([gap for r in ok for gap in r.gaps]),
        "e2e_s": _percentiles([r.latency for r in ok if r.latency is not None]),
        "config": asdict(config),
    }


def report_table(report: dict) -> Table:
    table = Table(title=f"loadtest {report['url']} ({report['mode']})")
    table.add_column("metric")
    for p in PERCENTILES:
        table.add_column(f"p{p}", justify="right")
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "inter-token latency"), ("e2e_s", "end-to-end")):
        table.add_row(f"{name} (ms)", *(_ms(report[key][f"p{p}"]) for p in PERCENTILES))
    errors = ", ".join(f"{status}: {n}" for status, n in report["errors"].items()) or "none"
    table.caption = (
        f"{report['completed']}/{report['requests']} requests in {report['seconds']:.1f} s: "
        f"{report['requests_per_s']:.2f} requests/s, {report['output_tokens_per_s']:.1f} output tokens/s; "
        f"errors: {errors}"
    )
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def run_loadtest(config: LoadConfig) -> dict:
    results, seconds = asyncio.run(run_load(config))
    return summarize(config, results, seconds)
