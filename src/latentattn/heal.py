"""`latentattn heal`: fine-tune a converted checkpoint by distillation from the model it was converted from.

A healing run is a training run (`latentattn.train`) that starts from the converted checkpoint
(`init_from`) and trains on `latentattn.distill`'s loss against the teacher: the same run directory
and lock, progress, checkpoints, exact `--resume`, divergence stop and torchrun support. The teacher
is the source `latentattn convert` recorded unless one is named. The defaults are CPU-sized (minutes
for a 135M-parameter model); every checkpoint keeps the converted one's special tokens and
conversion record, so a healed model can be healed again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentattn import checkpoint as ckpt
from latentattn.distill import recorded_teacher
from latentattn.train import TrainConfig, resume_config

HEAL_DEFAULTS: dict[str, Any] = {
    "steps": 100,
    "batch_size": 4,
    "lr": 1e-4,
    "warmup": 10,
    "eval_every": 50,
    "eval_batches": 2,
    "checkpoint_every": 25,
    "log_every": 5,
}
"""`TrainConfig` settings of a healing run where they differ from training's."""
HEAL_CONTEXT = 256
"""Tokens per healing window (or the checkpoint's context, if shorter)."""


def heal_config(
    checkpoint: str | Path, *, out: str | Path, resume: bool = False, **options: Any
) -> TrainConfig:
    """The run that heals `checkpoint` in `out`: `options` (`TrainConfig` fields) over `HEAL_DEFAULTS`,
    the teacher the conversion recorded unless `options` names one. With `resume` and a checkpoint in
    `out`, that run's saved settings with `options` instead (`train.resume_config`)."""
    if resume and ckpt.latest_checkpoint(out) is not None:
        return resume_config(str(out), init_from=str(checkpoint), **options)
    teacher = options.pop("teacher", None) or recorded_teacher(checkpoint)
    if options.get("context") is None:
        metadata = ckpt.read_metadata(checkpoint)
        options["context"] = min(HEAL_CONTEXT, metadata.get("model", {}).get("max_seq_len", HEAL_CONTEXT))
    return TrainConfig(
        **{**HEAL_DEFAULTS, **options},
        out=str(out),
        init_from=str(checkpoint),
        teacher=teacher,
        resume=resume,
    )
