"""Generation through the caches: exact agreement with full recomputation, sampling rules, the CLI."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest
import torch

from latentattn import checkpoint as ckpt
from latentattn import generate as generate_module
from latentattn.calculator import PRESETS, ModelSpec
from latentattn.cli import main
from latentattn.config import MLAConfig, mha_counterpart
from latentattn.data import EOS, train_tokenizer
from latentattn.generate import (
    Generation,
    SamplingConfig,
    generate,
    run_generate,
    sample_next,
)
from latentattn.model import LanguageModel, ModelCache, get_preset
from latentattn.registry import ATTENTION_KINDS

GREEDY = SamplingConfig(temperature=0.0)


def _greedy_without_cache(model: LanguageModel, prompt: list[int], n_new: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n_new):
        logits = model(torch.tensor([tokens]))  # the whole sequence, recomputed each step
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def _context_sensitive_model(kind: str) -> LanguageModel:
    """The `debug` model in fp64 with every matrix drawn from N(0, 0.2²).

    At the GPT-2 init (0.02) attention scores are ~0, so attention is uniform and blind to RoPE positions,
    and the tied head echoes the last token: greedy decoding ignores the context. At 0.2 the scores
    q·k/√d have a std of a few units (sharp, position-dependent attention) and continuations depend on
    the prompt.
    """
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model(kind), dtype=torch.float64).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_cached_greedy_equals_recomputing_the_whole_sequence(kind, monkeypatch):
    """Oracle: greedy decoding without a cache (naive attention over all positions); fp64, exact tokens.

    The cached run prefills a ragged batch in one call and decodes (MLA: absorbed path) one token a step.
    The oracle is only as strong as the model's use of context, so the continuations must also change
    when the prompt is cut to its last token, and when the cache is overwritten with noise before every
    decode step (only the first token, from the prefill, survives).
    """
    model = _context_sensitive_model(kind)
    prompts = [[5, 17, 42, 7, 99, 3, 250], [11], [64, 8, 300, 12]]
    result = generate(model, prompts, max_new_tokens=20, sampling=GREEDY)
    with torch.no_grad():
        expected = [_greedy_without_cache(model, prompt, 20) for prompt in prompts]
    assert result.tokens == expected
    assert result.cache_tokens == sum(len(p) + 19 for p in prompts)
    assert result.cache_used_bytes == result.cache_tokens * result.cache_bytes_per_token

    last_token_only = generate(model, [p[-1:] for p in prompts], max_new_tokens=20, sampling=GREEDY)
    assert last_token_only.tokens[0] != result.tokens[0] and last_token_only.tokens[2] != result.tokens[2]

    caches = []
    new_cache = model.new_cache

    def capture_cache(batch_size: int, max_len: int, **options) -> ModelCache:
        caches.append(new_cache(batch_size, max_len, **options))
        return caches[-1]

    noise = torch.Generator().manual_seed(1)

    def overwrite_cache_with_noise(_tokens: list[int | None]) -> None:
        for layer in caches[0].layers:
            for buffer in layer.buffers.values():
                buffer.normal_(generator=noise)

    monkeypatch.setattr(model, "new_cache", capture_cache)
    corrupted = generate(
        model, prompts, max_new_tokens=20, sampling=GREEDY, on_tokens=overwrite_cache_with_noise
    )
    for tokens, clean in zip(corrupted.tokens, result.tokens, strict=True):
        assert tokens[0] == clean[0] and tokens[1:] != clean[1:]


def test_stopped_sequences_take_no_more_tokens():
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model("mla")).eval()
    first = generate(model, [[1, 2], [3]], max_new_tokens=6, sampling=GREEDY)
    eos = first.tokens[1][2]
    stopped = generate(model, [[1, 2], [3]], max_new_tokens=6, sampling=GREEDY, eos_id=eos)
    assert stopped.tokens[1] == first.tokens[1][: first.tokens[1].index(eos) + 1]
    other = first.tokens[0][1]  # several stop ids (an imported model's EOS list): any one ends a sequence
    either = generate(model, [[1, 2], [3]], max_new_tokens=6, sampling=GREEDY, eos_id=[other, eos])
    for tokens, free in zip(either.tokens, first.tokens, strict=True):
        ends = [i for i, t in enumerate(free) if t in (other, eos)]
        assert tokens == free[: ends[0] + 1]


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, GREEDY).tolist() == [1, 0]
    for sampling in (SamplingConfig(top_k=1), SamplingConfig(top_p=0.01), SamplingConfig(temperature=1e-4)):
        assert sample_next(logits, sampling, generator).tolist() == [1, 0]
    top2 = {int(sample_next(logits, SamplingConfig(top_k=2), generator)[0]) for _ in range(50)}
    assert top2 == {1, 3}
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 1.5"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite number >= 1.18e-38"):
        SamplingConfig(temperature=-1)


def test_mha_of_the_same_shape_is_one_definition():
    """Oracle: DeepSeek-V2 §2.1.1's 2·n_h·d_h per layer, d_h the per-head width (v_head_dim for MLA); the
    calculator's `mha-deepseek-v2-heads` is the counterpart of DeepSeek-V2's MLA layer."""
    preset = get_preset("small")
    assert mha_counterpart(preset.attention("mla")).cache_width == 2 * 4 * 48
    assert mha_counterpart(preset.attention("gqa")) == preset.attention("mha")
    v2 = mha_counterpart(MLAConfig(d_model=5120, n_heads=128))
    assert (
        ModelSpec.from_attention(v2, 60).elements_per_token
        == PRESETS["mha-deepseek-v2-heads"].elements_per_token
    )


@pytest.fixture
def run_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=300)
    model = LanguageModel(get_preset("debug").model("mla", vocab_size=tokenizer.get_vocab_size()))
    ckpt.save_checkpoint(tmp_path, step=1, model=model, tokenizer=tokenizer, train={}, trainer_state={})
    return tmp_path


def test_run_generate_streams_and_reports_the_cache(run_dir):
    out = io.StringIO()
    result = run_generate(run_dir, prompts=["def wrap("], max_new_tokens=12, out=out)
    text = out.getvalue()
    assert text.startswith("def wrap(") and result.new_tokens == 12
    assert "tokens/s decode" in text and "with MLA; MHA of the same shape" in text
    assert "(3.2x)" in text  # debug MLA: 32 + 8 cached vs MHA 2 x 4 heads x 16


def test_8_bit_latent_cache_via_cli(run_dir, capsys):
    """The debug MLA model (d_c 32, d_R 8, 2 layers) with int8 latents: 32 B + one fp32 scale + 8 bf16
    k_pe = 52 B per token per layer, 104 over both layers (fp32 latents: 320)."""
    args = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "5", "--latent-format", "int8"]
    assert main(args) == 0
    assert "x 104 B/token" in capsys.readouterr().out


def test_batch_of_prompts_via_cli(run_dir, capsys):
    args = ["generate", str(run_dir), "--prompt", "import", "--prompt", "class Text", "--max-new-tokens", "5"]
    assert main([*args, "--top-k", "5", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("[1] import") for line in lines)
    assert any(line.startswith("[2] class Text") for line in lines)


def test_text_streams_and_ends_at_the_end_of_text_token(run_dir, monkeypatch):
    """A scripted `generate` hands run_generate's printer fixed tokens, step by step. One prompt streams
    as plain text; a batch streams each finished line as `[i] line`, and a sequence's last line as soon
    as it emits the end-of-text token. Neither prints that token."""
    tokenizer = ckpt.load_checkpoint(run_dir).tokenizer
    eos = tokenizer.token_to_id(EOS)
    script: list[list[int]] = []
    out, seen = io.StringIO(), []  # seen: the output after each step

    def scripted_generate(model, prompts, *, on_tokens, **options) -> Generation:
        for step in range(max(map(len, script))):
            on_tokens([ids[step] if step < len(ids) else None for ids in script])
            seen.append(out.getvalue())
        return Generation(script, 0, 0.0, 1.0, cache_tokens=0, cache_used_bytes=0, cache_bytes_per_token=0)

    monkeypatch.setattr(generate_module, "generate", scripted_generate)
    script[:] = [[*tokenizer.encode("x = 1").ids, eos]]
    run_generate(run_dir, prompts=["a"], max_new_tokens=20, out=out)
    assert seen[-2] == seen[-1] == "ax = 1" and out.getvalue().startswith("ax = 1\n\n")

    out, seen[:] = io.StringIO(), []
    script[:] = [[*tokenizer.encode("x = 1\ny = 2").ids, eos], tokenizer.encode(" = 3\nz = 4\nzz = 5\nw").ids]
    run_generate(run_dir, prompts=["a", "b"], max_new_tokens=20, out=out)
    stopped = seen[len(script[0]) - 1]  # after sequence 1's end-of-text token, before sequence 2 ends
    assert "[1] ax = 1\n" in stopped and "[1] y = 2\n" in stopped and "[2] w" not in stopped
    text = out.getvalue().split("\n\n")[0]
    for i, lines in enumerate([["ax = 1", "y = 2"], ["b = 3", "z = 4", "zz = 5", "w"]], start=1):
        assert [line[4:] for line in text.splitlines() if line.startswith(f"[{i}] ")] == lines
    assert EOS not in out.getvalue()


def test_prompt_longer_than_the_context(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "x = 1\n" * 100]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 has" in err and "the model's context is 64" in err and err.count("\n") == 1


def test_generation_stops_at_the_context_and_says_so(run_dir, capsys):
    result = run_generate(run_dir, prompts=["def"], max_new_tokens=500, out=io.StringIO())
    prompt_tokens = result.prefill_tokens
    assert prompt_tokens + result.new_tokens == 64
    assert f"generating {64 - prompt_tokens} new tokens, not 500" in capsys.readouterr().err
