"""`latentattn convert`: an MHA/GQA/MQA checkpoint in, an ordinary latentattn checkpoint out.

The output directory holds `config.json` (the source's metadata — special tokens, training record —
with the converted model's config and a "conversion" record), `model.safetensors` and every other file
of the source checkpoint copied as it is (`tokenizer.json`, `tokenizer_config.json`, …; not
`trainer_state.pt`, which belongs to the source's training run), so `generate`, `eval` and `serve`
read it like any checkpoint. It is written completely or not at all (`interop.output_dir`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from latentattn.checkpoint import (
    CONFIG,
    TRAINER_STATE,
    WEIGHTS,
    load_checkpoint,
    read_metadata,
    write_checkpoint_files,
)
from latentattn.convert.calibration import calibration_windows
from latentattn.convert.layer import ConversionConfig
from latentattn.convert.merge import merge_kv_heads
from latentattn.convert.model import check_sizes, model_to_mla, require_unconverted
from latentattn.convert.moments import Moments
from latentattn.interop.output_dir import check_output_dir, write_directory
from latentattn.model import LanguageModel, ModelConfig

DEFAULT_CALIBRATION_TOKENS = 8192
CALIBRATION_WINDOW = 512
"""Tokens per calibration window (at most the model's context)."""


@dataclass(frozen=True)
class ConversionResult:
    """Where the converted checkpoint went and what its cache costs (per token, all layers, bf16)."""

    out: Path
    model: LanguageModel
    calibration_shape: tuple[int, int]
    """(B, T) of the calibration tokens; (0, 0) without calibration."""
    cache_bytes_before: int
    cache_bytes_after: int
    cache_width_before: int
    """Cached values per token per layer."""
    cache_width_after: int


def cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV cache bytes per token over all layers: n_layers · cache_width values of `dtype`."""
    return config.n_layers * config.attention.cache_width * dtype.itemsize


def convert_model(
    model: LanguageModel,
    config: ConversionConfig,
    calibration: Tensor | None = None,
    *,
    moments: list[Moments] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LanguageModel:
    """`model` converted by `config.method`: MLA by "svd"/"pca" (`model_to_mla`), GQA by "merge"."""
    if config.method == "merge":
        return merge_kv_heads(model, config.kv_heads)
    return model_to_mla(model, config, calibration, moments=moments, progress=progress)


def _copy_extra_files(source: Path, directory: Path) -> None:
    """Every file of the checkpoint `source` but its config, weights and trainer state, as it is."""
    for entry in source.iterdir():
        if entry.name not in (CONFIG, WEIGHTS, TRAINER_STATE):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, directory / entry.name)


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    config: ConversionConfig,
    *,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    calibration_file: str | Path | None = None,
    moments: list[Moments] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert the checkpoint `source` (a run or checkpoint directory) into the checkpoint directory
    `out` (new or empty; `force` replaces a non-empty one). "svd"/"pca" calibrate on up to
    `calibration_tokens` tokens of `calibration_file` (default: the built-in corpus) in the
    checkpoint's own tokenizer; `moments`: the source's `layer_input_moments` on those tokens, if
    computed once to convert one model several ways."""
    check_output_dir(out, force=force, keep=Path(source))
    loaded = load_checkpoint(source)
    require_unconverted(loaded.model)
    tokens = None
    if config.method != "merge":
        check_sizes(loaded.model, config)
        window = min(CALIBRATION_WINDOW, loaded.config.max_seq_len)
        tokens = calibration_windows(
            loaded.tokenizer, n_tokens=calibration_tokens, window=window, file=calibration_file
        )
    converted = convert_model(loaded.model, config, tokens, moments=moments, progress=progress)

    calibrated = 0 if tokens is None else tokens.numel()
    metadata = {key: value for key, value in read_metadata(loaded.directory).items() if key != "model"}
    metadata["conversion"] = {
        "source": str(loaded.directory.resolve()),
        **asdict(config),
        "calibration_tokens": calibrated,
        "calibration_file": None if calibration_file is None else str(calibration_file),
    }

    def write(directory: Path) -> None:
        write_checkpoint_files(directory, model=converted, tokenizer=loaded.tokenizer, metadata=metadata)
        _copy_extra_files(loaded.directory, directory)  # the source's tokenizer.json, byte for byte

    out = write_directory(out, write, force=force, keep=loaded.directory)
    return ConversionResult(
        out=out,
        model=converted,
        calibration_shape=(0, 0) if tokens is None else tuple(tokens.shape),
        cache_bytes_before=cache_bytes_per_token(loaded.config),
        cache_bytes_after=cache_bytes_per_token(converted.config),
        cache_width_before=loaded.config.attention.cache_width,
        cache_width_after=converted.config.attention.cache_width,
    )
