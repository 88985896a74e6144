"""The tour's decode comparison. Oracles: one full forward without a cache (fp32, 1e-5 relative), and
MLA's d_c + d_R against MHA of the same shape's 2·n_h·d_v numbers per token (`config.mha_counterpart`)."""

from __future__ import annotations

from latentattn.config import MLAConfig, mha_counterpart
from latentattn.tour import compare_decode

TINY = MLAConfig(
    d_model=64, n_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
)


def test_compare_decode_matches_the_uncached_forward_and_counts_mha_of_the_same_shape():
    absorbed, naive, mha = compare_decode(TINY, batch_size=2, prompt_len=8, new_tokens=3, repeats=1)
    assert max(run.max_rel_error for run in (absorbed, naive, mha)) <= 1e-5
    assert absorbed.cache_bytes_per_token == naive.cache_bytes_per_token == 4 * (32 + 8)
    assert mha.cache_bytes_per_token == 4 * mha_counterpart(TINY).cache_width == 4 * 2 * 2 * 16
    assert absorbed.cache_used_bytes == 2 * (8 + 3) * absorbed.cache_bytes_per_token
