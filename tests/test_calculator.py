"""The KV-cache calculator and `latentattn cache`.

Oracles: the DeepSeek-V2 paper's per-token formulas (MHA 2·n_h·d_h·l, GQA 2·n_g·d_h·l, MQA 2·d_h·l,
MLA (d_c + d_R)·l), the published figures in docs/kv-cache.md (exact integers, so exact equality; the
93.3% headline to 0.05 percentage points, as it is quoted), the byte accounting of the real cache
objects in `latentattn.caches`, and the outputs pasted in docs/kv-cache.md (byte for byte).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from latentattn import calculator as calc
from latentattn.caches import KVCache, LatentCache
from latentattn.calculator import (
    DEFAULT_BASELINE,
    DEFAULT_CONTEXT,
    PRESETS,
    CacheEstimate,
    ModelSpec,
    compare,
    load_hf_config,
    parse_context,
    parse_size,
    resolve_model,
    spec_from_flags,
)
from latentattn.cli import main
from latentattn.config import GQAConfig, MLAConfig

DEEPSEEK_V2_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 2048,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096},
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "kv-cache.md"
LLAMA_3_8B_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
}


def write_config(folder, config: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder / "config.json")


# Formulas, per token (elements), for each attention kind.


def test_mha_caches_2_nh_dh_per_layer():
    spec = ModelSpec("m", "mha", n_layers=3, n_heads=4, head_dim=8)
    assert spec.elements_per_token_per_layer == 2 * 4 * 8
    assert spec.elements_per_token == 2 * 4 * 8 * 3


def test_gqa_caches_2_ng_dh_per_layer():
    spec = ModelSpec("g", "gqa", n_layers=3, n_heads=8, n_kv_heads=2, head_dim=16)
    assert spec.elements_per_token == 2 * 2 * 16 * 3


def test_mqa_caches_2_dh_per_layer():
    spec = ModelSpec("q", "mqa", n_layers=3, n_heads=8, head_dim=16)
    assert spec.kv_heads == 1
    assert spec.elements_per_token == 2 * 16 * 3


def test_mla_caches_dc_plus_dr_per_layer_whatever_the_heads():
    few = ModelSpec("a", "mla", n_layers=3, n_heads=2, kv_lora_rank=32, qk_rope_head_dim=8)
    many = ModelSpec("b", "mla", n_layers=3, n_heads=128, kv_lora_rank=32, qk_rope_head_dim=8)
    assert few.elements_per_token == many.elements_per_token == (32 + 8) * 3


def test_bytes_follow_bits_and_may_be_fractional():
    spec = ModelSpec("q", "mqa", n_layers=1, head_dim=3)  # 6 elements per token
    assert CacheEstimate(spec, bits=16).bytes_per_token == 12
    assert CacheEstimate(spec, bits=3).bytes_per_token == 2.25
    estimate = CacheEstimate(spec, bits=8, context=1000, batch=4)
    assert estimate.cache_bytes == 6 * 1000 * 4


# Published numbers (REFERENCE.md, the DeepSeek-V2 paper and the seeds).


def test_deepseek_v2_34560_elements_69120_bytes_bf16():
    estimate = CacheEstimate(resolve_model("deepseek-v2"), bits=16)
    assert estimate.elements_per_token == 34_560
    assert estimate.bytes_per_token == 69_120
    assert estimate.bytes_per_token_per_layer == 1_152


def test_deepseek_v2_lite_27_layers_of_576():
    estimate = CacheEstimate(resolve_model("deepseek-v2-lite"), bits=16)
    assert estimate.elements_per_token == 27 * 576
    assert estimate.bytes_per_token == 31_104


def test_deepseek_v3_61_layers():
    assert resolve_model("deepseek-v3").elements_per_token == 61 * 576


def test_llama_3_8b_65536_elements():
    assert resolve_model("llama-3-8b").elements_per_token == 2 * 8 * 128 * 32 == 65_536


def test_32768_vs_576_numbers_per_token_per_layer():
    assert resolve_model("mha-deepseek-v2-heads").elements_per_token_per_layer == 32_768
    assert resolve_model("deepseek-v2").elements_per_token_per_layer == 576


def test_93_3_percent_vs_deepseek_67b_at_6_bits():
    comparison = compare([resolve_model("deepseek-v2")], baseline=resolve_model("deepseek-67b"), bits=6)
    (row,) = comparison.rows
    assert comparison.baseline.bytes_per_token == 389_120
    assert row.bytes_per_token == 25_920
    assert comparison.reduction(row) == pytest.approx(0.933, abs=5e-4)
    assert comparison.reduction(row) == 1 - 25_920 / 389_120


def test_default_baseline_is_the_mha_counterfactual():
    comparison = compare([resolve_model("deepseek-v2")])
    assert comparison.baseline.model is PRESETS[DEFAULT_BASELINE]
    assert comparison.factor(comparison.rows[0]) == 32_768 / 576


def test_presets_cite_sources_and_unknown_names_list_the_known_ones():
    assert all(spec.source for spec in PRESETS.values())
    with pytest.raises(ValueError, match="deepseek-v2-lite") as error:
        resolve_model("DeepSeek-V2")
    assert "llama-3-70b" in str(error.value)


# Budgets and the longest context that fits.


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("80GiB", 80 * 2**30),
        ("80 GB", 80 * 10**9),
        ("1.5TB", 1_500_000_000_000),
        ("512mib", 512 * 2**20),
        ("2KiB", 2048),
        ("100B", 100),
        ("3TiB", 3 * 2**40),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["80", "GiB", "80XB", "-1GB", "0GB", "inf GB", "1e3GB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_context():
    assert parse_context("4096") == 4096
    assert parse_context("128K") == 131_072 == DEFAULT_CONTEXT
    assert parse_context("1m") == 2**20
    for bad in ("0", "-5", "1.5K", "lots"):
        with pytest.raises(ValueError, match="context"):
            parse_context(bad)


def test_max_context_fills_the_budget_and_one_more_token_overflows():
    budget = parse_size("80GiB")
    estimate = CacheEstimate(resolve_model("deepseek-v2"), bits=16, batch=4, budget_bytes=budget)
    tokens = estimate.max_context
    assert tokens == 80 * 2**30 // (4 * 69_120)
    assert 4 * tokens * 69_120 <= budget < 4 * (tokens + 1) * 69_120
    assert CacheEstimate(resolve_model("deepseek-v2")).max_context is None


@pytest.mark.parametrize(
    ("field", "value"), [("bits", 0), ("bits", 65), ("context", 0), ("batch", -1), ("budget_bytes", 0)]
)
def test_estimate_rejects_non_positive_settings(field, value):
    with pytest.raises(ValueError, match=field):
        CacheEstimate(resolve_model("deepseek-v2"), **{field: value})


# Custom shapes and HF config.json files.


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match=r"gqa needs n_kv_heads \(n_g, --kv-heads\)"):
        ModelSpec("x", "gqa", n_layers=2, n_heads=8, head_dim=4)
    with pytest.raises(ValueError, match="no use for head_dim"):
        ModelSpec("x", "mla", n_layers=2, kv_lora_rank=8, qk_rope_head_dim=4, head_dim=4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelSpec("x", "gqa", n_layers=2, n_heads=6, n_kv_heads=4, head_dim=4)
    with pytest.raises(ValueError, match="n_layers"):
        ModelSpec("x", "mqa", n_layers=0, head_dim=4)


def test_spec_from_flags():
    spec = spec_from_flags("mla", layers=60, heads=128, kv_lora_rank=512, qk_rope_head_dim=64)
    assert spec.elements_per_token == resolve_model("deepseek-v2").elements_per_token
    assert spec_from_flags("mha", layers=2, heads=4, head_dim=8).kv_heads == 4
    assert spec_from_flags(None) is None
    with pytest.raises(ValueError, match="--layers: custom-model flags need --attn"):
        spec_from_flags(None, layers=60)


def test_hf_config_mla(tmp_path):
    path = write_config(tmp_path / "DeepSeek-V2-Lite", DEEPSEEK_V2_LITE_JSON)
    spec = load_hf_config(path)
    assert (spec.name, spec.kind, spec.n_layers, spec.n_heads) == ("DeepSeek-V2-Lite", "mla", 27, 16)
    assert spec.elements_per_token == resolve_model("deepseek-v2-lite").elements_per_token
    assert load_hf_config(tmp_path / "DeepSeek-V2-Lite") == spec  # the folder works too


def test_hf_config_gqa_head_dim_from_hidden_size(tmp_path):
    spec = load_hf_config(write_config(tmp_path / "llama", LLAMA_3_8B_JSON))
    assert (spec.kind, spec.n_kv_heads, spec.head_dim) == ("gqa", 8, 128)
    assert spec.elements_per_token == 65_536
    mha = load_hf_config(write_config(tmp_path / "old", {**LLAMA_3_8B_JSON, "num_key_value_heads": None}))
    assert (mha.kind, mha.kv_heads) == ("mha", 32)
    wide = load_hf_config(write_config(tmp_path / "wide", {**LLAMA_3_8B_JSON, "head_dim": 256}))
    assert wide.head_dim == 256


def test_hf_config_errors_name_the_field_and_file(tmp_path):
    lacking = {key: value for key, value in LLAMA_3_8B_JSON.items() if key != "num_hidden_layers"}
    path = write_config(tmp_path / "lacking", lacking)
    with pytest.raises(ValueError, match="num_hidden_layers") as error:
        load_hf_config(path)
    assert path in str(error.value)
    mla = {key: value for key, value in DEEPSEEK_V2_LITE_JSON.items() if key != "qk_rope_head_dim"}
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        load_hf_config(write_config(tmp_path / "mla", mla))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_hf_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON config"):
        load_hf_config(tmp_path / "bad.json")


def test_resolve_model_prefers_presets_then_paths(tmp_path):
    assert resolve_model("deepseek-v3") is PRESETS["deepseek-v3"]
    write_config(tmp_path / "llama", LLAMA_3_8B_JSON)
    assert resolve_model(str(tmp_path / "llama")).name == "llama"
    with pytest.raises(FileNotFoundError):
        resolve_model("missing/config.json")
    with pytest.raises(ValueError, match="not a preset"):
        resolve_model("llama-3-9b")


# Agreement with the cache objects that the attention layers use.


@pytest.mark.parametrize(("dtype", "bits"), [(torch.bfloat16, 16), (torch.float32, 32)])
def test_calculator_agrees_with_the_cache_objects(dtype, bits):
    mla = MLAConfig(
        d_model=64, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
    )
    gqa = GQAConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16)
    latent = LatentCache(mla, batch_size=2, max_len=8, dtype=dtype)
    kv = KVCache(gqa, batch_size=2, max_len=8, dtype=dtype)
    for config, cache in ((mla, latent), (gqa, kv)):
        estimate = CacheEstimate(ModelSpec.from_attention(config, n_layers=1), bits=bits, context=8, batch=2)
        assert estimate.bytes_per_token_per_layer == cache.bytes_per_token
        assert estimate.cache_bytes == cache.nbytes


# The command line.


def test_cli_table_shows_the_93_3_percent(capsys):
    assert main(["cache", "deepseek-v2", "--bits", "6", "--baseline", "deepseek-67b"]) == 0
    out = capsys.readouterr().out
    assert "93.3%" in out
    assert "25,920" in out
    assert "389,120" in out


def test_cli_json_round_trips(capsys, tmp_path):
    path = write_config(tmp_path / "llama", LLAMA_3_8B_JSON)
    argv = ["cache", "deepseek-v2", path, "--attn", "mqa", "--layers", "2", "--head-dim", "64"]
    assert main([*argv, "--context", "4K", "--batch", "2", "--budget", "1GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["context"], data["batch"], data["budget_bytes"]) == (4096, 2, 2**30)
    assert data["baseline"]["name"] == DEFAULT_BASELINE
    names = [row["name"] for row in data["models"]]
    assert names == ["deepseek-v2", "llama", "custom-mqa"]
    v2 = data["models"][0]
    assert v2["elements_per_token"] == 34_560
    assert v2["bytes_per_token"] == 69_120
    assert v2["cache_bytes"] == 69_120 * 4096 * 2
    assert v2["max_context"] == 2**30 // (2 * 69_120)
    assert v2["reduction_vs_baseline"] == pytest.approx(1 - 576 / 32_768)


def test_cli_list(capsys):
    assert main(["cache", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("deepseek-v2", "deepseek-67b", "mistral-7b", "mha-deepseek-v2-heads"):
        assert name in out
    assert "huggingface.co/deepseek-ai/DeepSeek-V2" in out
    assert main(["cache", "--list", "--json"]) == 0
    assert {row["name"] for row in json.loads(capsys.readouterr().out)} == set(PRESETS)


def test_cli_baseline_bits_sets_the_baseline_precision(capsys):
    argv = ["cache", "deepseek-v2", "--bits", "6", "--baseline", "deepseek-67b", "--baseline-bits", "8"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["baseline"]["bits"], data["baseline"]["bytes_per_token"]) == (8, 194_560)
    assert data["models"][0]["reduction_vs_baseline"] == 1 - 25_920 / 194_560
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "194,560" in out
    assert "86.7%" in out
    assert "deepseek-67b at 8 bits" in out


def test_plot_gives_every_model_its_own_line_style_and_marker():
    """deepseek-v2 and -v3 differ by one layer (69,120 vs 70,272 B/token): on log axes the lines
    coincide, so line style and staggered markers, not colour alone, must tell them apart."""
    from latentattn.plots import cache_vs_context_figure

    names = ["deepseek-v2", "deepseek-v3", "deepseek-v2-lite", "llama-3-8b", "mistral-7b"]
    figure = cache_vs_context_figure(compare([resolve_model(name) for name in names]))
    lines = {line.get_label().split()[0]: line for line in figure.axes[0].get_lines()}
    models = [lines[name] for name in names]
    assert all(line.get_marker() not in (None, "None", "") for line in models)
    assert len({(line.get_linestyle(), line.get_marker()) for line in models}) == len(names)
    assert len({line.get_markevery()[0] for line in models}) == len(names)


def test_cli_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "cache.png"
    assert main(["cache", "deepseek-v2", "llama-3-8b", "--budget", "80GiB", "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")
    assert str(path) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deepseek-v9"], "unknown model 'deepseek-v9'"),
        (["deepseek-v2", "--budget", "80XB"], "cannot read the size '80XB'"),
        (["missing/config.json"], "config file not found"),
        (["--config", "missing.json"], "config file not found"),
        (["deepseek-v2", "--context", "0"], "context must be a positive"),
        (["deepseek-v2", "--batch", "0"], "batch must be a positive"),
        (["deepseek-v2", "--bits", "0"], "bits must be an integer from 1 to 64"),
        (["deepseek-v2", "--baseline-bits", "65"], "baseline_bits must be an integer from 1 to 64"),
        (["deepseek-v2", "--baseline", "nope"], "unknown model 'nope'"),
        ([], "no model given"),
        (["--attn", "gqa", "--layers", "4", "--head-dim", "8"], "model 'custom-gqa': gqa needs"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert main(["cache", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"latentattn cache: error: {message}")
    assert captured.err.count("\n") == 1


def test_cli_config_lacking_fields(capsys, tmp_path):
    path = write_config(tmp_path / "bad", {"num_hidden_layers": 4})
    assert main(["cache", path]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads" in err
    assert path in err


def test_latent_format_bytes_match_the_quantized_cache_and_flashmla():
    """FlashMLA's 8-bit layout: 512 + 4·4 + 64·2 = 656 B per token per layer, as the cache object stores."""
    from latentattn.caches import QuantizedLatentCache

    v2 = calc.resolve_model("deepseek-v2")
    for latent_format in calc.LATENT_FORMATS:
        estimate = calc.CacheEstimate(v2, latent_format=latent_format, context=1000)
        assert estimate.bytes_per_token_per_layer == 656
        assert estimate.bytes_per_token == 656 * 60
        assert estimate.cache_bytes == 656 * 60 * 1000
        config = MLAConfig(d_model=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536)
        assert QuantizedLatentCache(config, 1, 1, format=latent_format).bytes_per_token == 656


