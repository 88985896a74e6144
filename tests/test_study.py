"""The study: the smoke preset end to end (report structure, sane numbers), parameter matching,
the Pareto frontier and the config errors.

Oracles: the cache formulas (2·G·D or C + R numbers per layer), MHA's parameter total, hand-made point
sets for the frontier. No timing asserts.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from latentattn import study
from latentattn import train as train_module
from latentattn.cli import main
from latentattn.model import LanguageModel, get_preset
from latentattn.study import StudyConfig, Variant, matched_d_ff, run_study, study_preset
from latentattn.study_report import PLOTS, pareto_front


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("study")
    corpus = folder / "corpus"
    corpus.mkdir()
    (corpus / "textwrap.py").write_text(Path(textwrap.__file__).read_text())
    out = folder / "out"
    threads = torch.get_num_threads()
    args = ["--out", str(out), "--data", str(corpus), "--cache-dir", str(folder / "cache"), "--threads", "1"]
    try:
        assert main(["study", "--preset", "smoke", *args, "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)  # tiny ops: one thread per pytest worker avoids oversubscription
    return out, json.loads((out / "results.json").read_text())


def test_smoke_study_writes_a_complete_report(smoke):
    out, results = smoke
    for name in ("report.md", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for heading in (
        "## Variants",
        "## Learned vs post-hoc",
        "## Training memory",
        "## Decode",
        "## Findings",
    ):
        assert heading in report
    names = set(results["variants"])
    assert {"mha", "gqa-2", "mqa", "mla-8+8", "mla-16+8", "mla-32+8", "mla-16+4"} == names
    for name in names:
        assert f"`{name}`" in report
    assert results["environment"]["torch"] == torch.__version__
    assert results["environment"]["torch_threads"] >= 1


def test_smoke_study_numbers_are_sane(smoke):
    _, results = smoke
    config = results["config"]
    vocab_ln = math.log(get_preset("debug").vocab_size)
    layers, heads, head_dim = get_preset("debug").n_layers, config["n_heads"], config["head_dim"]
    expected_width = {"mha": 2 * heads * head_dim, "gqa-2": 2 * 2 * head_dim, "mqa": 2 * head_dim}
    mha_total = results["variants"]["mha"]["params"]["total"]
    for name, v in results["variants"].items():
        variant = v["variant"]
        width = expected_width.get(name, (variant["kv_lora_rank"] or 0) + (variant["qk_rope_head_dim"] or 0))
        assert v["cache_elements_per_token_per_layer"] == width
        assert v["cache_bytes_per_token_bf16"] == 2 * width * layers
        assert v["cache_bytes_per_token_fp32"] == 4 * width * layers
        factor = v["deepseek_v2_projection"]["factor_vs_mha"]
        assert factor == pytest.approx(expected_width["mha"] / width)
        assert v["deepseek_v2_projection"]["bytes_per_token"] == pytest.approx(
            2 * 2 * 128 * 128 * 60 / factor
        )
        assert len(v["runs"]) == len(config["seeds"]) == 2
        for run in v["runs"]:
            assert 0 < run["val_loss"] < vocab_ln + 1  # near or below uniform after a few steps
            assert run["val_ppl"] == pytest.approx(math.exp(run["val_loss"]))
            assert run["tokens_per_s"] > 0 and run["curves"]["train"] and run["curves"]["val"]
        losses = [run["val_loss"] for run in v["runs"]]
        assert v["val_loss"]["min"] <= v["val_loss"]["mean"] <= v["val_loss"]["max"]
        assert v["val_loss"]["mean"] == pytest.approx(sum(losses) / len(losses))
        assert abs(v["params"]["total"] - mha_total) <= 3 * config["head_dim"] * 4 * layers  # matched
        assert [row["context"] for row in v["decode"]] == list(config["decode_contexts"])
        assert all(row["tokens_per_s"] > 0 for row in v["decode"])
    conversion = results["conversion"]
    assert {(row["method"], row["seed"]) for row in conversion} == {
        (m, s) for m in ("svd", "pca") for s in config["seeds"]
    }
    target = results["variants"]["mla-16+8"]
    for row in conversion:
        assert row["cache_bytes_per_token_bf16"] == target["cache_bytes_per_token_bf16"]
        for key in ("converted_val_loss", "healed_val_loss", "mha_continued_val_loss"):
            assert 0 < row[key] < 2 * vocab_ln, key
        mha_run = results["variants"]["mha"]["runs"][config["seeds"].index(row["seed"])]
        assert row["mha_val_loss"] == mha_run["val_loss"]
    memory = results["training_memory"]
    assert set(memory) == {"mha", "mla", "mla-recompute-kv"}
    assert memory["mla-recompute-kv"]["saved_activation_bytes"] < memory["mla"]["saved_activation_bytes"]


def test_parameter_matching_brings_totals_to_mha():
    config = study_preset("quick", "unused")
    widths = matched_d_ff(config)
    totals = {}
    for variant in config.variants:
        train_config = config.train_config(variant, seed=0, d_ff=widths[variant.name])
        model_config = train_config.model_preset().model(variant.kind)
        totals[variant.name] = LanguageModel(model_config, device="meta").parameter_counts()["total"]
    per_column = 3 * 192 * get_preset("small").n_layers  # one d_ff unit in every layer
    assert widths["mha"] == get_preset("small").d_ff and widths["mqa"] > widths["mha"]
    assert all(abs(total - totals["mha"]) <= per_column / 2 for total in totals.values())


def test_pareto_front():
    """(cost, loss): c is beaten by b; ties (b, e) beat neither each other; output sorted by cost."""
    points = {"d": (4.0, 3.0), "a": (1.0, 5.0), "b": (2.0, 4.0), "c": (3.0, 4.5), "e": (2.0, 4.0)}
    assert pareto_front(points) == ["a", "b", "e", "d"]
    assert pareto_front({"x": (1.0, 1.0), "y": (2.0, 2.0)}) == ["x"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeds": ()}, "StudyConfig.seeds must be distinct and non-empty"),
        ({"steps": 0}, "StudyConfig.steps must be positive, got 0"),
        (
            {"convert_target": Variant("mla", kv_lora_rank=7, qk_rope_head_dim=8)},
            "need mha and convert_target",
        ),
        ({"n_heads": 5}, r"n_heads \(5\) must be a multiple of n_kv_heads"),
    ],
)
def test_config_errors(change, message):
    config = study_preset("quick", "unused")
    with pytest.raises(ValueError, match=message):
        StudyConfig(**{**config.__dict__, **change})


def test_variant_and_preset_errors():
    with pytest.raises(ValueError, match="Variant gqa needs n_kv_heads"):
        Variant("gqa")
    with pytest.raises(ValueError, match="Variant mha takes no kv_lora_rank"):
        Variant("mha", kv_lora_rank=4)
    with pytest.raises(ValueError, match="unknown study preset 'huge'"):
        study_preset("huge", "x")


def test_an_interrupted_study_continues_where_it_stopped(tmp_path, monkeypatch):
    """A failure inside the MLA training run stops the study; the rerun keeps the finished MHA run (its
    recorded result, not a retrained one), redoes the unfinished MLA run from scratch, and finishes."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "textwrap.py").write_text(Path(textwrap.__file__).read_text())
    smoke = study_preset("smoke", str(tmp_path / "out"))
    config = replace(
        smoke,
        seeds=(0,),
        variants=(Variant("mha"), smoke.convert_target),
        data=(str(tmp_path / "corpus"),),
        cache_dir=str(tmp_path / "cache"),
        decode_contexts=(16,),
    )
    real_step = train_module._train_step

    def fail_in_mla(net, optimizer, tokens, train_config, env, step, **options):
        if train_config.attn == "mla" and step == 3:
            raise RuntimeError("injected failure")
        return real_step(net, optimizer, tokens, train_config, env, step, **options)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(train_module, "_train_step", fail_in_mla)
        with pytest.raises(RuntimeError, match="injected failure"):
            run_study(config)
        monkeypatch.setattr(train_module, "_train_step", real_step)
        journal = json.loads((tmp_path / "out" / "journal.json").read_text())
        assert list(journal["parts"]) == ["train/mha/seed-0"]
        unfinished = tmp_path / "out" / "runs" / "mla-16+8" / "seed-0"
        assert (unfinished / "log.jsonl").exists() and not (unfinished / "latest").exists()

        trained = []
        real_train = study.train
        monkeypatch.setattr(
            study, "train", lambda cfg, **kw: trained.append(cfg.out) or real_train(cfg, **kw)
        )
        said = []
        results = run_study(config, say=said.append)
    finally:
        torch.set_num_threads(threads)
    assert str(tmp_path / "out" / "runs" / "mha" / "seed-0") not in trained
    assert str(unfinished) in trained
    assert said[0] == f"continuing the study in {tmp_path / 'out'}: 1 finished parts kept"
    assert said[1].endswith("(finished before)")
    assert results["variants"]["mha"]["runs"][0] == journal["parts"]["train/mha/seed-0"]
    assert {row["method"] for row in results["conversion"]} == {"svd", "pca"}
    assert (tmp_path / "out" / "report.md").exists()

    with pytest.raises(
        ValueError, match=r"was started with other settings: steps 6 -> 7; rerun it with those"
    ):
        run_study(replace(config, steps=7))


def test_a_folder_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "report.md").write_text("mine\n")
    with pytest.raises(ValueError, match="is a non-empty directory that holds no latentattn study"):
        run_study(study_preset("smoke", str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
