"""The fused decode and head-product kernels against the torch path, and MLA's dispatch to them.

Oracle: `latent_attention` (the torch path) over the same rows — gathered from pages, dequantized
from 8 bits — with the causal mask whose per-sequence offset is `lengths`. Tolerances: fp64 1e-10 and
fp32 1e-5, max error relative to the output's max; bf16 against the fp64 truth (inputs are exact in
bf16), each output within one bf16 rounding of itself plus one of the values it averages:
2^-8 · (|o| + max |v|), since the output is rounded to bf16 and the kernel's bf16 dot products round
the probabilities too (the torch path's bf16 GEMM error is of the same order).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SMALL_MLA
from latentattn import MLA, GQAAttention, GQAConfig, LatentCache, MLAConfig
from latentattn import attention as attention_module
from latentattn.attention import FUSED_MAX_ROWS, fused_kernel_serves, latent_attention, project
from latentattn.caches import PagedLatentCache, QuantizedLatentCache
from latentattn.kernels import build as build_module
from latentattn.kernels import fused_head_products, fused_latent_decode, kernel_status
from latentattn.metrics import relative_error
from latentattn.model import LanguageModel, get_preset

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
EIGHT_BIT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

pytestmark = pytest.mark.skipif(not kernel_status().available, reason="fused kernel unavailable here")


def oracle(q: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, scale: float, value_width: int):
    """The torch path over `rows: [B, S, W]`; query t of sequence b sees keys <= lengths[b] + t."""
    positions = lengths[:, None] + torch.arange(q.shape[1])  # [B, T]
    mask = torch.arange(rows.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    return latent_attention(q, rows, mask, scale, value_width)


def paginate(parts: dict[str, torch.Tensor], block_size: int, generator: torch.Generator):
    """Each `[B, S, ...]` tensor laid out in a pool of `block_size`-row blocks, in a random order with
    unused blocks between (a fragmented pool), and the block table `[B, ceil(S / block_size)]`."""
    batch, n_keys = next(iter(parts.values())).shape[:2]
    n_blocks = -(-n_keys // block_size)
    order = torch.randperm(2 * batch * n_blocks, generator=generator)[: batch * n_blocks]
    table = order.view(batch, n_blocks)
    pools = {}
    for name, tensor in parts.items():
        padded = torch.zeros(batch, n_blocks * block_size, *tensor.shape[2:], dtype=tensor.dtype)
        padded[:, :n_keys] = tensor
        pool = torch.zeros(2 * batch * n_blocks, block_size, *tensor.shape[2:], dtype=tensor.dtype)
        pool[table.flatten()] = padded.view(batch * n_blocks, block_size, *tensor.shape[2:])
        pools[name] = pool
    return pools, table.to(torch.int32)


@st.composite
def problems(draw, dtype: torch.dtype, storage: str):
    """A random decode or chunk step over `storage` (contiguous, paged, int8, fp8, 8-bit paged, keys and
    values apart): the kernel's arguments and the oracle's rows in the accumulation dtype."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    batch, n_tokens, heads = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 20))
    n_keys = draw(st.integers(n_tokens, 700))
    lengths = torch.tensor([draw(st.integers(0, n_keys)) for _ in range(batch)])
    if storage.startswith(tuple(EIGHT_BIT)):
        group, groups, rope = (
            draw(st.sampled_from([2, 4, 6, 32])),
            draw(st.integers(1, 3)),
            draw(st.integers(1, 8)),
        )
        latent, width = group * groups, group * groups + rope
        values = torch.randn(batch, n_keys, latent, generator=generator) * 40
        parts = {
            "kv": values.clamp(-127, 127).round().to(EIGHT_BIT[storage.split("-")[0]]),
            "scales": (torch.rand(batch, n_keys, groups, generator=generator) + 0.01)
            / 40,  # values ~ N(0, 1)
            "k_pe": torch.randn(batch, n_keys, rope, generator=generator).to(torch.bfloat16),
        }
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        scale_per_value = parts["scales"].repeat_interleave(group, dim=-1)
        rows = torch.cat([parts["kv"].to(accumulate) * scale_per_value, parts["k_pe"].to(accumulate)], -1)
    else:
        width = draw(st.integers(2, 40))
        rows = torch.randn(batch, n_keys, width, generator=generator).to(dtype)
        parts = {"kv": rows}
    q = torch.randn(batch, n_tokens, heads, width, generator=generator).to(dtype)
    args = {"q": q, "lengths": lengths, "scale": draw(st.sampled_from([0.05, 0.3])), "n_keys": n_keys}
    args["value_width"] = draw(st.integers(1, width))
    args["threads"] = draw(st.integers(1, 4))
    if storage.startswith("apart"):  # the oracle reads [values | keys] rows with queries [0 | q]
        parts["values"] = torch.randn(batch, n_keys, args["value_width"], generator=generator).to(dtype)
        rows = torch.cat([parts["values"], rows], dim=-1)
    if storage.endswith("paged"):
        parts, args["block_table"] = paginate(parts, draw(st.integers(1, 8)), generator)
    return {**args, **parts}, rows