def test_latent_format_in_comparisons_and_cli(capsys):
    comparison = calc.compare(
        [calc.resolve_model("deepseek-v2"), calc.resolve_model("llama-3-8b")],
        latent_format="fp8",
        context=1024,
    )
    v2, llama = comparison.rows
    assert v2.latent_format == "fp8"
    assert llama.latent_format is None  # GQA rows keep --bits
    assert v2.as_dict()["bytes_per_token"] == 39_360
    with pytest.raises(ValueError, match="applies to MLA, not llama-3-8b"):
        calc.CacheEstimate(calc.resolve_model("llama-3-8b"), latent_format="int8")
    assert main(["cache", "deepseek-v2", "--latent-format", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["bytes_per_token_per_layer"] == 656


# docs/kv-cache.md shows real output.

DOC_COMMANDS = re.findall(
    r"```console\n\$ latentattn (cache .*?)\n(.*?)```", DOC.read_text(), flags=re.DOTALL
)


def test_doc_console_blocks_are_all_found():
    assert len(DOC_COMMANDS) == DOC.read_text().count("```console") >= 7


@pytest.mark.parametrize(("command", "expected"), DOC_COMMANDS, ids=[c for c, _ in DOC_COMMANDS])
def test_doc_console_blocks_are_the_tool_output(capsys, tmp_path, monkeypatch, command, expected):
    """Byte for byte, trailing spaces included; `| tail -N` keeps the last N lines."""
    monkeypatch.chdir(tmp_path)  # where --plot writes
    argv, _, tail = command.partition(" | tail -")
    assert main(shlex.split(argv)) == 0
    lines = capsys.readouterr().out.splitlines(keepends=True)
    assert "".join(lines[-int(tail) :] if tail else lines) == expected


def test_doc_json_example_is_the_tool_output(capsys):
    """The condensed `--json` example: its models entry exactly, and the keys of the rest."""
    ((command, block),) = re.findall(
        r"here for\s+`latentattn (cache [^`]*)`.*?```json\n(.*?)```", DOC.read_text(), flags=re.DOTALL
    )
    shown = json.loads(re.sub(r'"baseline": \{ \.\.\..*\},', '"baseline": null,', block))
    assert main(shlex.split(command)) == 0
    real = json.loads(capsys.readouterr().out)
    assert shown["models"] == real["models"]
    assert shown.keys() == real.keys()
    per_model = {"reduction_vs_baseline", "factor_vs_baseline"}
    assert real["baseline"].keys() == real["models"][0].keys() - per_model
