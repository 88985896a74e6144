"""Checkpoints: safetensors weights, config JSON, tokenizer and trainer state, written atomically.

A run directory holds complete checkpoints, pointers to two of them and the list of those it wrote:

    RUN_DIR/latest                   name of the newest complete checkpoint, e.g. "step-0000400"
    RUN_DIR/best                     name of the kept checkpoint with the lowest validation loss
    RUN_DIR/checkpoints.json         [{"name", "step", "val_loss"}] of the checkpoints this run wrote
    RUN_DIR/step-0000400/config.json        {"model": ModelConfig, "train": {...}, "step": 400}
                         model.safetensors  weights (a tied LM head is not stored, as in HF)
                         tokenizer.json     the byte-level BPE tokenizer
                         trainer_state.pt   optimizer state and data position (for --resume)

Each checkpoint is written into `RUN_DIR/tmp-step-…-PID`, listed in `checkpoints.json`, renamed into
place, and only then are `latest` and `best` replaced (temp file + rename), so a crash at any moment
leaves the previous checkpoint usable. Old checkpoints are deleted only if `checkpoints.json` lists them
under an exact `step-NNNNNNN` name: the newest `keep` and `best` stay; nothing else in the directory is
ever touched.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from latentattn.config import Llama3RopeConfig, RopeConfig, YarnConfig
from latentattn.model import LanguageModel, ModelConfig
from latentattn.registry import ATTENTION_KINDS, resolve
from latentattn.run_dir import publish_directory, temp_path
from latentattn.tokens import SpecialTokens, separator_tokens

LATEST = "latest"
BEST = "best"
MANIFEST = "checkpoints.json"
STEP_NAME = re.compile(r"step-\d{7}")
"""The exact name of a checkpoint directory; pointers and cleanup accept no other."""
DEFAULT_KEEP = 2
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer_state.pt"


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-able form of `config`; the attention config carries `"type"`, its kind (a key of
    `registry.ATTENTION_KINDS`, which names the config class; older checkpoints say "gqa" for every
    K/V kind, which reads the same)."""
    data = asdict(config)
    data["attention"]["type"] = config.attention.kind
    return data


_ABSENT = object()


def _object(value: Any, field: str, source: str) -> dict[str, Any]:
    """A copy of `value`, which must be a JSON object; else a ValueError naming `source` and `field`."""
    if not isinstance(value, dict):
        got = "nothing" if value is _ABSENT else json.dumps(value)[:40]
        raise ValueError(f"{source}: {field!r} must be an object, got {got}")
    return dict(value)


def _build(cls: type, arguments: dict[str, Any], field: str, source: str) -> Any:
    """`cls(**arguments)`; unknown, missing or mistyped fields raise a ValueError naming `field`."""
    try:
        return cls(**arguments)
    except TypeError as error:
        raise ValueError(f"{source}: {field!r} is malformed ({error})") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def model_config_from_dict(data: Any, source: str = "model config") -> ModelConfig:
    """Inverse of `model_config_to_dict`; malformed input raises a ValueError naming `source` (e.g. the
    config.json file) and the field."""
    model = _object(data, "model", source)
    attention = _object(model.pop("attention", _ABSENT), "model.attention", source)
    kind = attention.pop("type", None)
    if kind not in ATTENTION_KINDS:
        raise ValueError(
            f"{source}: 'model.attention.type' must be one of {', '.join(ATTENTION_KINDS)}, "
            f"got {json.dumps(kind)[:40]}"
        )
    rope = _object(attention.pop("rope", _ABSENT), "model.attention.rope", source)
    for name, scaling in (("yarn", YarnConfig), ("llama3", Llama3RopeConfig)):
        field = f"model.attention.rope.{name}"
        value = rope.pop(name, None)
        rope[name] = None if value is None else _build(scaling, _object(value, field, source), field, source)
    rope_config = _build(RopeConfig, rope, "model.attention.rope", source)
    attention_config = _build(
        resolve(ATTENTION_KINDS[kind].config), {**attention, "rope": rope_config}, "model.attention", source
    )
    return _build(ModelConfig, {**model, "attention": attention_config}, "model", source)


