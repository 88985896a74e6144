"""Checkpoints: safetensors weights, config JSON, tokenizer and trainer state, written atomically.

A run directory holds complete checkpoints and a pointer to the newest:

    RUN_DIR/latest                   name of the newest complete checkpoint, e.g. "step-0000400"
    RUN_DIR/step-0000400/config.json        {"model": ModelConfig, "train": {...}, "step": 400}
                         model.safetensors  weights (a tied LM head is not stored, as in HF)
                         tokenizer.json     the byte-level BPE tokenizer
                         trainer_state.pt   optimizer state and data position (for --resume)

Each checkpoint is written into `RUN_DIR/tmp-…`, renamed into place, and only then is `latest`
replaced (temp file + rename), so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from latentattn.config import GQAConfig, Llama3RopeConfig, MLAConfig, RopeConfig, YarnConfig
from latentattn.model import LanguageModel, ModelConfig
from latentattn.tokens import SpecialTokens, separator_tokens

LATEST = "latest"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer_state.pt"
_ATTENTION_TYPES = {"mla": MLAConfig, "gqa": GQAConfig}


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-able form of `config`; the attention config carries `"type": "mla" | "gqa"`."""
    data = asdict(config)
    data["attention"]["type"] = "mla" if isinstance(config.attention, MLAConfig) else "gqa"
    return data


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `model_config_to_dict`; malformed input raises ValueError."""
    try:
        attention = dict(data["attention"])
        attention_type = _ATTENTION_TYPES[attention.pop("type")]
        rope = dict(attention.pop("rope"))
        yarn, llama3 = rope.pop("yarn"), rope.pop("llama3", None)
        rope_config = RopeConfig(
            **rope,
            yarn=None if yarn is None else YarnConfig(**yarn),
            llama3=None if llama3 is None else Llama3RopeConfig(**llama3),
        )
        return ModelConfig(**{**data, "attention": attention_type(**attention, rope=rope_config)})
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed model config ({type(error).__name__}: {error})") from None


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory `path` names: a run directory's `latest`, or a checkpoint itself."""
    path = Path(path)
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    if (path / CONFIG).is_file():
        return path
    return None


def _require_checkpoint(path: str | Path) -> Path:
    directory = find_checkpoint(path)
    if directory is None:
        raise FileNotFoundError(f"no checkpoint in {str(path)!r} (expected {LATEST} or {CONFIG} there)")
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} is incomplete: {name} is missing")
    return directory


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its config, tokenizer and training metadata."""

    directory: Path
    model: LanguageModel
    config: ModelConfig
    tokenizer: Tokenizer
    train: dict[str, Any]
    step: int
    tokens: SpecialTokens
    """BOS, EOS and chat template: an imported model's, or a trained model's document separator."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """`config.json` of the checkpoint `path` names: an object whose optional "train" is an object and
    "step" an integer."""
    file = _require_checkpoint(path) / CONFIG
    try:
        metadata = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt checkpoint: {file} is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise ValueError(
            f"corrupt checkpoint: {file} must hold a JSON object, got {json.dumps(metadata)[:40]}"
        )
    for key, kind, name in (("train", dict, "an object"), ("step", int, "an integer")):
        if key in metadata and not isinstance(metadata[key], kind):
            raise ValueError(
                f"corrupt checkpoint: {file}: {key!r} must be {name}, got {json.dumps(metadata[key])[:40]}"
            )
    return metadata


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Model, tokenizer and metadata from a run directory or a checkpoint directory."""
    directory = _require_checkpoint(path)
    metadata = read_metadata(directory)
    config = model_config_from_dict(metadata.get("model", {}))
    try:
        tokenizer = Tokenizer.from_file(str(directory / TOKENIZER))
    except Exception as error:  # tokenizers raises plain Exception on malformed JSON
        raise ValueError(f"corrupt checkpoint: cannot read {directory / TOKENIZER} ({error})") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"checkpoint mismatch: tokenizer has {tokenizer.get_vocab_size()} tokens, "
            f"the model's vocab_size is {config.vocab_size}"
        )
    tokens = (
        SpecialTokens.from_dict(metadata["tokens"], config.vocab_size)
        if "tokens" in metadata
        else separator_tokens(tokenizer)
    )
    model = LanguageModel(config, device=device, dtype=dtype)
    load_weights(model, directory / WEIGHTS)
    return Checkpoint(
        directory=directory,
        model=model.eval(),
        config=config,
        tokenizer=tokenizer,
        train=metadata.get("train", {}),
        step=metadata.get("step", 0),
        tokens=tokens,
    )


def load_weights(model: LanguageModel, path: Path) -> None:
    """Copy the safetensors file at `path` into `model`, checking names and shapes first."""
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"corrupt checkpoint: cannot read {path} ({error})") from None
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [
        f"{name} {tuple(weights[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in weights and weights[name].shape != tensor.shape
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{label}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if names
        ]
        raise ValueError(f"checkpoint weights do not match its config ({path}): {'; '.join(problems)}")
    model.load_state_dict(weights)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """The optimizer state and data position saved next to the weights."""
    try:
        return torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint {str(directory)!r} has no {TRAINER_STATE}; cannot resume"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"corrupt checkpoint: cannot read {directory / TRAINER_STATE} ({error})") from None


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: LanguageModel,
    tokenizer: Tokenizer,
    train: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write `RUN_DIR/step-NNNNNNN` atomically, point `latest` at it, delete older checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = run_dir / f"tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    metadata = {"train": train, "step": step}
    write_checkpoint_files(tmp, model=model, tokenizer=tokenizer, metadata=metadata)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    target = run_dir / name
    if target.exists():  # a complete earlier copy of this very step
        shutil.rmtree(target)
    os.replace(tmp, target)
    write_text_atomically(run_dir / LATEST, name + "\n")
    for stale in run_dir.iterdir():
        if stale.is_dir() and stale != target and stale.name.startswith(("step-", "tmp-")):
            shutil.rmtree(stale, ignore_errors=True)
    return target


def write_checkpoint_files(
    directory: Path, *, model: LanguageModel, tokenizer: Tokenizer, metadata: dict[str, Any]
) -> None:
    """Write the model's config (with `metadata`), weights and tokenizer into `directory`."""
    config = {"model": model_config_to_dict(model.config), **metadata}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, directory / WEIGHTS)
    tokenizer.save(str(directory / TOKENIZER))


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` through a temporary sibling and a rename."""
    tmp = path.with_name(f"tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
