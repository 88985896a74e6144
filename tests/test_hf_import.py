"""`latentattn import`: Hugging Face model directories → checkpoints.

Oracle: transformers' own LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM, built from tiny
random configs and written with `save_pretrained` in the test; the imported checkpoint's logits must
equal theirs on the same tokens (fp32, relative ≤ 1e-4).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors

from latentattn.checkpoint import load_checkpoint
from latentattn.cli import main
from latentattn.data import train_tokenizer
from latentattn.generate import SamplingConfig, run_generate
from latentattn.interop.hf_export import export_checkpoint
from latentattn.interop.hf_import import import_model, import_parts, read_hf_directory
from latentattn.interop.hf_model import model_config_from_hf
from latentattn.metrics import relative_error

transformers = pytest.importorskip("transformers")

VOCAB = 300
GREEDY = SamplingConfig(temperature=0)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}


def llama_tokenizer() -> Tokenizer:
    """A byte-level BPE with Llama's special tokens <s> (id 1, prepended by the tokenizer) and </s> (2)."""
    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=VOCAB - 3)
    tokenizer.add_special_tokens(["<s>", "</s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def hf_model(arch: str = "llama", *, rope: str = "default", kv_heads: int = 2, tie: bool = False, **extra):
    """A random transformers model with perturbed norms and biases, so every weight's mapping matters."""
    torch.manual_seed(0)
    config = CONFIGS[arch](
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_parameters=dict(ROPES[rope]),
        **({"sliding_window": None} if arch == "mistral" else {}),
        **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def save_hf(model, directory: Path, *, max_shard_size: str | None = None) -> Path:
    """`save_pretrained` plus Llama-style tokenizer files and a generation config with two stop ids."""
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer = llama_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": [eos, 5]})
    )
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "bos_token_id": bos, "eos_token_id": eos}))
    return directory


def assert_same_logits(hf, checkpoint_dir: Path, length: int = 200) -> None:
    tokens = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    ours = load_checkpoint(checkpoint_dir).model
    with torch.no_grad():
        assert relative_error(ours(tokens), hf(tokens).logits) <= 1e-4


@pytest.mark.parametrize(
    ("arch", "rope", "kv_heads", "tie"),
    [
        ("llama", "default", 2, False),  # GQA
        ("llama", "llama3", 4, True),  # MHA, tied
        ("llama", "linear", 1, False),  # MQA
        ("llama", "yarn", 2, True),
        ("mistral", "default", 2, False),
        ("qwen2", "yarn", 2, False),  # q/k/v biases
        ("qwen2", "default", 1, True),
    ],
)
def test_import_reproduces_transformers_logits(tmp_path, arch, rope, kv_heads, tie):
    hf = hf_model(arch, rope=rope, kv_heads=kv_heads, tie=tie)
    out = import_model(save_hf(hf, tmp_path / "hf"), out=tmp_path / "ckpt")
    assert_same_logits(hf, out)  # 200 positions: past the llama3 / YaRN original lengths
    config = load_checkpoint(out).config
    assert config.tie_embeddings == tie and config.norm_eps == 1e-5 and config.max_seq_len == 256
    assert config.attention.qkv_bias == (arch == "qwen2")