def _follow(pointer: Path) -> Path:
    """The checkpoint directory a pointer file (`latest`, `best`) names."""
    name = pointer.read_text().strip()
    if not STEP_NAME.fullmatch(name):
        raise ValueError(
            f"corrupt run: {pointer} must name a checkpoint like step-0000400, got {name[:40]!r}"
        )
    return pointer.parent / name


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory `path` names: a run directory's `latest`, a pointer file (`RUN/latest`,
    `RUN/best`), or a checkpoint itself."""
    path = Path(path)
    if path.name in (LATEST, BEST) and path.is_file():
        return _follow(path)
    if (path / LATEST).is_file():
        return _follow(path / LATEST)
    return path if (path / CONFIG).is_file() else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run directory's `latest` names; None if it has none."""
    latest = Path(run_dir) / LATEST
    return _follow(latest) if latest.is_file() else None


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
    source = f"corrupt checkpoint: {directory / CONFIG}"
    config = model_config_from_dict(metadata.get("model", _ABSENT), source=source)
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


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint a run wrote, as `checkpoints.json` records it."""

    name: str
    step: int
    val_loss: float | None
    """Validation loss at this step, if the run evaluated there."""


def read_manifest(run_dir: Path) -> list[SavedCheckpoint]:
    """The checkpoints the run in `run_dir` wrote, oldest first; for a run from before `checkpoints.json`
    existed, the one `latest` names."""
    path = run_dir / MANIFEST
    if not path.exists():
        latest = run_dir / LATEST
        if not latest.is_file():
            return []
        name = _follow(latest).name
        return [SavedCheckpoint(name=name, step=int(name.removeprefix("step-")), val_loss=None)]
    try:
        records = [SavedCheckpoint(**entry) for entry in json.loads(path.read_text())]
        if not all(STEP_NAME.fullmatch(record.name) for record in records):
            raise ValueError("a name is not step-NNNNNNN")
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"corrupt run: {path} is not a list of checkpoints ({error}); repair or delete it "
            "(without it, old checkpoints are kept)"
        ) from None
    return records


def _write_manifest(run_dir: Path, records: list[SavedCheckpoint]) -> None:
    text = json.dumps([asdict(record) for record in records], indent=1)
    write_text_atomically(run_dir / MANIFEST, text + "\n")


def _best(records: list[SavedCheckpoint]) -> SavedCheckpoint | None:
    """The record with the lowest finite validation loss (the newest among equals)."""
    scored = [r for r in records if r.val_loss is not None and math.isfinite(r.val_loss)]
    return min(scored, key=lambda r: (r.val_loss, -r.step), default=None)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: LanguageModel,
    tokenizer: Tokenizer,
    train: dict[str, Any],
    trainer_state: dict[str, Any],
    val_loss: float | None = None,
    keep: int = DEFAULT_KEEP,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `RUN_DIR/step-NNNNNNN` atomically and point `latest` at it (and `best`, if its `val_loss` is
    the lowest); then delete the run's own older checkpoints beyond the newest `keep` and `best`.
    `metadata` adds entries to its config.json besides "train" and "step"."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    target = run_dir / name
    records = read_manifest(run_dir)
    if target.exists() and name not in {record.name for record in records}:
        raise ValueError(f"{target} exists but was not written by this run; move it away")
    records = sorted(
        [record for record in records if record.name != name] + [SavedCheckpoint(name, step, val_loss)],
        key=lambda record: record.step,
    )

    def write(tmp: Path) -> None:
        entries = {**(metadata or {}), "train": train, "step": step}
        write_checkpoint_files(tmp, model=model, tokenizer=tokenizer, metadata=entries)
        torch.save(trainer_state, tmp / TRAINER_STATE)

    # Listed before it exists: a crash never leaves it unlisted. An existing `target` is a complete
    # earlier copy of this very step, replaced.
    publish_directory(target, write, before_publish=lambda: _write_manifest(run_dir, records))
    write_text_atomically(run_dir / LATEST, name + "\n")
    best = _best(records)
    if best is not None:
        write_text_atomically(run_dir / BEST, best.name + "\n")
    kept = {record.name for record in records[-keep:]} | ({best.name} if best else set())
    for record in records:
        if record.name not in kept and (run_dir / record.name).is_dir():
            shutil.rmtree(run_dir / record.name)
    _write_manifest(run_dir, [record for record in records if record.name in kept])
    return target


def write_checkpoint_files(
    directory: Path, *, model: LanguageModel, tokenizer: Tokenizer, metadata: dict[str, Any]
) -> None:
    """Write the model's config (with `metadata`), weights and tokenizer into `directory`."""
    config = {"model": model_config_to_dict(model.config), **metadata}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, directory / WEIGHTS)
    os.chmod(directory / WEIGHTS, stat.S_IMODE((directory / CONFIG).stat().st_mode))  # safetensors: 0600
    tokenizer.save(str(directory / TOKENIZER))


@dataclass(frozen=True)
class ListedCheckpoint:
    """A checkpoint of a run directory, for `latentattn checkpoints`."""

    name: str
    step: int
    val_loss: float | None
    latest: bool
    best: bool


def list_checkpoints(run_dir: str | Path) -> list[ListedCheckpoint]:
    """The complete checkpoints in `run_dir` (oldest first) with their recorded validation loss and
    whether `latest` or `best` names them."""
    run_dir = Path(run_dir)
    if not (run_dir / LATEST).is_file():
        raise FileNotFoundError(f"no run in {str(run_dir)!r} (expected {LATEST} there)")
    latest = _follow(run_dir / LATEST).name
    best = _follow(run_dir / BEST).name if (run_dir / BEST).is_file() else None
    val_losses = {record.name: record.val_loss for record in read_manifest(run_dir)}
    names = sorted(
        entry.name
        for entry in run_dir.iterdir()
        if STEP_NAME.fullmatch(entry.name) and (entry / CONFIG).is_file()
    )
    return [
        ListedCheckpoint(
            name=name,
            step=int(name.removeprefix("step-")),
            val_loss=val_losses.get(name),
            latest=name == latest,
            best=name == best,
        )
        for name in names
    ]


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` through a temporary sibling and a rename."""
    tmp = temp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)