def check_against_oracle(args: dict, rows: torch.Tensor) -> None:
    got = fused_latent_decode(**args)
    q, dtype, value_width = args["q"], args["q"].dtype, args["value_width"]
    assert got.shape == (*q.shape[:3], value_width) and got.dtype == dtype
    if "values" in args:
        q = torch.cat([q.new_zeros(*q.shape[:3], value_width), q], dim=-1)
    if dtype != torch.bfloat16:
        expected = oracle(q, rows.to(q.dtype), args["lengths"], args["scale"], value_width)
        assert relative_error(got, expected) <= TOLERANCE[dtype]
        return
    truth = oracle(q.double(), rows.double(), args["lengths"], args["scale"], value_width)
    bound = 2**-8 * (truth.abs() + rows[..., :value_width].double().abs().max())
    assert ((got.double() - truth).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", ["contiguous", "paged", "apart", "apart-paged"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_equals_the_torch_path(storage, dtype, data):
    """Ragged lengths (a sequence may see all keys), chunks of T <= 4 with the causal offset, more
    query rows than one vector holds, contexts split across 1-4 threads, fragmented block tables, and
    values stored apart from the keys (GQA/MQA caches)."""
    check_against_oracle(*data.draw(problems(dtype, storage)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", ["int8", "fp8", "fp8-paged"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_8_bit_storage_equals_dequantize_then_torch(storage, dtype, data):
    check_against_oracle(*data.draw(problems(dtype, storage)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_fp8_code_dequantizes_like_torch(dtype):
    """All 254 finite e4m3 codes (subnormals, ±0, ±448) in the c_KV columns, group scales of 128."""
    codes = torch.arange(256, dtype=torch.uint8)
    row = torch.cat([codes[(codes & 0x7F) != 0x7F], torch.zeros(2, dtype=torch.uint8)])  # no NaNs
    kv = torch.stack([row, row.flip(0), row.roll(128), row.roll(64)])[None].view(torch.float8_e4m3fn)
    scales = torch.tensor([[[0.5, 2.0], [1.0, 0.25], [3.0, 1.0], [0.125, 8.0]]])  # [1, 4 rows, 2 groups]
    k_pe = torch.randn(1, 4, 64).to(torch.bfloat16)
    rows = torch.cat([kv.float() * scales.repeat_interleave(128, dim=-1), k_pe.float()], dim=-1)
    q = (torch.randn(1, 1, 16, 320) * 0.01).to(dtype)
    args = {"q": q, "kv": kv, "lengths": torch.tensor([3]), "scale": 1.0, "value_width": 256}
    check_against_oracle({**args, "scales": scales, "k_pe": k_pe}, rows)


def test_long_context_in_deepseek_shapes_splits_threads_evenly():
    """DeepSeek's 16 heads of 576 over 3,000 keys (tiles and thread segments with remainders), fp32 1e-5
    whatever the thread count."""
    torch.manual_seed(0)
    q, kv = torch.randn(2, 1, 16, 576), torch.randn(2, 3001, 576)
    lengths = torch.tensor([3000, 1234])
    expected = oracle(q, kv, lengths, 0.07, 512)
    for threads in (1, 2, 3):
        got = fused_latent_decode(q, kv, lengths, 0.07, 512, threads=threads)
        assert relative_error(got, expected) <= 1e-5, threads


def test_bad_arguments_are_named():
    q, kv, lengths = torch.randn(1, 1, 2, 8), torch.randn(1, 5, 8), torch.tensor([4])
    cases = [
        ({"q": q.double()}, "kv must be .* in q's dtype torch.float64"),
        ({"q": q[0]}, r"q must be \[B, T, H, W\]"),
        ({"kv": kv.to("meta")}, "runs on CPU"),
        ({"kv": kv.transpose(1, 2)}, "contiguous last dimension"),
        ({"lengths": torch.tensor([-1])}, "lengths must be 1 integers >= 0"),
        ({"value_width": 9}, r"value_width must lie in \[1, 8\]"),
        ({"n_keys": 6}, r"n_keys must lie in \[1, 5\]"),
        ({"threads": 0}, r"threads must lie in \[1, 4096\]"),
        ({"threads": 2**32}, r"threads must lie in \[1, 4096\]"),
        ({"kv": kv.to(torch.int8)}, "needs 'scales'"),
        ({"block_table": torch.tensor([[0, 9]])}, "outside the pool's 1"),
        ({"block_table": torch.tensor([0])}, "block_table must be integer"),
    ]
    for change, message in cases:
        args = {"q": q, "kv": kv, "lengths": lengths, "scale": 1.0, "value_width": 4, **change}
        with pytest.raises(ValueError, match=message):
            fused_latent_decode(**args)


# Head products --------------------------------------------------------------------------------------


@st.composite
def head_product_problems(draw, dtype: torch.dtype):
    """x `[M, H, K]` and a strided weight view `[H, K, N]` (or `[H, N, K]`, transposed) inside a larger
    `[H, rows, K or N + pad]` tensor, as `w_uk`/`w_uv` lie inside `w_ukv`."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    rows, heads = draw(st.integers(1, 20)), draw(st.integers(1, 5))
    reduce, width, transposed = draw(st.integers(0, 70)), draw(st.integers(1, 150)), draw(st.booleans())
    inner, outer = (width, reduce) if transposed else (reduce, width)
    offset, pad = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    storage = torch.randn(heads, inner + offset + 2, outer + pad, generator=generator).to(dtype)
    w = storage[:, offset : offset + inner, :outer]
    x = torch.randn(rows, heads, reduce, generator=generator).to(dtype)
    bias = torch.randn(heads, width, generator=generator).to(dtype) if draw(st.booleans()) else None
    return x, w, transposed, bias, draw(st.integers(1, 4))


def head_products_oracle(x: torch.Tensor, w: torch.Tensor, transposed: bool, bias: torch.Tensor | None):
    y = torch.einsum("mhk,hnk->mhn" if transposed else "mhk,hkn->mhn", x.double(), w.double())
    return y if bias is None else y + bias.double()


@settings(max_examples=60, deadline=None)
@given(head_product_problems(torch.float64))
def test_head_products_equal_einsum_in_fp64(problem):
    """Any rows, heads, widths (tails past the vector width, K = 0), strided weights, thread counts."""
    x, w, transposed, bias, threads = problem
    got = fused_head_products(x, w, transposed=transposed, bias=bias, threads=threads)
    expected = head_products_oracle(x, w, transposed, bias)
    assert got.shape == expected.shape and got.dtype == torch.float64
    assert (got - expected).abs().max() <= 1e-12 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_head_products_in_fp32_and_bf16_stay_within_rounding(dtype, data):
    """fp32 to 1e-5 of the fp64 truth on the same values; bf16 within one bf16 rounding of the output
    (the kernel accumulates in fp32 and rounds once)."""
    x, w, transposed, bias, threads = data.draw(head_product_problems(dtype))
    got = fused_head_products(x, w, transposed=transposed, bias=bias, threads=threads)
    expected = head_products_oracle(x, w, transposed, bias)
    assert got.dtype == dtype
    scale = max(1.0, expected.abs().max().item())
    if dtype == torch.float32:
        assert (got.double() - expected).abs().max() <= 1e-5 * scale
    else:
        assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-6 * scale).all()


@pytest.mark.parametrize("transposed", [False, True])
def test_head_products_split_across_threads_equal_einsum(transposed):
    """Weights large enough for several threads (each walks a contiguous share, requesting rows ahead
    across head boundaries); shares that start and end inside a head; exact in fp64."""
    torch.manual_seed(0)
    inner, outer = (37, 301) if transposed else (301, 37)
    w = torch.randn(3, inner + 2, outer + 5, dtype=torch.float64)[:, 1 : 1 + inner, :outer]
    x = torch.randn(5, 3, 301, dtype=torch.float64)
    bias = torch.randn(3, 37, dtype=torch.float64)
    expected = head_products_oracle(x, w, transposed, bias)
    for threads in (1, 2, 3, 4):
        got = fused_head_products(x, w, transposed=transposed, bias=bias, threads=threads)
        assert (got - expected).abs().max() <= 1e-12 * expected.abs().max(), threads


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("rows", "heads", "width"), [(0, 2, 3), (2, 0, 3), (2, 2, 0)])
def test_head_products_of_empty_shapes_are_empty(rows, heads, width, transposed):
    w = torch.randn(heads, width, 5) if transposed else torch.randn(heads, 5, width)
    got = fused_head_products(torch.randn(rows, heads, 5), w, transposed=transposed, threads=2)
    assert got.shape == (rows, heads, width)


@pytest.mark.parametrize(
    ("x", "w", "kwargs", "message"),
    [
        (torch.randn(2, 3), torch.randn(3, 4, 5), {}, "x must be \\[M, H, K\\]"),
        (torch.randn(2, 3, 4), torch.randn(3, 5, 6), {}, "w must be \\[H, K, N\\]"),
        (torch.randn(2, 3, 4), torch.randn(3, 6, 5), {"transposed": True}, "w must be \\[H, N, K\\]"),
        (torch.randn(2, 3, 4), torch.randn(3, 6, 4).transpose(1, 2), {}, "contiguous last dimension"),
        (torch.randn(2, 3, 4), torch.randn(3, 4, 5).half(), {}, "fp32, bf16 or fp64"),
        (torch.randn(2, 3, 4), torch.randn(3, 4, 5), {"threads": 0}, r"threads must lie in \[1, 4096\]"),
        (torch.randn(2, 3, 4), torch.randn(3, 4, 5), {"threads": 2**32}, r"threads must lie in \[1, 4096\]"),
        (
            torch.randn(2, 3, 4),
            torch.randn(3, 4, 5),
            {"bias": torch.randn(3, 5, device="meta")},
            "bias must be .* CPU tensor",
        ),
        (torch.randn(2, 3, 4), torch.randn(3, 4, 5), {"bias": torch.randn(3, 4)}, "bias must be"),
    ],
)
def test_head_products_reject_bad_arguments(x, w, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fused_head_products(x, w, **kwargs)


@pytest.mark.parametrize("bias", [False, True])
def test_projections_of_a_few_rows_run_the_kernel_and_equal_linear(bias, monkeypatch):
    """`project` equals nn.Linear (fp64, 1e-12) and takes the kernel for up to 16 rows without
    gradients; more rows, or parameters that need a gradient, take torch's GEMM."""
    products = spy_on_kernel(monkeypatch, "fused_head_products")
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for rows in (1, 5, 16, 17):
            x = torch.randn(rows, 1, 40, dtype=torch.float64)
            assert relative_error(project(linear, x), linear(x)) <= 1e-12
    assert [shape[0] for shape in products] == [1, 5, 16]
    project(linear, torch.randn(1, 1, 40, dtype=torch.float64))
    assert len(products) == 3


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_a_model_decode_step_takes_the_kernel_for_its_mlp_and_lm_head(kind, monkeypatch):
    """A decode step's SwiGLU (gate, up, down) and LM head run on the head-product kernel, with the
    same logits as torch's linear layers (fp64, 1e-12); a prefill of more rows stays with torch."""
    products = spy_on_kernel(monkeypatch, "fused_head_products")
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model(kind), dtype=torch.float64).eval()
    config = model.config
    tokens = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        cache = model.new_cache(1, 41)
        model(tokens[:, :40], cache)
        prefill_calls = len(products)
        logits = model(tokens[:, 39:40] * 0 + 3, cache)
        step_shapes = products[prefill_calls:]
        monkeypatch.setattr(attention_module, "PRODUCT_KERNEL_ROWS", {})
        cache.truncate([40])
        expected = model(tokens[:, 39:40] * 0 + 3, cache)
    assert prefill_calls == 0
    widths = {shape[-1] for shape in step_shapes}
    assert {config.d_model, config.d_ff} <= widths  # gate/up/lm_head read d_model rows, down d_ff
    assert len(step_shapes) >= 3 * config.n_layers + 1
    assert relative_error(logits, expected) <= 1e-12


# MLA's dispatch ------------------------------------------------------------------------------------


def spy_on_kernel(monkeypatch, name: str = "fused_latent_decode") -> list[torch.Size]:
    """Record the first argument's shape of every call MLA makes to the kernel `name`."""
    calls = []
    kernel = getattr(attention_module, name)

    def spy(x, *args, **kwargs):
        calls.append(x.shape)
        return kernel(x, *args, **kwargs)

    monkeypatch.setattr(attention_module, name, spy)
    return calls


def caches(kind: str, batch: int, dtype: torch.dtype):
    if kind == "contiguous":
        return LatentCache(SMALL_MLA, batch, 64, dtype=dtype)
    if kind == "paged":
        pages = PagedLatentCache(SMALL_MLA, 64, block_size=4, dtype=dtype)
        pages.new_batch(batch)
        return pages
    return QuantizedLatentCache(SMALL_MLA, batch, 64, format=kind, group_size=8, dtype=dtype)


@pytest.mark.parametrize("kind", ["contiguous", "paged", "int8", "fp8"])
def test_mla_decode_runs_the_kernel_and_equals_the_torch_path(kind, monkeypatch):
    """Ragged prefill, then chunks and decode steps with padding (`n_new`), fp64: the layer with the
    kernel equals the same layer on the torch path to 1e-10, and the kernel ran for every cached
    absorbed step."""
    calls = spy_on_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = MLA(SMALL_MLA, dtype=torch.float64).eval()
    outputs = {}
    for fused in (True, False):
        layer.fused_kernel = fused
        cache = caches(kind, 2, torch.float64)
        torch.manual_seed(1)
        with torch.no_grad():
            steps = [layer(torch.randn(2, 9, 32, dtype=torch.float64), cache, n_new=torch.tensor([9, 5]))]
            steps.append(layer(torch.randn(2, 3, 32, dtype=torch.float64), cache, n_new=torch.tensor([2, 3])))
            steps += [
                layer(torch.randn(2, 1, 32, dtype=torch.float64), cache, mode="absorbed") for _ in range(3)
            ]
        outputs[fused] = steps
    assert len(calls) == 4  # the 3-token chunk ("auto" takes absorbed there) and three decode steps
    for got, expected in zip(outputs[True], outputs[False], strict=True):
        assert relative_error(got, expected) <= 1e-10


def test_the_torch_path_runs_where_the_kernel_does_not_serve(monkeypatch):
    calls = spy_on_kernel(monkeypatch)
    layer = MLA(SMALL_MLA, dtype=torch.float64)
    cache = LatentCache(SMALL_MLA, 1, 300, dtype=torch.float64)
    layer(torch.randn(1, 4, 32, dtype=torch.float64), cache)
    layer(torch.randn(1, 1, 32, dtype=torch.float64), cache)  # gradients needed
    with torch.no_grad():
        too_long = FUSED_MAX_ROWS // SMALL_MLA.n_heads + 1
        layer(torch.randn(1, too_long, 32, dtype=torch.float64), cache, mode="absorbed")
        layer.fused_kernel = False
        layer(torch.randn(1, 1, 32, dtype=torch.float64), cache)
        layer.fused_kernel = True
        monkeypatch.setenv("LATENTATTN_KERNEL", "0")
        layer(torch.randn(1, 1, 32, dtype=torch.float64), cache)
        assert not kernel_status().available and "LATENTATTN_KERNEL=0" in kernel_status().detail
        monkeypatch.delenv("LATENTATTN_KERNEL")
    assert calls == []
    meta = torch.empty(1, 1, 4, 20, device="meta", dtype=torch.float64)
    assert not fused_kernel_serves(meta, cache.storage())
    with torch.no_grad():
        layer(torch.randn(1, 1, 32, dtype=torch.float64), cache)
    assert len(calls) == 1


def test_a_failed_build_warns_and_leaves_the_torch_path(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension\ng++: not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built .*g\\+\\+: not found.*using the torch path"):
        reason = build_module.library.__wrapped__()
    assert reason == "build failed: RuntimeError: g++: not found"
    monkeypatch.setattr(build_module, "library", lambda: reason)
    assert kernel_status() == build_module.KernelStatus(False, reason)
    with pytest.raises(RuntimeError, match="unavailable: build failed"):
        fused_latent_decode(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 2), torch.tensor([0]), 1.0, 2)
    layer = MLA(SMALL_MLA, dtype=torch.float64).eval()
    cache = LatentCache(SMALL_MLA, 1, 8, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(1, 2, 32, dtype=torch.float64), cache, mode="absorbed")


def test_bf16_layer_decode_stays_close_to_fp64(monkeypatch):
    """A bf16 layer decoding with the kernels (decode; the head products absorbing W_UK and W_UV and
    projecting) against the same (bf16-exact) weights and inputs in fp64: bf16's 2e-2 relative L2, as
    the torch path's bf16 tests allow."""
    calls = spy_on_kernel(monkeypatch)
    products = spy_on_kernel(monkeypatch, "fused_head_products")
    config = MLAConfig(d_model=64, n_heads=16, kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=16)
    torch.manual_seed(0)
    layers = {torch.bfloat16: MLA(config, dtype=torch.bfloat16).eval()}
    layers[torch.float64] = MLA(config, dtype=torch.float64).eval()
    layers[torch.float64].load_state_dict(layers[torch.bfloat16].state_dict())
    x = torch.randn(2, 40, 64).to(torch.bfloat16)
    outputs = {}
    for dtype, layer in layers.items():
        cache = LatentCache(config, 2, 48, dtype=dtype)
        with torch.no_grad():
            layer(x[:, :39].to(dtype), cache)
            outputs[dtype] = layer(x[:, 39:].to(dtype), cache).double()
    expected = outputs[torch.float64]
    assert (outputs[torch.bfloat16] - expected).norm() / expected.norm() <= 2e-2
    # the decode steps: attention in both layers, the absorbed products (16 heads) in bf16 only, the
    # three projections (one head) in both
    absorbed = [shape for shape in products if shape[1] == 16]
    assert len(calls) == 2 and len(absorbed) == 2 and len(products) == 2 + 2 * 3


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_and_mqa_decode_run_the_kernel_and_equal_sdpa(kv_heads, monkeypatch):
    """A ragged prefill, a padded chunk and decode steps, fp64: the kernel (each K/V head one kernel
    sequence with its query heads as rows) equals SDPA to 1e-10 on the chunks; decode steps stay with
    SDPA, and MHA never takes the kernel."""
    calls = spy_on_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = GQAAttention(
        GQAConfig(d_model=32, n_heads=4, n_kv_heads=kv_heads, head_dim=8), dtype=torch.float64
    )
    outputs = {}
    for fused in (True, False):
        layer.fused_kernel = fused
        cache = layer.new_cache(2, 32)
        torch.manual_seed(1)
        with torch.no_grad():
            steps = [layer(torch.randn(2, 7, 32, dtype=torch.float64), cache, n_new=torch.tensor([7, 4]))]
            steps.append(layer(torch.randn(2, 3, 32, dtype=torch.float64), cache, n_new=torch.tensor([3, 1])))
            steps += [layer(torch.randn(2, 1, 32, dtype=torch.float64), cache) for _ in range(2)]
        outputs[fused] = steps
    assert calls == [(2 * kv_heads, t, 4 // kv_heads, 8) for t in (7, 3)]
    for got, expected in zip(outputs[True], outputs[False], strict=True):
        assert relative_error(got, expected) <= 1e-10
    calls.clear()
    mha = GQAAttention(GQAConfig(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8), dtype=torch.float64)
    cache = mha.new_cache(1, 8)
    with torch.no_grad():
        mha(torch.randn(1, 3, 32, dtype=torch.float64), cache)
        mha(torch.randn(1, 1, 32, dtype=torch.float64), cache)
    assert calls == []
