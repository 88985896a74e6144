"""Knowledge distillation: a student learns its teacher's next-token distributions (Hinton et al. 2015),
the loss `latentattn heal` trains a converted model with, its converted-from model as the teacher.

Notation: B batch, T tokens, V vocabulary, τ temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentattn import checkpoint as ckpt
from latentattn.model import LanguageModel

Trainable = Literal["all", "attention"]
TRAINABLE: tuple[Trainable, ...] = ("all", "attention")


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)) of logits `[B, T, V]`, mean over the B·T positions,
    in fp32 (τ² keeps the gradients' scale as τ changes)."""
    student_log = F.log_softmax(student.float().flatten(0, 1) / temperature, dim=-1)  # [B·T, V]
    teacher_log = F.log_softmax(teacher.float().flatten(0, 1) / temperature, dim=-1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean") * temperature**2


@dataclass(frozen=True)
class Distillation:
    """The training loss `loss(model, inputs, targets)` of a distilled run: `distillation_loss` against
    the frozen `teacher`, plus `lm_weight` × the next-token cross-entropy."""

    teacher: LanguageModel
    temperature: float
    lm_weight: float

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = model(inputs)  # [B, T, V]
        with torch.no_grad():
            expected = self.teacher(inputs)
        loss = distillation_loss(logits, expected, self.temperature)
        if self.lm_weight:
            lm = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss = loss + self.lm_weight * lm
        return loss


def freeze_all_but_attention(model: LanguageModel) -> None:
    """Only the blocks' attention layers keep `requires_grad` (embeddings, norms, MLPs, head frozen)."""
    model.requires_grad_(False)
    for block in model.blocks:
        block.attn.requires_grad_(True)


def recorded_teacher(checkpoint: str | Path) -> str:
    """The source a converted checkpoint records (`latentattn convert` writes it into "conversion")."""
    directory = ckpt.find_checkpoint(checkpoint) or Path(checkpoint)
    source = ckpt.read_metadata(directory).get("conversion", {}).get("source")
    if not isinstance(source, str):
        raise ValueError(
            f"{str(directory)!r} records no source model (it was not written by latentattn convert): "
            "name the teacher with --teacher"
        )
    return source


def load_teacher(path: str | Path, student: ckpt.Checkpoint, device: torch.device) -> LanguageModel:
    """The teacher checkpoint's model, frozen in eval mode on `device`; a ValueError unless it predicts
    the student's tokens (same vocabulary size and tokenizer)."""
    teacher = ckpt.load_checkpoint(path, device=device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"the teacher {str(path)!r} has a vocabulary of {teacher.config.vocab_size} tokens, the model "
            f"{str(student.directory)!r} one of {student.config.vocab_size}: distillation needs the same"
        )
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ValueError(
            f"the teacher {str(path)!r} and the model {str(student.directory)!r} have different "
            "tokenizers: distillation needs the same"
        )
    return teacher.model.requires_grad_(False).eval()
