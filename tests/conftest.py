"""Shared strategies and helpers for the test suite."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from latentattn import GQAConfig, MLAConfig, RopeConfig, YarnConfig

SMALL_MLA = MLAConfig(
    d_model=32,
    n_heads=4,
    kv_lora_rank=16,
    q_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
"""A small MLA layer with every part present (q-LoRA included) for exact fp64 comparisons."""


yarn_configs = st.one_of(
    st.none(),
    st.builds(
        YarnConfig,
        factor=st.sampled_from([2.0, 8.0, 40.0]),
        original_max_position_embeddings=st.sampled_from([8, 64]),
        mscale=st.sampled_from([0.707, 1.0]),
        mscale_all_dim=st.sampled_from([0.0, 0.707, 1.0]),
    ),
)
rope_configs = st.builds(
    RopeConfig, theta=st.sampled_from([10000.0, 500.0]), interleave=st.booleans(), yarn=yarn_configs
)
mla_configs = st.builds(
    MLAConfig,
    d_model=st.integers(4, 40),
    n_heads=st.integers(1, 4),
    kv_lora_rank=st.integers(2, 24),
    q_lora_rank=st.one_of(st.none(), st.integers(2, 16)),
    qk_nope_head_dim=st.integers(1, 12),
    qk_rope_head_dim=st.sampled_from([2, 4, 8]),
    v_head_dim=st.integers(1, 12),
    rope=rope_configs,
)


@st.composite
def gqa_configs(draw) -> GQAConfig:
    n_kv_heads = draw(st.integers(1, 3))
    return GQAConfig(
        d_model=draw(st.integers(4, 40)),
        n_heads=n_kv_heads * draw(st.integers(1, 3)),
        n_kv_heads=n_kv_heads,
        head_dim=draw(st.sampled_from([2, 4, 8, 12])),
        rope=draw(rope_configs),
    )


attention_configs = st.one_of(mla_configs, gqa_configs())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A training corpus folder holding one file (textwrap's source: ~9K tokens for the debug preset);
    its tokenizer cache can live next to it, in `corpus.parent / "cache"`."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "textwrap.py").write_text(Path(textwrap.__file__).read_text())
    return folder


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory) -> Path:
    """A run directory holding one checkpoint of the `debug` MLA model (random weights, context 64) with a
    300-token tokenizer trained on textwrap's source: what the serving tests serve."""
    from latentattn import checkpoint
    from latentattn.data import train_tokenizer
    from latentattn.model import LanguageModel, get_preset

    torch.manual_seed(0)
    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=300)
    model = LanguageModel(get_preset("debug").model("mla", vocab_size=tokenizer.get_vocab_size()))
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint.save_checkpoint(run_dir, step=1, model=model, tokenizer=tokenizer, train={}, trainer_state={})
    return run_dir
