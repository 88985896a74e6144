"""`latentattn eval`: losses through each cache format on a briefly trained debug model.

Oracle: the plain forward pass. A full-precision cache fed in chunks must reproduce it (fp32
tolerance); 8-bit latents must stay close and cost the bytes their layout says.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from latentattn.cli import main
from latentattn.evaluate import compare_cache_formats
from latentattn.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    (root / "text.py").write_text(Path(textwrap.__file__).read_text())
    runs = {}
    for kind in ("mla", "gqa"):
        config = TrainConfig(
            out=str(root / kind),
            preset="debug",
            attn=kind,
            data=(str(root / "text.py"),),
            cache_dir=str(root / "cache"),
            steps=30,
            batch_size=4,
            eval_every=30,
            checkpoint_every=30,
        )
        runs[kind] = train(config, quiet=True).checkpoint
    return runs


def test_full_cache_reproduces_the_forward_and_8_bit_stays_close(run):
    results = {row.format: row for row in compare_cache_formats(run["mla"], n_windows=6, chunk=8)}
    assert results["none"].bytes_per_token is None
    assert results["none"].delta_loss == 0
    assert abs(results["full"].delta_loss) < 1e-5
    assert results["full"].bytes_per_token == 2 * (32 + 8) * 4  # 2 layers of d_c + d_R in fp32
    for fmt in ("int8", "fp8"):
        assert results[fmt].bytes_per_token == 2 * (32 + 4 + 8 * 2)  # 8-bit c_KV, fp32 scale, bf16 k_pe
        assert 0 < abs(results[fmt].delta_loss) < 0.05


def test_cli_json_and_errors(run, capsys):
    assert main(["eval", str(run["mla"]), "--formats", "full", "fp8", "--windows", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["format"] for row in rows] == ["full", "fp8"]
    assert main(["eval", str(run["gqa"]), "--formats", "int8", "--windows", "2"]) == 2
    assert "8-bit latent caches need an MLA model, this one is gqa" in capsys.readouterr().err
