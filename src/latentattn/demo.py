"""`latentattn demo`: train the `small` MLA model on the default corpus, sample from it, compare caches."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from latentattn.generate import SamplingConfig, run_generate
from latentattn.train import resume_config, train

DEMO_PROMPT = "def "


def run_demo(
    out: str = "runs/demo",
    *,
    steps: int | None = None,
    max_new_tokens: int = 160,
    seed: int = 0,
    stream: TextIO | None = None,
) -> None:
    """Train the `small` MLA model in `out` (continuing the run there, if any: to `steps` when given,
    else to its own), then generate from `DEMO_PROMPT`. `steps` below the run's step is refused."""
    stream = stream or sys.stdout
    start = time.perf_counter()
    given = {} if steps is None else {"steps": steps}
    result = train(resume_config(out, preset="small", attn="mla", seed=seed, **given))
    stream.write(
        f"trained {result.step} steps: val loss {result.val_loss:.3f} (perplexity "
        f"{math.exp(result.val_loss):.1f}), {result.tokens_per_s:,.0f} tokens/s; "
        f"checkpoint {result.checkpoint}\n\n"
    )
    sampling = SamplingConfig(temperature=0.8, top_k=40)
    run_generate(
        out, prompts=[DEMO_PROMPT], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, out=stream
    )
    stream.write(f"demo finished in {time.perf_counter() - start:.0f} s\n")
