"""`latentattn export`: checkpoints → Hugging Face directories, verified by loading them in transformers.

Oracles: latentattn's own logits and greedy tokens on the same checkpoint; transformers must load the
exported directory with no missing, unexpected or mismatched keys and reproduce them (fp32, relative
≤ 1e-4; greedy tokens equal). Import of the export must give back the same weights.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from latentattn import checkpoint as ckpt
from latentattn.config import MLAConfig, RopeConfig, YarnConfig
from latentattn.convert import ConversionConfig, model_to_mla
from latentattn.data import train_tokenizer
from latentattn.generate import SamplingConfig, run_generate
from latentattn.interop.hf_export import export_checkpoint, export_refusal
from latentattn.interop.hf_import import import_model
from latentattn.metrics import relative_error
from latentattn.model import LanguageModel, get_preset

transformers = pytest.importorskip("transformers")

YARN = YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707)
SAMPLE = 'def greet(name):\n    """Say hello."""\n    return f"héllo {name}"  # ok\n'


def tokenizer():
    return train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=300)


def make_checkpoint(
    run_dir: Path,
    kind: str,
    *,
    tie: bool = True,
    q_lora_rank: int | None = None,
    rope: RopeConfig | None = None,
) -> LanguageModel:
    """A random `debug`-preset model with weights wide enough that greedy tokens vary."""
    torch.manual_seed(0)
    tok = tokenizer()
    config = get_preset("debug").model(kind, vocab_size=tok.get_vocab_size(), max_seq_len=128)
    attention = config.attention
    if rope is not None:
        attention = dataclasses.replace(attention, rope=rope)
    if q_lora_rank is not None:
        attention = dataclasses.replace(attention, q_lora_rank=q_lora_rank)
    model = LanguageModel(dataclasses.replace(config, attention=attention, tie_embeddings=tie)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms: positive scales around 1
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.3)
    ckpt.save_checkpoint(run_dir, step=1, model=model, tokenizer=tok, train={}, trainer_state={})
    return model


def load_hf(directory: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    return model.eval()


CASES = {
    "mla": {"kind": "mla"},
    "mla-q-lora-untied": {"kind": "mla", "q_lora_rank": 24, "tie": False},
    "mla-yarn-half-split": {"kind": "mla", "rope": RopeConfig(interleave=False, yarn=YARN)},
    "gqa": {"kind": "gqa"},
    "mha-untied": {"kind": "mha", "tie": False},
    "mqa-interleaved": {"kind": "mqa", "rope": RopeConfig(interleave=True)},
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_the_export_and_reproduces_it(tmp_path, case):
    model = make_checkpoint(tmp_path / "run", **CASES[case])
    out = export_checkpoint(tmp_path / "run", out=tmp_path / "hf")
    hf = load_hf(out)
    tokens = torch.randint(0, 300, (2, 60), generator=torch.Generator().manual_seed(1))  # past YaRN's 16
    with torch.no_grad():
        assert relative_error(hf(tokens).logits, model(tokens)) <= 1e-4

    # AutoTokenizer encodes a prompt to the ids `latentattn generate` feeds (separator first)
    auto_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tok = tokenizer()
    prompt_ids = auto_tokenizer(SAMPLE)["input_ids"]
    assert prompt_ids == [tok.token_to_id("<|endoftext|>"), *tok.encode(SAMPLE).ids]
    assert auto_tokenizer.decode(prompt_ids, skip_special_tokens=True) == SAMPLE

    # greedy decoding through transformers' cache gives `latentattn generate --temperature 0`'s tokens
    ours = run_generate(
        tmp_path / "run",
        prompts=[SAMPLE],
        max_new_tokens=32,
        sampling=SamplingConfig(temperature=0),
        out=io.StringIO(),
    ).tokens[0]
    assert len(ours) == 32 and len(set(ours)) >= 8  # not degenerate
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)
    assert theirs[0, len(prompt_ids) :].tolist() == ours

    # import reads the export back to the same weights (RoPE rows permuted back where the layout changed)
    back = ckpt.load_checkpoint(import_model(out, out=tmp_path / "back")).model
    if model.config.attention.rope.interleave == isinstance(model.config.attention, MLAConfig):
        for name, tensor in model.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name
    with torch.no_grad():
        assert relative_error(back(tokens), model(tokens)) <= 1e-5


def test_deepseek_config_fields_and_explicit_lm_head(tmp_path):
    make_checkpoint(tmp_path / "run", "mla")
    out = export_checkpoint(tmp_path / "run", out=tmp_path / "hf", config_format=5)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 2
    assert isinstance(config["n_routed_experts"], int) and config["n_group"] < config["n_routed_experts"]
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert (
        config["q_lora_rank"] is None and config["kv_lora_rank"] == 32 and config["rope_interleave"] is True
    )
    assert (config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]) == (16, 8, 16)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert (
        config["attention_bias"] is False and config["hidden_act"] == "silu" and config["tie_word_embeddings"]
    )
    assert config["bos_token_id"] == config["eos_token_id"] == 0
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" in weights.keys()  # noqa: SIM118 (vLLM never ties: the head is written)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 0}


def test_transformers_4_field_names_load_alike(tmp_path):
    """`rope_theta` + `rope_scaling` (4.x names), read by the installed transformers to the same logits."""
    model = make_checkpoint(tmp_path / "run", "mla", rope=RopeConfig(yarn=YARN))
    out = export_checkpoint(tmp_path / "run", out=tmp_path / "hf", config_format=4)
    config = json.loads((out / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_scaling"]["rope_type"] == "yarn"
    tokens = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(load_hf(out)(tokens).logits, model(tokens)) <= 1e-4


def test_sharded_export_has_an_index_and_loads(tmp_path):
    model = make_checkpoint(tmp_path / "run", "gqa", tie=False)
    out = export_checkpoint(tmp_path / "run", out=tmp_path / "hf", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    tokens = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert relative_error(load_hf(out)(tokens).logits, model(tokens)) <= 1e-4
    back = ckpt.load_checkpoint(import_model(out, out=tmp_path / "back")).model
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_qkv_biases_export_as_qwen2(tmp_path):
    """A GQA model with q/k/v biases (an imported Qwen2) goes out as Qwen2ForCausalLM."""
    torch.manual_seed(0)
    tok = tokenizer()
    config = get_preset("debug").model("gqa", vocab_size=tok.get_vocab_size())
    config = dataclasses.replace(config, attention=dataclasses.replace(config.attention, qkv_bias=True))
    model = LanguageModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    ckpt.save_checkpoint(tmp_path / "run", step=1, model=model, tokenizer=tok, train={}, trainer_state={})
    out = export_checkpoint(tmp_path / "run", out=tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    tokens = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert relative_error(load_hf(out)(tokens).logits, model(tokens)) <= 1e-4


def test_what_hf_cannot_express_is_named():
    config = get_preset("debug").model("gqa")
    wide_heads = dataclasses.replace(config.attention, qkv_bias=True, head_dim=32)
    assert "heads span hidden_size; here 4 x 32 != 64" in export_refusal(
        dataclasses.replace(config, attention=wide_heads)
    )
    scaled_softmax = dataclasses.replace(config.attention, rope=RopeConfig(interleave=False, yarn=YARN))
    assert "Llama's attention does not" in export_refusal(
        dataclasses.replace(config, attention=scaled_softmax)
    )
    assert export_refusal(config) is None
    mla = get_preset("debug").model("mla")
    listed = dataclasses.replace(mla.attention, rope=RopeConfig(frequencies=(1.0, 0.5, 0.25, 0.125)))
    assert "RoPE frequencies are a list" in export_refusal(dataclasses.replace(mla, attention=listed))
    biased = dataclasses.replace(mla.attention, bias=True)
    assert "MLA projections have biases" in export_refusal(dataclasses.replace(mla, attention=biased))


def test_an_attention_kind_without_a_hugging_face_format_is_refused():
    """A kind added to the registry with its own config class is never exported as Llama by default."""
    other = types.SimpleNamespace(attention=types.SimpleNamespace(kind="linear"))
    assert "linear attention has no Hugging Face format here" in export_refusal(other)


def test_converted_mla_is_refused_with_what_to_do(tmp_path):
    """`model_to_mla` runs kv_norm in its linear regime (a huge eps): transformers would compute
    something else, so export refuses and says to heal first."""
    source = make_checkpoint(tmp_path / "src", "mha")
    config = ConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, rope_frequencies="highest")
    converted = model_to_mla(source, config, torch.randint(0, 300, (2, 32)))
    ckpt.save_checkpoint(
        tmp_path / "run", step=1, model=converted, tokenizer=tokenizer(), train={}, trainer_state={}
    )
    with pytest.raises(ValueError, match=r"kv_a_layernorm\) use eps .* heal it with norm_eps 1e-06 first"):
        export_checkpoint(tmp_path / "run", out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_mla_with_another_block_norm_eps_is_refused(tmp_path):
    """vLLM/SGLang take rms_norm_eps for the latent norms, transformers 1e-6: refused unless both agree."""
    torch.manual_seed(0)
    tok = tokenizer()
    config = dataclasses.replace(
        get_preset("debug").model("mla", vocab_size=tok.get_vocab_size()), norm_eps=1e-5
    )
    ckpt.save_checkpoint(
        tmp_path / "run", step=1, model=LanguageModel(config), tokenizer=tok, train={}, trainer_state={}
    )
    with pytest.raises(ValueError, match="rms_norm_eps is 1e-05: vLLM and SGLang use it for q_a_layernorm"):
        export_checkpoint(tmp_path / "run", out=tmp_path / "hf")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentattn", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
    )


def test_cli_export_errors_leave_nothing_half_written(tmp_path):
    make_checkpoint(tmp_path / "run", "mla")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    cases = [
        (["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "no checkpoint in"),
        (["export", str(tmp_path / "run"), "--out", str(tmp_path / "busy")], "is not empty; pass --force"),
        (["export", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "sub")], "not a folder"),
        (["export", str(tmp_path / "run"), "--out", str(tmp_path)], "holds the input"),
        (["export", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"], "size"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("latentattn export: error: ") and message in result.stderr, (
            result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["mine.txt"]
    assert not (tmp_path / "o").exists()

    result = run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "busy"), "--force")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "busy" / "mine.txt").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "busy").iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_failed_write_removes_the_temporary_directory(tmp_path, monkeypatch):
    from latentattn.interop import hf_export

    make_checkpoint(tmp_path / "run", "gqa")

    def fail(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "save_file", fail)
    with pytest.raises(ValueError, match="cannot write --out .*No space left on device"):
        export_checkpoint(tmp_path / "run", out=tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.skipif(
    not os.environ.get("LATENTATTN_SLOW"), reason="slow: set LATENTATTN_SLOW=1 (needs make demo)"
)
def test_demo_checkpoint_exports_and_generates_alike(tmp_path):
    """`latentattn export runs/demo --out …` after `make demo`; transformers' greedy tokens = ours."""
    run = Path(os.environ.get("LATENTATTN_DEMO", "runs/demo"))
    out = export_checkpoint(run, out=tmp_path / "demo-hf")
    hf = load_hf(out)
    prompt_ids = transformers.AutoTokenizer.from_pretrained(out)("def ")["input_ids"]
    ours = run_generate(
        run, prompts=["def "], max_new_tokens=32, sampling=SamplingConfig(temperature=0), out=io.StringIO()
    ).tokens[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)
    assert theirs[0, len(prompt_ids) : len(prompt_ids) + len(ours)].tolist() == ours
