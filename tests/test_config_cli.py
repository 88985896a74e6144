"""The train and study options come from their config dataclasses; their surface is frozen here, so a
change to it is a deliberate edit of this file. Oracles: the dataclasses' own fields, defaults and
docstrings; the frozen lists below."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from io import StringIO

import pytest
from rich.console import Console

from latentattn.cli import DISTILLATION, build_parser
from latentattn.config_cli import add_config_arguments, config_options, field_docs
from latentattn.progress import StepProgress
from latentattn.study import StudyConfig
from latentattn.train import TrainConfig

TRAIN_SURFACE = [
    "--out str",
    "--preset {debug,small}",
    "--attn {mha,gqa,mqa,mla}",
    "--data str+",
    "--steps int",
    "--batch-size int",
    "--context int",
    "--lr float",
    "--min-lr-ratio float",
    "--warmup int",
    "--weight-decay float",
    "--grad-accum int",
    "--grad-clip float",
    "--dtype {float32,fp32,bfloat16,bf16}",
    "--compile/--no-compile bool",
    "--seed int",
    "--eval-every int",
    "--eval-batches int",
    "--checkpoint-every int",
    "--keep int",
    "--log-every int",
    "--cache-dir str",
    "--resume flag",
    "--n-heads int",
    "--head-dim int",
    "--n-kv-heads int",
    "--kv-lora-rank int",
    "--qk-rope-head-dim/--rope-head-dim int",
    "--d-ff int",
    "--init-from str",
    "--recompute-kv/--no-recompute-kv bool",
    "--quiet flag",
]
STUDY_SURFACE = [
    "--preset {smoke,quick,full}",
    "--out str",
    "--model-preset {debug,small}",
    "--n-heads int",
    "--head-dim int",
    "--seeds int+",
    "--steps int",
    "--batch-size int",
    "--context int",
    "--lr float",
    "--warmup int",
    "--eval-batches int",
    "--match-params/--no-match-params bool",
    "--heal-steps int",
    "--heal-lr float",
    "--calibration-windows int",
    "--decode-contexts int+",
    "--decode-batch int",
    "--timing-repeats int",
    "--memory-batch int",
    "--data str+",
    "--cache-dir str",
    "--threads int",
    "--quiet flag",
]


def _verb(name: str) -> argparse.ArgumentParser:
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return verbs.choices[name]


def _surface(parser: argparse.ArgumentParser) -> list[str]:
    """Each option as `--name type`: choices in braces, `+` for one or more values."""
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.choices:
            kind = "{" + ",".join(map(str, action.choices)) + "}"
        elif action.type:
            kind = action.type.__name__
        else:
            kind = "bool" if isinstance(action, argparse.BooleanOptionalAction) else "flag"
        lines.append(f"{'/'.join(action.option_strings)} {kind}{'+' if action.nargs == '+' else ''}")
    return lines


@pytest.mark.parametrize(("verb", "surface"), [("train", TRAIN_SURFACE), ("study", STUDY_SURFACE)])
def test_the_cli_surface_is_frozen(verb, surface):
    assert _surface(_verb(verb)) == surface


def _help(verb: str) -> str:
    return " ".join(_verb(verb).format_help().split()).replace("- ", "-")  # argparse's wrapping


def test_every_train_field_is_an_option_with_its_docstring_and_default():
    help_text = _help("train")
    docs = field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in DISTILLATION:
            assert f"--{field.name.replace('_', '-')}" not in help_text
            continue
        option = "--" + field.name.replace("_", "-")
        assert option in help_text, option
        assert docs[field.name].removesuffix(".") in help_text, field.name
    assert "Peak learning rate (default 0.002)." in help_text and "(default 350)." in help_text


def test_heal_shows_its_own_defaults_and_the_distillation_options():
    help_text = _help("heal")
    assert "Peak learning rate (default 0.0001)." in help_text and "(default 100)." in help_text
    for option in ("--teacher", "--temperature", "--lm-weight", "--train {all,attention}", "--resume"):
        assert option in help_text, option
    for option in ("--preset", "--attn", "--init-from", "--kv-lora-rank"):
        assert option not in help_text, option


def test_options_not_given_stay_unset():
    """So --resume can take a run's saved settings for every option the user did not give."""
    args = _verb("train").parse_args(["--out", "x", "--steps", "5", "--data", "a", "b", "--no-compile"])
    assert config_options(args, TrainConfig) == {"out": "x", "steps": 5, "data": ("a", "b"), "compile": False}


def test_a_field_without_a_docstring_is_refused():
    @dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match=r"Undocumented.size has no docstring"):
        add_config_arguments(argparse.ArgumentParser(), Undocumented)


def test_study_fields_are_documented():
    docs = field_docs(StudyConfig)
    assert {field.name for field in dataclasses.fields(StudyConfig)} - set(docs) == {"variants"}


def test_progress_prints_a_line_per_tenth_without_a_terminal():
    """Oracle: 25 steps from step 5 cross the tenths at 8, 10, 13, ... and the last step prints."""
    stream = StringIO()
    console = Console(file=stream, force_terminal=False, width=40)
    with StepProgress(console, "train", 25, completed=5, interval=1e9) as progress:
        for step in range(6, 26):
            progress.update(step, f"loss {1 / step:.3f}")
            if step == 15:
                progress.print("step 15: val loss 1.000")
    lines = stream.getvalue().splitlines()
    counts = [line.split()[1] for line in lines if line.startswith("train ")]
    assert counts == ["8/25", "10/25", "13/25", "15/25", "18/25", "20/25", "23/25", "25/25"]
    assert "step 15: val loss 1.000" in lines
    assert lines[-1] == "train 25/25  loss 0.040"  # no time left to show once done; never wrapped


def test_older_spellings_still_parse_to_the_canonical_settings():
    """`--rope-head-dim` (the option's older name) and `--dtype bf16` (registry.DTYPES' short spelling)
    keep working; the config holds the canonical names."""
    args = _verb("train").parse_args(["--out", "x", "--rope-head-dim", "8", "--dtype", "bf16"])
    config = TrainConfig(**config_options(args, TrainConfig))
    assert (config.qk_rope_head_dim, config.dtype) == (8, "bfloat16")