@pytest.mark.parametrize(("arch", "rope"), [("llama", "llama3"), ("qwen2", "linear")])
def test_imported_models_export_to_the_same_logits(tmp_path, arch, rope):
    """HF → latentattn → HF: the re-exported directory computes what the source did."""
    hf = hf_model(arch, rope=rope)
    ckpt = import_model(save_hf(hf, tmp_path / "hf"), out=tmp_path / "ckpt")
    out = export_checkpoint(ckpt, out=tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["rope_parameters"] == ROPES[rope]
    tokens = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(again(tokens).logits, hf(tokens).logits) <= 1e-4
    prompt = "x = 1"
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(prompt)["input_ids"] == llama_tokenizer().encode(prompt).ids  # BOS as the source adds it
    assert auto.chat_template == CHAT_TEMPLATE


def test_sharded_directory_and_special_tokens(tmp_path):
    hf = hf_model()
    source = save_hf(hf, tmp_path / "hf", max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    assert len(list(source.glob("*.safetensors"))) > 1
    out = import_model(source, out=tmp_path / "ckpt")
    assert_same_logits(hf, out, length=20)
    tokens = load_checkpoint(out).tokens
    tokenizer = llama_tokenizer()
    assert tokens.bos_id == tokenizer.token_to_id("<s>") and tokens.add_bos  # the tokenizer adds it
    assert tokens.eos_ids == (tokenizer.token_to_id("</s>"), 5)  # generation_config's list
    assert tokens.chat_template == CHAT_TEMPLATE


def test_import_parts_takes_parts_from_any_reader(tmp_path, capsys):
    """The entry point other readers (GGUF) feed: a config dict, HF-named tensors and a tokenizer."""
    hf = hf_model()
    parts = read_hf_directory(save_hf(hf, tmp_path / "hf"))
    plain = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=VOCAB)  # adds no BOS itself
    out = import_parts(
        parts.config, parts.tensors, plain, bos_token_id=3, eos_token_id=4, out=tmp_path / "ckpt", source="x"
    )
    tokens = load_checkpoint(out).tokens
    assert (tokens.bos_id, tokens.eos_ids, tokens.add_bos, tokens.chat_template) == (3, (4,), False, None)
    forced = import_parts(
        parts.config,
        parts.tensors,
        plain,
        bos_token_id=3,
        eos_token_id=None,
        add_bos_token=True,
        out=tmp_path / "b",
    )
    assert load_checkpoint(forced).tokens.add_bos
    assert main(["generate", str(out), "--max-new-tokens", "3"]) == 2  # no prompt and no BOS to start from
    assert "prompt 1 is empty and the model has no BOS token" in capsys.readouterr().err


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentattn", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_cli_import_then_generate_and_eval(tmp_path):
    """`latentattn import` then `generate` (BOS first, greedy through the K/V cache with q/k/v biases) and
    `eval` on the built-in corpus encoded with the imported tokenizer."""
    hf = hf_model("qwen2")
    source = save_hf(hf, tmp_path / "hf")
    result = run_cli("import", str(source), "--out", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    prompt = "def main():"
    generated = run_cli("generate", str(tmp_path / "ckpt"), "--prompt", prompt, "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith(prompt)
    # the same greedy ids as transformers' generate on the same prompt ids (BOS first, the same EOS ids)
    result = run_generate(
        tmp_path / "ckpt", prompts=[prompt], max_new_tokens=12, sampling=GREEDY, out=io.StringIO()
    )
    tokenizer = llama_tokenizer()
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    assert ids[0, 0] == tokenizer.token_to_id("<s>")
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[2, 5], pad_token_id=0)
    assert result.tokens[0] == expected[0, ids.shape[1] :].tolist()

    evaluated = run_cli(
        "eval", str(tmp_path / "ckpt"), "--windows", "2", "--formats", "none", "full", "--json",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    rows = json.loads(evaluated.stdout)
    assert abs(rows[1]["delta_loss"]) < 1e-4 and rows[0]["val_loss"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architectures"),
        ({"attention_bias": True}, "unsupported attention_bias=True"),
        ({"mlp_bias": True}, "unsupported mlp_bias=True"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "rope_type 'dynamic'",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial",
        ),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 16}, "unsupported sliding_window=16"),
        ({"architectures": ["Qwen2ForCausalLM"], "layer_types": ["sliding_attention"] * 2}, "layer_types"),
        ({"architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 1}, "unsupported MoE layers"),
        ({"num_hidden_layers": 3}, "missing model.layers.2"),
    ],
)
def test_unsupported_configs_are_named(tmp_path, change, message):
    source = save_hf(hf_model(), tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        import_model(source, out=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unsupported_field_message_is_one_line():
    with pytest.raises(ValueError, match="^unsupported sliding_window=8: [^\n]*$"):
        model_config_from_hf(
            {"architectures": ["MistralForCausalLM"], "sliding_window": 8, "max_position_embeddings": 64}
        )


def test_cli_errors_leave_out_untouched(tmp_path):
    source = save_hf(hf_model(), tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    cases = [
        (
            ["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
            "not a Hugging Face model directory",
        ),
        (["import", str(source), "--out", str(tmp_path / "busy")], "is not empty; pass --force"),
        (["import", str(source), "--out", str(source)], "holds the input"),
    ]
    (tmp_path / "no-tok").mkdir()
    (tmp_path / "no-tok" / "config.json").write_text((source / "config.json").read_text())
    cases.append((["import", str(tmp_path / "no-tok"), "--out", str(tmp_path / "o")], "no tokenizer.json"))
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("latentattn import: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["mine.txt"]
    assert not (tmp_path / "o").exists()
    assert run_cli("import", str(source), "--out", str(tmp_path / "busy"), "--force").returncode == 0
    assert not (tmp_path / "busy" / "mine.txt").exists() and (tmp_path / "busy" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left
