"""`latentattn train`: AdamW with warmup + cosine decay on a next-token objective, single- or multi-process.

Batches are a pure function of (seed, step, micro-step, rank): random windows of `context + 1` tokens of
the training split. A checkpoint therefore only needs the weights, the optimizer state and the step to
continue exactly where it stopped. Under `torchrun` each process trains on its own windows and
DistributedDataParallel averages the gradients (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from latentattn import checkpoint as ckpt
from latentattn import run_dir
from latentattn.data import Corpus, gather_windows, load_corpus, window_starts
from latentattn.distill import TRAINABLE, Distillation, Trainable, freeze_all_but_attention, load_teacher
from latentattn.model import LanguageModel, Preset, get_preset
from latentattn.progress import StepProgress
from latentattn.registry import ATTENTION_KINDS, AttentionKind, canonical_dtype

LOG = "log.jsonl"
DTYPES = ("float32", "bfloat16")
"""Training dtypes (canonical names; `registry.DTYPES` lists their short spellings, fp32 and bf16)."""
_RENAMED_SETTINGS = {"rope_head_dim": "qk_rope_head_dim"}
"""Older names of `TrainConfig` fields, as runs saved them."""
RUN_MARKERS = (ckpt.LATEST, run_dir.LOCK)
"""Names that mark a directory as a training run (any other non-empty `--out` is refused)."""
_FREE_SETTINGS = frozenset({"out", "resume", "compile", "recompute_kv", "cache_dir", "keep"}) | frozenset(
    {"eval_every", "eval_batches", "checkpoint_every", "log_every"}
)
"""Settings a resumed run may change: they do not alter the training trajectory (`steps` may grow)."""
SHAPE_OVERRIDES = ("n_heads", "head_dim", "n_kv_heads", "kv_lora_rank", "qk_rope_head_dim", "d_ff")
"""`TrainConfig` fields that replace the preset's field of the same name (see `Preset`)."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `batch_size` is per process and micro-step; tokens per optimizer step are
    `batch_size · context · grad_accum · world_size`."""

    out: str
    """Run directory: checkpoints, the `latest` and `best` pointers, log.jsonl."""
    preset: str = "small"
    """Model preset."""
    attn: AttentionKind = "mla"
    """Attention kind."""
    data: tuple[str, ...] = ()
    """Text files or folders (default: the standard library's source, see `latentattn.data`)."""
    steps: int = 350
    """Optimizer steps; the cosine decay ends here. With --resume, a larger value extends the run."""
    batch_size: int = 16
    """Windows per process and micro-step."""
    context: int | None = None
    """Tokens per training window (default: the preset's max_seq_len; healing: 256, or the checkpoint's
    context if shorter)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine, as a fraction of lr."""
    warmup: int = 50
    """Steps of linear warmup to lr before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings (not norm weights)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    dtype: str = "float32"
    """float32, or bfloat16 autocast (fp32 master weights and optimizer state); fp32, bf16 also accepted."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 0
    """Initialisation and batch seed."""
    eval_every: int = 100
    """Steps between validations (and at the last step)."""
    eval_batches: int = 4
    """Validation batches of batch_size windows."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and at the last step)."""
    keep: int = ckpt.DEFAULT_KEEP
    """Checkpoints kept: the newest N, and `best` (lowest validation loss) besides."""
    log_every: int = 10
    """Steps between log.jsonl records."""
    cache_dir: str | None = None
    """Tokenizer and token-id cache (default: $XDG_CACHE_HOME/latentattn or ~/.cache/latentattn)."""
    resume: bool = False
    """Continue the run in out from its latest checkpoint (the CLI takes its saved settings unless given);
    without a checkpoint, start it."""
    n_heads: int | None = None
    """Shape override: query heads n_h (default: the preset's)."""
    head_dim: int | None = None
    """Shape override: width of each head; MLA's qk_nope_head_dim and v_head_dim (default: the preset's)."""
    n_kv_heads: int | None = None
    """Shape override: K/V heads n_g of gqa (default: the preset's)."""
    kv_lora_rank: int | None = None
    """Shape override: MLA latent width d_c (default: the preset's)."""
    qk_rope_head_dim: int | None = None
    """Shape override: MLA decoupled RoPE key width d_R (default: the preset's)."""
    d_ff: int | None = None
    """Shape override: MLP width, e.g. to match parameter counts across kinds (default: the preset's)."""
    init_from: str | None = None
    """A checkpoint whose model, weights and tokenizer start this run at step 0 with a fresh optimizer
    (fine-tuning, e.g. healing a converted model); excludes the shape overrides."""
    recompute_kv: bool = False
    """MLA: keep only the latent for backward and recompute per-head K/V (less memory, same losses)."""
    teacher: str | None = None
    """A checkpoint to distil from (with init_from): the training loss becomes τ²·KL(teacher ‖ model) at
    `temperature`, plus `lm_weight` × the next-token loss; validation stays the next-token loss."""
    temperature: float = 1.0
    """Distillation temperature τ of both models' softmax."""
    lm_weight: float = 0.0
    """Weight of the next-token loss added to the distillation loss."""
    trainable: Trainable = "all"
    """Parameters trained: all, or only the attention layers' (the rest frozen)."""

    def __post_init__(self) -> None:
        preset = get_preset(self.preset)
        for name in SHAPE_OVERRIDES:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {value!r}")
        if self.init_from is not None and any(getattr(self, name) is not None for name in SHAPE_OVERRIDES):
            raise ValueError("TrainConfig.init_from takes the checkpoint's shape; drop the shape overrides")
        if self.attn not in ATTENTION_KINDS:
            raise ValueError(
                f"TrainConfig.attn must be one of {', '.join(ATTENTION_KINDS)}, got {self.attn!r}"
            )
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, DTYPES, "TrainConfig.dtype"))
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("lr", "grad_clip", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("warmup", "weight_decay", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be non-negative, got {getattr(self, name)!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(
                f"TrainConfig.trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}"
            )
        if self.temperature <= 0 or self.lm_weight < 0:
            raise ValueError(
                "TrainConfig.temperature must be positive and lm_weight non-negative, got "
                f"{self.temperature!r} and {self.lm_weight!r}"
            )
        if self.teacher is None and (self.temperature != 1.0 or self.lm_weight != 0.0):
            raise ValueError("TrainConfig.temperature and lm_weight apply to distillation: name a teacher")
        if self.teacher is not None and self.init_from is None:
            raise ValueError("TrainConfig.teacher distils into a trained model: give init_from too")
        if self.init_from is not None:  # the checkpoint's own context bounds it (checked in train)
            if self.context is not None and self.context <= 0:
                raise ValueError(f"TrainConfig.context must be positive, got {self.context}")
        elif self.context is not None and not 0 < self.context <= preset.max_seq_len:
            raise ValueError(
                f"TrainConfig.context must lie in [1, {preset.max_seq_len}] for preset "
                f"{self.preset!r}, got {self.context}"
            )
        self.model_preset().attention(self.attn)  # invalid override combinations raise here

    @property
    def window(self) -> int:
        """Training context in tokens."""
        return self.context or get_preset(self.preset).max_seq_len

    def model_preset(self) -> Preset:
        """The preset with this run's shape overrides applied."""
        overrides = {name: getattr(self, name) for name in SHAPE_OVERRIDES if getattr(self, name) is not None}
        return replace(get_preset(self.preset), **overrides)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    """The newest checkpoint directory of the run."""
    step: int
    val_loss: float
    tokens_per_s: float
    """Training throughput of this invocation, all processes together (evaluation excluded)."""
    seconds: float


@dataclass(frozen=True)
class _Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_main(self, work: Callable[[], _T]) -> _T | None:
        """`work()` on rank 0 while the other ranks wait; its result on rank 0, None elsewhere.

        An OSError of `work` (a full disk, a read-only folder) becomes a one-line ValueError naming the
        file. Rank 0 broadcasts its outcome (gloo and NCCL both carry objects), so if `work` raises, rank 0
        re-raises and every other rank raises a ValueError with the same message: all exit with the
        same one-line error instead of dying in a collective.
        """
        if self.world_size == 1:
            return _with_io_errors_explained(work)
        result, error = None, None
        if self.is_main:
            try:
                result = _with_io_errors_explained(work)
            except Exception as caught:
                error = caught
        message = [None if error is None else str(error) or type(error).__name__]
        dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise ValueError(message[0])
        return result

    def mean(self, value: float) -> float:
        """Mean of `value` over the processes."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size


def _with_io_errors_explained(work: Callable[[], _T]) -> _T:
    """`work()`, turning an OSError from the system (not one raised on purpose) into a ValueError."""
    try:
        return work()
    except OSError as error:
        if error.errno is None:
            raise
        where = "" if error.filename is None else f": {str(error.filename)!r}"
        raise ValueError(f"{error.strerror}{where}") from error


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps to `lr`, then cosine decay to `lr · min_lr_ratio` at `steps`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def batch_at(
    tokens: np.ndarray, *, window: int, batch_size: int, seed: int, step: int, micro: int, rank: int
) -> tuple[Tensor, Tensor]:
    """Inputs and targets `[batch_size, window]`: random windows drawn from `(seed, step, micro, rank)`."""
    rng = np.random.default_rng([seed, step, micro, rank])
    starts = rng.integers(0, len(tokens) - window, size=batch_size)
    rows = torch.from_numpy(np.stack([tokens[s : s + window + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def next_token_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the logits `[B, T, vocab]` (computed in fp32) against `targets: [B, T]`."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(
    model: LanguageModel, tokens: np.ndarray, config: TrainConfig, env: _Distributed | None = None
) -> float:
    """Mean validation loss over `eval_batches · batch_size` evenly spaced windows, shared by the ranks
    (one process on the model's device without `env`)."""
    env = env or _Distributed(rank=0, world_size=1, device=model.embed.weight.device)
    n_windows = config.eval_batches * config.batch_size
    mine = window_starts(len(tokens), config.window, n_windows)[env.rank :: env.world_size]
    total = 0.0
    for i in range(0, len(mine), config.batch_size):
        rows = gather_windows(tokens, mine[i : i + config.batch_size], config.window).to(env.device)
        with _autocast(config, env):
            total += float(next_token_loss(model, rows[:, :-1], rows[:, 1:])) * len(rows)
    return env.mean(total / max(1, len(mine)))


def _autocast(config: TrainConfig, env: _Distributed) -> torch.autocast:
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")


def _optimizer(model: LanguageModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad; weight decay on matrices and embeddings only (not on
    norm weights)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _init_distributed() -> _Distributed:
    """Join the process group `torchrun` describes in the environment, or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size == 1:
        return _Distributed(rank=0, world_size=1, device=device)
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _Distributed(rank=dist.get_rank(), world_size=world_size, device=device)


def _absolute_paths(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with its data, cache, init_from and teacher paths made absolute, so the run can be
    continued or evaluated from any directory."""
    record = dict(record)
    if "data" in record:
        record["data"] = [os.path.abspath(path) for path in record["data"] or ()]
    for name in ("cache_dir", "init_from", "teacher"):
        if record.get(name) is not None:
            record[name] = os.path.abspath(record[name])
    return record


def _run_json(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """A checkpoint's "train" record: the config (absolute paths) and the number of processes."""
    return _absolute_paths({**asdict(config), "world_size": world_size})


def _train_record(checkpoint_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """`record`, the "train" record of a checkpoint, if `latentattn train` wrote it, in today's field
    names and canonical dtype name."""
    if "steps" not in record:
        raise ValueError(
            f'{checkpoint_dir / ckpt.CONFIG} has no "train" record of latentattn train, so its run '
            "cannot be continued; start a new run from it with --init-from"
        )
    record = {_RENAMED_SETTINGS.get(name, name): value for name, value in record.items()}
    if isinstance(record.get("dtype"), str):
        record["dtype"] = canonical_dtype(record["dtype"], DTYPES, f"{checkpoint_dir / ckpt.CONFIG}: dtype")
    return record


def resume_config(out: str, **changes: Any) -> TrainConfig:
    """The settings of the run in `out` (its latest checkpoint's) with `changes`, to continue it; a new
    run's `TrainConfig(out=out, resume=True, **changes)` when `out` holds no checkpoint."""
    existing = ckpt.latest_checkpoint(out)
    if existing is None:
        return TrainConfig(**{**changes, "out": out, "resume": True})
    record = _train_record(existing, ckpt.read_metadata(existing).get("train", {}))
    names = {field.name for field in fields(TrainConfig)}
    saved = {name: tuple(v) if isinstance(v, list) else v for name, v in record.items() if name in names}
    try:
        return TrainConfig(**{**saved, **changes, "out": out, "resume": True})
    except TypeError as error:
        raise ValueError(f'{existing / ckpt.CONFIG}: malformed "train" record ({error})') from None


def _check_resumable(start: ckpt.Checkpoint, config: TrainConfig, world_size: int) -> None:
    """Refuse a continuation that would change the trajectory: fewer steps than taken, a changed
    setting (other than `_FREE_SETTINGS`), or another number of processes (each process draws its own
    batches, so that changes the tokens per step and the batches themselves)."""
    if config.steps < start.step:
        raise ValueError(
            f"--steps {config.steps} is below step {start.step} of the run in {config.out!r}: a run can be "
            "extended, not shortened; choose another --out for a new run"
        )
    saved = _absolute_paths({"world_size": world_size, **_train_record(start.directory, start.train)})
    current = _run_json(config, world_size)
    changed = [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in current.items()
        if name in saved and name not in _FREE_SETTINGS | {"steps"} and saved[name] != value
    ]
    if changed:
        raise ValueError(
            f"the run in {config.out!r} was trained with other settings, which shape its trajectory: "
            f"{', '.join(changed)} (continue it with its own settings, or choose another --out)"
        )


def _load_corpus(config: TrainConfig, env: _Distributed, tokenizer: Any) -> Corpus:
    """Rank 0 trains the tokenizer and encodes (or finds them cached); then the others read the cache.
    Rank 0's errors (e.g. an empty corpus) reach every rank."""
    vocab_size = get_preset(config.preset).vocab_size

    def prepare() -> Corpus:
        return load_corpus(
            config.data, vocab_size=vocab_size, cache_dir=config.cache_dir, tokenizer=tokenizer
        )

    corpus = env.on_main(prepare)
    if corpus is None:  # the other ranks read what rank 0 cached
        corpus = prepare()
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if len(split) <= config.window:
            raise ValueError(
                f"the {name} split has {len(split)} tokens, not more than the context of {config.window}; "
                "add text or lower --context"
            )
    return corpus


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past `step`, written after the checkpoint a resumed run restarts from.

    That includes an unterminated last line (a process killed mid-write): a step's records are written
    before its checkpoint. Any other line that is not a record is an error naming the file and line.
    """
    if not path.exists():
        return
    lines = path.read_text().split("\n")
    lines.pop()  # "" after the final newline, or the partial record of a killed process
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"{path}, line {number} is not a log record ({type(error).__name__}: {error}); "
                "repair or delete that line to resume"
            ) from None
    ckpt.write_text_atomically(path, "".join(line + "\n" for line in kept))


def train(config: TrainConfig, *, quiet: bool = False) -> TrainResult:
    """Train (or, with `resume`, continue) the run in `config.out`, holding its lock throughout (rank 0);
    `quiet` hides progress and messages."""
    env = _init_distributed()
    console = Console(stderr=True, quiet=quiet or not env.is_main)
    try:
        lock = env.on_main(lambda: _open_run(Path(config.out)))
        try:
            if lock is not None and lock.stale_pid is not None:
                console.print(
                    f"note: took over the lock of process {lock.stale_pid}, which ended without releasing it",
                    soft_wrap=True,
                )
            result = _train(config, env, console)
        finally:
            if lock is not None:
                lock.release()
        if env.world_size > 1:
            dist.barrier()  # no rank tears gloo down while another still talks to it
        return result
    finally:
        if env.world_size > 1:
            dist.destroy_process_group()


def _open_run(out: Path) -> run_dir.RunLock:
    """Check `out` and lock it: a new or empty directory, or a training run no other process holds."""
    run_dir.check_out(out, markers=RUN_MARKERS, owner="training run")
    return run_dir.acquire(out, owner="training run")


def _resume_point(config: TrainConfig, env: _Distributed, console: Console) -> ckpt.Checkpoint | None:
    """The checkpoint this run continues from (None: a new run)."""
    existing = ckpt.latest_checkpoint(config.out)
    if existing is None:
        return None
    if not config.resume:
        raise ValueError(f"{config.out!r} already holds a checkpoint; pass --resume or choose another --out")
    start = ckpt.load_checkpoint(existing)
    _check_resumable(start, config, env.world_size)
    console.print(f"resuming {start.directory} at step {start.step}", soft_wrap=True)
    if config.steps > start.train["steps"]:
        console.print(
            f"extending the run from {start.train['steps']} to {config.steps} steps: from step "
            f"{start.step} on, the cosine decays to step {config.steps}",
            soft_wrap=True,
        )
    return start


def _warn_if_no_peak(config: TrainConfig, console: Console) -> None:
    """A one-line warning when the warmup is longer than the run, so lr is never reached."""
    if config.warmup > config.steps:
        console.print(
            f"warning: --warmup {config.warmup} is longer than --steps {config.steps}: the learning rate "
            f"peaks at {lr_at(config.steps - 1, config):.3g}, not --lr {config.lr:g}; "
            "lower --warmup to reach it",
            soft_wrap=True,
        )


def _diverged(run: Path, step: int, problem: str) -> ValueError:
    latest = ckpt.latest_checkpoint(run)
    kept = "no checkpoint was written" if latest is None else f"the last good checkpoint, {latest}, is kept"
    return ValueError(
        f"training diverged at step {step}: {problem}; stopped without saving ({kept}). "
        "Lower --lr or lengthen --warmup"
    )


def _train(config: TrainConfig, env: _Distributed, console: Console) -> TrainResult:
    run = Path(config.out)
    start = _resume_point(config, env, console)
    init = ckpt.load_checkpoint(config.init_from) if config.init_from and start is None else None
    if init is not None and config.window > init.config.max_seq_len:
        raise ValueError(
            f"--context {config.window} exceeds the context of {config.init_from} "
            f"({init.config.max_seq_len} tokens); its architecture comes from the checkpoint"
        )
    origin = start or init
    loss_fn = next_token_loss
    if config.teacher is not None:
        teacher = load_teacher(config.teacher, origin, env.device)  # origin: init_from's checkpoint
        loss_fn = Distillation(teacher, config.temperature, config.lm_weight)
    corpus = _load_corpus(config, env, None if origin is None else origin.tokenizer)
    model, optimizer, step = _build(config, env, corpus, start, init)
    counts = model.parameter_counts()
    console.print(
        f"{model.config.attention.kind} model"
        + (f", preset {config.preset!r}" if origin is None else f" from {origin.directory}")
        + ": "
        + ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in counts.items())
        + (f" (training {config.trainable})" if config.trainable != "all" else "")
        + (f"; distilling from {config.teacher}" if config.teacher else "")
        + f"; corpus {len(corpus.train):,} train / {len(corpus.val):,} val tokens",
        soft_wrap=True,
    )
    carried = _carried_metadata(origin)
    _warn_if_no_peak(config, console)

    net: nn.Module = torch.compile(model) if config.compile else model
    if env.world_size > 1:
        net = DistributedDataParallel(net)
    log_path = run / LOG
    env.on_main(lambda: _truncate_log(log_path, step))

    def log(record: dict[str, Any]) -> None:
        env.on_main(lambda: _append_log(log_path, record))

    tokens_per_step = config.batch_size * config.window * config.grad_accum * env.world_size
    train_seconds, first_step, val_loss = 0.0, step, float("nan")
    with StepProgress(console, "train", config.steps, completed=step) as progress:
        while step < config.steps:
            tick = time.perf_counter()
            loss = _train_step(net, optimizer, corpus.train, config, env, step, loss_fn=loss_fn)
            step += 1
            train_seconds += time.perf_counter() - tick
            tps = (step - first_step) * tokens_per_step / train_seconds
            if step % config.log_every == 0 or step == config.steps:
                lr = lr_at(step - 1, config)
                log(
                    {
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "tokens": step * tokens_per_step,
                        "tokens_per_s": tps,
                    }
                )
            progress.update(step, f"loss {loss:.3f}  {tps:,.0f} tok/s")
            evaluated = step % config.eval_every == 0 or step == config.steps
            if evaluated:
                val_loss = evaluate(model, corpus.val, config, env)
                if not math.isfinite(val_loss):
                    raise _diverged(run, step, f"the validation loss is {val_loss}")
                log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
                progress.print(f"step {step}: val loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                _save(
                    run, step, model, optimizer, corpus, config, env, val_loss if evaluated else None, carried
                )
    if math.isnan(val_loss):  # resumed a finished run
        val_loss = evaluate(model, corpus.val, config, env)
    tps = (step - first_step) * tokens_per_step / train_seconds if train_seconds else 0.0
    latest = ckpt.latest_checkpoint(run)
    return TrainResult(
        checkpoint=latest, step=step, val_loss=val_loss, tokens_per_s=tps, seconds=train_seconds
    )


def _carried_metadata(origin: ckpt.Checkpoint | None) -> dict[str, Any]:
    """What the checkpoint a run starts from records besides its model and training record (an imported
    model's special tokens and source, a converted model's conversion), for every checkpoint it writes."""
    if origin is None:
        return {}
    metadata = ckpt.read_metadata(origin.directory)
    return {key: value for key, value in metadata.items() if key not in ("model", "train", "step")}


def _build(
    config: TrainConfig,
    env: _Distributed,
    corpus: Corpus,
    start: ckpt.Checkpoint | None,
    init: ckpt.Checkpoint | None,
) -> tuple[LanguageModel, torch.optim.AdamW, int]:
    """A fresh model (seeded, or `init`'s weights) and optimizer at step 0, or the resumed checkpoint's
    weights, optimizer and step."""
    torch.manual_seed(config.seed)
    if start is not None or init is not None:
        model_config = (start or init).config
    else:
        vocab_size = corpus.tokenizer.get_vocab_size()
        model_config = config.model_preset().model(
            config.attn, vocab_size=vocab_size, max_seq_len=config.window
        )
    model = LanguageModel(model_config, recompute_kv=config.recompute_kv, device=env.device)
    if config.trainable == "attention":
        freeze_all_but_attention(model)
    optimizer = _optimizer(model, config)
    if start is None:
        if init is not None:
            model.load_state_dict(init.model.state_dict())
        return model, optimizer, 0
    model.load_state_dict(start.model.state_dict())
    state = ckpt.load_trainer_state(start.directory)
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, state["step"]


def _train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: np.ndarray,
    config: TrainConfig,
    env: _Distributed,
    step: int,
    *,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] = next_token_loss,
) -> float:
    """One optimizer step over `grad_accum` micro-batches of `loss_fn(net, inputs, targets)`; returns the
    mean loss over the processes. A non-finite loss or gradient norm stops the run before the optimizer
    step."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    total = 0.0
    for micro in range(config.grad_accum):
        inputs, targets = batch_at(
            tokens,
            window=config.window,
            batch_size=config.batch_size,
            seed=config.seed,
            step=step,
            micro=micro,
            rank=env.rank,
        )
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last or env.world_size == 1 else net.no_sync():
            with _autocast(config, env):
                loss = loss_fn(net, inputs.to(env.device), targets.to(env.device))
            (loss / config.grad_accum).backward()
        total += float(loss.detach())
    mean_loss = env.mean(total / config.grad_accum)
    norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip))
    for name, value in (("loss", mean_loss), ("gradient norm", norm)):
        if not math.isfinite(value):
            raise _diverged(Path(config.out), step + 1, f"the {name} is {value}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss


def _save(
    run: Path,
    step: int,
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    corpus: Corpus,
    config: TrainConfig,
    env: _Distributed,
    val_loss: float | None,
    metadata: dict[str, Any],
) -> None:
    """Rank 0 writes the checkpoint (never one with non-finite weights) with `metadata` besides the
    training record; every rank waits for it (and fails with it)."""
    broken = [name for name, weight in model.named_parameters() if not torch.isfinite(weight).all()]
    if broken:
        raise _diverged(run, step, f"weight {broken[0]} is not finite")
    env.on_main(
        lambda: ckpt.save_checkpoint(
            run,
            step=step,
            model=model,
            tokenizer=corpus.tokenizer,
            train=_run_json(config, env.world_size),
            trainer_state={"optimizer": optimizer.state_dict(), "step": step},
            val_loss=val_loss,
            keep=config.keep,
            metadata=metadata,
        )
    )
