"""`latentattn serve`: load a checkpoint, size the paged cache, run the engine and the API under uvicorn.

SIGTERM (or Ctrl-C) stops admitting (new requests get 503), lets running requests finish for up to
`grace_seconds`, cancels the rest, then stops the server; the process exits 0. A second signal exits
at once.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch
import uvicorn

from latentattn.caches import PagedModelCache
from latentattn.checkpoint import load_checkpoint
from latentattn.registry import canonical_dtype, torch_dtype
from latentattn.serve.api import ServedModel, create_app
from latentattn.serve.engine import Engine, EngineConfig

SERVE_DTYPES = ("float32", "bfloat16", "float64")


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen, how large the cache is (`budget_bytes` or `num_blocks`), and the scheduler."""

    host: str = "127.0.0.1"
    port: int = 8000
    budget_bytes: int | None = None
    num_blocks: int | None = None
    block_size: int = 64
    latent_format: str | None = None
    dtype: str = "float32"
    engine: EngineConfig = field(default_factory=EngineConfig)
    grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, SERVE_DTYPES, "--dtype"))
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must lie in [0, 65535], got {self.port}")


def budget_summary(cache: PagedModelCache, max_context: int) -> str:
    """The cache as blocks, tokens, bytes and sequences of the model's whole context."""
    tokens = cache.num_blocks * cache.block_size
    full = cache.num_blocks // math.ceil(max_context / cache.block_size)
    return (
        f"KV cache: {cache.num_blocks:,} blocks of {cache.block_size} tokens = {tokens:,} tokens "
        f"({cache.nbytes / 2**20:,.1f} MiB, {cache.bytes_per_token:,} B/token): "
        f"{full:,} sequences of the model's max context ({max_context:,} tokens)"
    )


class _Server(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains the engine before stopping (exit 0)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_seconds: float) -> None:
        super().__init__(config)
        self.engine, self.grace_seconds = engine, grace_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        print("latentattn serve: stopping: no new requests; finishing running ones", file=sys.stderr)

        def drain() -> None:
            self.engine.shutdown(self.grace_seconds)
            self.should_exit = True

        threading.Thread(target=drain, name="latentattn-drain", daemon=True).start()


def run_server(checkpoint: str | Path, config: ServeConfig, *, device: torch.device | str = "cpu") -> None:
    """Serve `checkpoint` until SIGTERM or Ctrl-C."""
    loaded = load_checkpoint(checkpoint, device=device, dtype=torch_dtype(config.dtype))
    cache = loaded.model.new_paged_cache(
        budget_bytes=config.budget_bytes,
        num_blocks=config.num_blocks,
        block_size=config.block_size,
        latent_format=config.latent_format,
    )
    engine = Engine(
        loaded.model, cache, config.engine, tokenizer=loaded.tokenizer, eos_ids=loaded.tokens.eos_ids
    )
    print(budget_summary(cache, loaded.config.max_seq_len), flush=True)
    served = ServedModel(
        name=Path(checkpoint).resolve().name, tokenizer=loaded.tokenizer, tokens=loaded.tokens
    )
    app = create_app(engine, served)
    server = _Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=2
        ),
        engine,
        config.grace_seconds,
    )
    engine.warm_up()
    engine.start()
    print(f"serving {served.name} on http://{config.host}:{config.port}", flush=True)
    try:
        server.run()
    finally:
        engine.shutdown(0)
