"""MLA (naive | absorbed) and the MHA/GQA/MQA family behind one call signature.

    layer(x, cache=None, *, n_new=None, mode="auto", step=None) -> y

x, y: [B, T, d]. Without a cache the T tokens sit at positions 0..T-1 under a causal mask (training,
a fresh prompt). With a cache, sequence b's tokens sit at `cache.lengths[b] + t`, are appended to the
cache, and attend to everything cached before them (decode, chunked prefill, ragged batches);
`n_new[b]` marks how many of the T tokens of sequence b are real (right padding after them). A layer
with its own cache plans and closes its step itself; the layers of a model get the `step` their model
cache planned once for all of them (positions, mask, write slots: `latentattn.caches.Step`).

Notation: B batch, T new tokens, S keys (cached + new), H heads, C kv_lora_rank (d_c),
R qk_rope_head_dim (d_h^R), N qk_nope_head_dim (d_h), V v_head_dim, G kv heads, D head_dim.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latentattn.caches import (
    AttentionCache,
    ContiguousKeys,
    ContiguousSequences,
    KVCache,
    KVRows,
    LatentCache,
    LatentKeys,
    Step,
    Storage,
    Workspace,
)
from latentattn.caches.quantized import latent_encoding
from latentattn.config import AttentionConfig, GQAConfig, MLAConfig
from latentattn.kernels import fused_head_products, fused_latent_decode, kernel_status
from latentattn.layers import RMSNorm, fp32_or_wider
from latentattn.registry import ATTENTION_KINDS, resolve
from latentattn.rope import RotaryEmbedding

Mode = Literal["auto", "naive", "absorbed"]
MODES: tuple[Mode, ...] = ("auto", "naive", "absorbed")
CACHE_NAMES = {
    "latent": "a latent cache (LatentCache, QuantizedLatentCache, PagedLatentCache, a model's MLA layer)",
    "kv": "a K/V cache (KVCache or a K/V layer of a model cache)",
}
"""What each attention family reads, for error messages."""


def mla_path_flops(config: MLAConfig, n_queries: int, n_keys: int) -> dict[str, int]:
    """Multiply-add FLOPs of each MLA path for T queries over S keys (per layer, projections excluded).

    naive:    2·H·(N + R + V) per query·key pair, plus decompressing every key: 2·C·H·(N + V) per key.
    absorbed: 2·H·(2C + R) per pair, plus folding W_UK into each query and W_UV into each output:
              2·C·H·(N + V) per query.
    """
    h, c, r = config.n_heads, config.kv_lora_rank, config.qk_rope_head_dim
    n, v = config.qk_nope_head_dim, config.v_head_dim
    pairs = n_queries * n_keys
    fold = 2 * c * h * (n + v)
    return {
        "naive": 2 * h * (n + r + v) * pairs + fold * n_keys,
        "absorbed": 2 * h * (2 * c + r) * pairs + fold * n_queries,
    }


def check_mode(mode: object, modes: tuple[Mode, ...] = MODES, name: str = "MLA") -> None:
    """Raise a ValueError naming `mode` unless it is one of `modes`."""
    if mode not in modes:
        raise ValueError(f"{name}: unknown attention mode {mode!r}; choose one of {', '.join(modes)}")


def choose_mla_path(config: MLAConfig, mode: Mode, n_queries: int, n_keys: int, cached: bool) -> str:
    """The path `mode` asks for; `auto` takes naive without a cache, else whichever costs fewer FLOPs.

    Decode (T = 1 over a long prefix) and short chunks go absorbed; fresh prompts go naive. The
    crossover is near T ≈ 170 new tokens for DeepSeek-V2/V3's shapes over a long prefix.
    """
    check_mode(mode)
    if mode != "auto":
        return mode
    if not cached:
        return "naive"
    flops = mla_path_flops(config, n_queries, n_keys)
    return "absorbed" if flops["absorbed"] < flops["naive"] else "naive"


def _check_input(
    x: Tensor,
    weight: Tensor,
    cache: AttentionCache | None,
    n_new: Tensor | None,
    step: Step | None,
    *,
    d_model: int,
    family: str,
    name: str,
) -> None:
    """Raise a ValueError naming the problem unless `x` is `[B, T > 0, d]` on the layer's device, in its
    dtype (any float dtype under autocast), and `cache` serves `family`, lives on the same device and
    holds B sequences (`step`, when given, for B × T tokens)."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name} expects x of shape [batch, tokens, d_model={d_model}], got {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        empty = "a batch of zero sequences" if x.shape[0] == 0 else "zero tokens"
        raise ValueError(f"{name} got {empty} (x has shape {tuple(x.shape)})")
    if x.device != weight.device:
        raise ValueError(f"{name}: x is on {x.device} but the layer's weights are on {weight.device}")
    if x.dtype != weight.dtype and not (
        x.dtype.is_floating_point and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    ):
        raise ValueError(f"{name}: x is {x.dtype} but the layer's weights are {weight.dtype}")
    if cache is None:
        if n_new is not None or step is not None:
            given = "n_new (right padding per sequence)" if n_new is not None else "a step"
            raise ValueError(f"{given} needs a cache; without one the mask is causal")
        return
    if getattr(cache, "family", None) != family:
        raise ValueError(f"{name} needs {CACHE_NAMES[family]}, got {type(cache).__name__}")
    if cache.device != weight.device:
        raise ValueError(
            f"{name}: the cache is on {cache.device} but the layer's weights are on {weight.device}"
        )
    if cache.batch_size != x.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} sequences but the cache holds {cache.batch_size}")
    if step is not None and tuple(step.positions.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"the step plans {tuple(step.positions.shape)} tokens but x holds {tuple(x.shape[:2])}"
        )


def _positions(x: Tensor, step: Step | None) -> Tensor:
    """Token positions `[B, T]`: the step's, else 0..T-1."""
    if step is not None:
        return step.positions
    return torch.arange(x.shape[1], device=x.device).expand(*x.shape[:2])


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """`[1, T, S]` causal mask aligned so the last query sees all keys (query t sees keys <= S - T + t)."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)[None]


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, enable_gqa: bool = False
) -> Tensor:
    """SDPA over q `[B, H, T, *]`, k/v `[B, G, S, *]`; mask `[B, T, S]`, or None: the aligned causal one."""
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    is_causal = mask is None and n_queries == n_keys
    if mask is None and 1 < n_queries < n_keys:
        mask = causal_mask(n_queries, n_keys, q.device)
    attn_mask = None if mask is None else mask[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


SCORE_BLOCK_ELEMENTS = 2**22
"""Upper bound on the scores `[B, s, T·H]` of one key block (16 MiB in fp32). Decode at batch 1 with 16
heads reads up to 262K keys of a contiguous cache as one block: one plain softmax, which beat blocks of
2K-8K keys kept in cache between the two GEMMs on CPU (README, decode benchmark)."""
MIN_KEY_BLOCK = 64
"""Keys per block at least, however many query rows a long chunk brings."""


def absorbed_gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype `MLA` runs the absorbed path's GEMMs in: fp32 (or wider) on every CPU, since bf16/fp16
    GEMMs ran slower than fp32 on this project's AVX2 machine (no native bf16 units; README, decode
    benchmark; CPUs with AMX may differ, unmeasured); the input dtype elsewhere. bf16 products are
    exact in fp32, so this changes only the summation order and rounding."""
    return fp32_or_wider(dtype) if device.type == "cpu" else dtype


def latent_attention(
    q: Tensor,
    kv: Tensor | LatentKeys,
    mask: Tensor | None,
    scale: float,
    value_width: int,
    *,
    gemm_dtype: torch.dtype | None = None,
    max_rows: int | None = None,
) -> Tensor:
    """`softmax(q · kvᵀ · scale) · kv[..., :value_width]`: attention with one shared key/value "head".

    q: [B, T, H, W]; kv: [B, S, W] (W = C + R, the value is the first C columns); mask: [B, T, S]
    or None (aligned causal) → [B, T, H, value_width].

    Key-major, so both GEMMs read the cache where it lies: scores are the tall product `keys · qᵀ`
    ([s, W]·[W, T·H], one column per query row), the softmax reduces over keys (dim 1) and the output
    is `valuesᵀ · probs` ([C, s]·[s, T·H]). Keys that fit in one block (at most `max_rows`, default: as
    many as keep the scores under `SCORE_BLOCK_ELEMENTS`; fewer for caches that gather or dequantize,
    see `LatentKeys.iter_blocks`) take one softmax; more go block by block with an online softmax
    whose running max carries no gradient (the softmax does not depend on the shift). The GEMMs run in
    `gemm_dtype` (default: q's; the caller chooses, e.g. `absorbed_gemm_dtype`); scale, softmax and
    accumulation in fp32 (fp64 for fp64 inputs).
    """
    keys = kv if isinstance(kv, LatentKeys) else ContiguousKeys.of(kv)
    batch, n_tokens, heads, width = q.shape
    n_rows, n_keys = n_tokens * heads, keys.shape[1]
    if mask is None and n_tokens > 1:
        mask = causal_mask(n_tokens, n_keys, q.device)
    acc, gemm = fp32_or_wider(q.dtype), gemm_dtype or q.dtype
    rows_t = q.reshape(batch, n_rows, width).transpose(1, 2).to(gemm)  # [B, W, T·H]

    def scores_of(block: Tensor, start: int) -> Tensor:
        """Scaled scores `[B, s, T·H]` of the keys `block: [B, s, W]` from key `start` on; masked: -inf."""
        scores = torch.matmul(block, rows_t).to(acc).mul_(scale)
        if mask is not None:
            keep = mask[:, :, start : start + block.shape[1]].transpose(1, 2)  # [B, s, T]
            scores.view(batch, -1, n_tokens, heads).masked_fill_(~keep[..., None], float("-inf"))
        return scores

    def weighted_values(block: Tensor, probs: Tensor) -> Tensor:
        """`valuesᵀ · probs`: [B, C, s]·[B, s, T·H] → [B, C, T·H]."""
        return torch.matmul(block[..., :value_width].transpose(1, 2), probs.to(gemm)).to(acc)

    max_rows = max_rows or max(MIN_KEY_BLOCK, SCORE_BLOCK_ELEMENTS // (batch * n_rows))
    blocks = keys.iter_blocks(max_rows=max_rows, dtype=gemm)
    first = next(blocks)  # [B, s, W]
    if first.shape[1] == n_keys:  # every query row sees key 0, so no row is fully masked
        out = weighted_values(first, torch.softmax(scores_of(first, 0), dim=1))  # [B, C, T·H]
    else:
        running_max = torch.full((batch, 1, n_rows), float("-inf"), dtype=acc, device=q.device)
        denominator = torch.zeros(batch, 1, n_rows, dtype=acc, device=q.device)
        out = torch.zeros(batch, value_width, n_rows, dtype=acc, device=q.device)
        start = 0
        for block in itertools.chain([first], blocks):
            scores = scores_of(block, start)
            new_max = torch.maximum(running_max, scores.detach().max(dim=1, keepdim=True).values)
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows with no key yet stay at 0
            probs = scores.sub_(shift).exp_()
            correction = running_max.sub_(shift).exp_()
            denominator.mul_(correction).add_(probs.sum(dim=1, keepdim=True))
            out.mul_(correction).add_(weighted_values(block, probs))
            running_max, start = new_max, start + block.shape[1]
        out = out / denominator
    return out.transpose(1, 2).reshape(batch, n_tokens, heads, value_width).to(q.dtype)


FUSED_MAX_ROWS = 1024
"""Most query rows (T·H per sequence) the fused kernel serves: each thread keeps a partial output of
rows · C values (chunks of 64 tokens with 16 heads still measured faster than the torch path)."""


def fused_kernel_serves(q: Tensor, storage: Storage) -> bool:
    """Whether the fused CPU kernel (`latentattn.kernels`) runs for a layer's queries like
    `q: [B, T, H, W]` over a cache laid out as `storage` (`LatentKeys.storage()`, `KVRows.storage()`
    or a cache's `storage()`): latent rows (full precision or 8-bit, contiguous or paged), or
    contiguous K/V with fewer K/V heads G than query heads (GQA/MQA) for chunks of T >= 2 tokens, on
    CPU; fp32/bf16/fp64 queries and storage that need no gradient; at most `FUSED_MAX_ROWS` query rows
    per kernel sequence (T·H, or T·H/G per K/V head); outside `torch.compile`; and the kernel built
    here (not disabled by LATENTATTN_KERNEL=0). GQA/MQA decode (T = 1) and MHA stay with SDPA: its
    folded-query decode measured about as fast as the kernel, and MHA gives each K/V head one query
    row, a sliver of the kernel's vector lanes."""
    rows = q.shape[1] * q.shape[2]
    if "k" in storage.entries:
        groups = storage.entries["k"].shape[2]
        if storage.block_table is not None or groups == q.shape[2] or q.shape[1] == 1:
            return False
        rows //= groups
    tensors = [q, *storage.entries.values()]
    return (
        q.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and rows <= FUSED_MAX_ROWS
        and _cpu_kernels_may_run(tensors)
    )


def _cpu_kernels_may_run(tensors: list[Tensor]) -> bool:
    """What every CPU kernel needs: not being traced by `torch.compile` (a ctypes call dynamo cannot
    trace: compiled graphs keep torch), all `tensors` on CPU, no gradient needed through them, and the
    kernels built here."""
    return (
        not torch.compiler.is_compiling()
        and all(tensor.device.type == "cpu" for tensor in tensors)
        and not (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors))
        and kernel_status().available
    )


PRODUCT_KERNEL_ROWS = {
    ("absorb", torch.bfloat16): 8,
    ("linear", torch.float32): 16,
    ("linear", torch.float64): 16,
    ("linear", torch.bfloat16): 2,
}
"""Most rows (B·T) for which the head-product kernel (`kernels.fused_head_products`) serves each kind
of product and weight dtype; where a pair is missing, torch runs. Chosen by measurement on this
project's machine (README, decode speed): the kernel reads the weights at the memory's pace from
several threads where torch's fp32 GEMV does not, and reads the strided bf16 absorbed weights in place
where torch's batched GEMMs copy them; torch's bf16 GEMM wins from a few rows on, and its fp32
batched GEMMs over the absorbed weights are as fast."""


def head_products_serve(x: Tensor, w: Tensor, kind: str, rows: int) -> bool:
    """Whether the head-product CPU kernel runs for `x` with `rows` rows (B·T) and the weights `w` in a
    product of `kind` ("absorb": `MLA.absorb_query/absorb_output`; "linear": `project`): on CPU,
    outside `torch.compile`, with no gradient needed, the kernel built here, and at most
    `PRODUCT_KERNEL_ROWS[kind, dtype]` rows."""
    return (
        x.dtype == w.dtype
        and rows <= PRODUCT_KERNEL_ROWS.get((kind, w.dtype), 0)
        and _cpu_kernels_may_run([x, w])
    )


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for `x: [..., in]`, `weight: [out, in]`; by the head-product CPU
    kernel (one head) for the few rows of a decode step where it serves (`head_products_serve`)."""
    if not _linear_kernel_serves(x, weight):
        return F.linear(x, weight, bias)
    return _kernel_linear(x, weight, bias)


def project(linear: nn.Linear, x: Tensor, fused: bool = True) -> Tensor:
    """`linear(x)` for `x: [..., in]`; by the head-product kernel for the few rows of a decode step
    where it serves and `fused` is on (as `linear_rows`). Otherwise the module runs, with its hooks."""
    if fused and _linear_kernel_serves(x, linear.weight):
        return _kernel_linear(x, linear.weight, linear.bias)
    return linear(x)


def _linear_kernel_serves(x: Tensor, weight: Tensor) -> bool:
    return head_products_serve(x, weight, "linear", x.numel() // max(x.shape[-1], 1))


def _kernel_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    bias = None if bias is None else bias[None]
    y = fused_head_products(x.reshape(-1, 1, x.shape[-1]), weight[None], transposed=True, bias=bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def fused_latent_attention(
    q: Tensor, keys: LatentKeys, lengths: Tensor, scale: float, value_width: int
) -> Tensor | None:
    """`latent_attention` by the fused CPU kernel straight from the keys' storage, or None where the
    torch path must run (`fused_kernel_serves`).

    The one place that maps the caches' `Storage` to the kernel's raw arguments: q `[B, T, H, C + R]`,
    `lengths` each sequence's cached tokens before this step (`Step.lengths`); query t of sequence b
    sees keys `< lengths[b] + t + 1` of the S the keys hold — the mask the caches return.
    """
    storage = keys.storage()
    if not fused_kernel_serves(q, storage):
        return None
    entries = storage.entries
    if "latent" in entries:
        parts = {"kv": entries["latent"]}
    else:
        parts = {"kv": entries["c_kv"], "scales": entries["scale"], "k_pe": entries["k_pe"]}
    return fused_latent_decode(
        q,
        lengths=lengths,
        scale=scale,
        value_width=value_width,
        n_keys=keys.shape[1],
        block_table=storage.block_table,
        **parts,
    )


def fused_grouped_attention(q: Tensor, rows: KVRows, lengths: Tensor, scale: float) -> Tensor | None:
    """GQA/MQA attention `[B, T, H, D]` by the fused CPU kernel straight from contiguous K/V rows, or None
    where SDPA must run (see `fused_kernel_serves`). Each K/V head is one kernel sequence whose query
    rows are its H/G query heads; head-major buffers `[B, G, L, D]` are read in place as `[B·G, L, D]`.
    """
    storage = rows.storage()
    if not fused_kernel_serves(q, storage):
        return None
    batch, _, heads, head_dim = q.shape
    groups = storage.entries["k"].shape[2]
    grouped = q.unflatten(2, (groups, heads // groups)).transpose(1, 2).flatten(0, 1)  # [B·G, T, H/G, D]
    keys, values = (storage.entries[name].transpose(1, 2).flatten(0, 1) for name in ("k", "v"))  # [B·G, S, D]
    o = fused_latent_decode(
        grouped, keys, lengths.repeat_interleave(groups), scale, head_dim, values=values, n_keys=rows.shape[1]
    )
    return o.unflatten(0, (batch, groups)).transpose(1, 2).flatten(2, 3)  # [B, T, H, D]


class MLA(nn.Module):
    """Multi-head Latent Attention, DeepSeek-V2/V3 numerics.

    Weights, named after the paper (HF names in `latentattn.hf`); `config.bias` adds biases to w_q/w_uq,
    w_dkv and w_o:
        w_q  [H·(N+R), d]            W_Q, when q_lora_rank is None; else
        w_dq [d'_c, d], q_norm, w_uq [H·(N+R), d'_c]   W_DQ, RMSNorm on c_Q, W_UQ
        w_dkv [C + R, d]             W_DKV stacked with W_KR (the decoupled RoPE key, shared by all heads)
        kv_norm                      RMSNorm on c_KV only
        w_ukv [H·(N+V), C]           W_UK and W_UV, per head laid out as [k_nope | v]
        w_o  [d, H·V]                W_O
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        recompute_kv: bool = False,
        fused_kernel: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = c = config
        self.recompute_kv = recompute_kv
        """Training: keep only the latent for backward and recompute per-head K/V (naive path)."""
        self.fused_kernel = fused_kernel
        """Use the CPU kernels where they serve: decode over a cache (`fused_kernel_serves`), the
        projections and absorbed products of a few rows (`head_products_serve`)."""
        factory = {"device": device, "dtype": dtype, "bias": False}
        biased = {**factory, "bias": c.bias}
        q_width = c.n_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.w_q = nn.Linear(c.d_model, q_width, **biased)
        else:
            self.w_dq = nn.Linear(c.d_model, c.q_lora_rank, **factory)
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps, device=device, dtype=dtype)
            self.w_uq = nn.Linear(c.q_lora_rank, q_width, **biased)
        self.w_dkv = nn.Linear(c.d_model, c.cache_width, **biased)
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps, device=device, dtype=dtype)
        self.w_ukv = nn.Linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), **factory)
        self.w_o = nn.Linear(c.n_heads * c.v_head_dim, c.d_model, **biased)
        self.rope = RotaryEmbedding(c.qk_rope_head_dim, c.rope)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        latent_format: str | None = None,
        static: bool = False,
        workspace: Workspace | None = None,
        sequences: ContiguousSequences | None = None,
    ) -> LatentCache:
        """An empty latent cache on this layer's device, in its dtype; `latent_format` (a name in
        `registry.LATENT_FORMATS`: "int8", "fp8") stores it in that layout instead. A model's layers
        share `sequences` and the `workspace` copied blocks are built in; `static`: see
        `ContiguousSequences`."""
        weight = self.w_dkv.weight
        encoding = latent_encoding(self.config, weight.dtype, latent_format)
        shared = {"static": static, "sequences": sequences, "workspace": workspace}
        return LatentCache(
            self.config,
            batch_size,
            max_len,
            encoding=encoding,
            device=weight.device,
            dtype=weight.dtype,
            **shared,
        )

    def check_mode(self, mode: str) -> None:
        """Raise a ValueError unless this layer has execution path `mode`."""
        check_mode(mode, MODES, "MLA")

    def forward(
        self,
        x: Tensor,
        cache: AttentionCache | None = None,
        *,
        n_new: Tensor | None = None,
        mode: Mode = "auto",
        step: Step | None = None,
    ) -> Tensor:
        """x: [B, T, d] → [B, T, d]; see the module docstring for the cache protocol."""
        self.check_mode(mode)
        _check_input(
            x, self.w_o.weight, cache, n_new, step, d_model=self.config.d_model, family="latent", name="MLA"
        )
        if cache is not None and step is None:
            with cache.stepping(x.shape[1], n_new) as step:
                return self._forward(x, cache, step, mode)
        return self._forward(x, cache, step, mode)

    def _forward(self, x: Tensor, cache: AttentionCache | None, step: Step | None, mode: Mode) -> Tensor:
        positions, memo = _positions(x, step), None if step is None else step.memo
        q_nope, q_pe = self.queries(x, positions, memo)
        latent = self.latent(x, positions, memo)
        keys, mask = (ContiguousKeys.of(latent), None) if cache is None else cache.update(latent, step=step)
        lengths = None if step is None else step.lengths  # before this step's tokens
        path = choose_mla_path(self.config, mode, x.shape[1], keys.shape[1], cached=cache is not None)
        if path == "absorbed":
            o = self.attend_absorbed(q_nope, q_pe, keys, mask, lengths=lengths)  # [B, T, H, V]
        elif self.recompute_kv and torch.is_grad_enabled():
            o = checkpoint(self.attend_naive, q_nope, q_pe, keys.full(), mask, use_reentrant=False)
        else:
            o = self.attend_naive(q_nope, q_pe, keys.full(), mask)
        return project(self.w_o, o.flatten(2), self.fused_kernel)

    def queries(self, x: Tensor, positions: Tensor, memo: dict | None = None) -> tuple[Tensor, Tensor]:
        """`q_nope: [B, T, H, N]` and RoPE'd `q_pe: [B, T, H, R]` (`memo`: the step's, for RoPE)."""
        c = self.config
        fused = self.fused_kernel
        if c.q_lora_rank is None:
            q = project(self.w_q, x, fused)
        else:
            q = project(self.w_uq, self.q_norm(project(self.w_dq, x, fused)), fused)
        q = q.view(*x.shape[:2], c.n_heads, c.qk_head_dim)  # [B, T, H, N + R]
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, self.rope(q_pe, positions, memo)

    def latent(self, x: Tensor, positions: Tensor, memo: dict | None = None) -> Tensor:
        """What the cache stores: `[RMSNorm(c_KV) | RoPE(k_pe)]`, shape [B, T, C + R]."""
        latent = project(self.w_dkv, x, self.fused_kernel)
        c_kv, k_pe = latent.split([self.config.kv_lora_rank, self.config.qk_rope_head_dim], dim=-1)
        k_pe = self.rope(k_pe[:, :, None, :], positions, memo)[:, :, 0, :]  # one RoPE key for all heads
        return torch.cat([self.kv_norm(c_kv), k_pe], dim=-1)

    def attend_naive(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        """Decompress per-head K/V from the latent `kv: [B, S, C + R]` and run SDPA → [B, T, H, V]."""
        c = self.config
        batch, n_keys = kv.shape[:2]
        c_kv, k_pe = kv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv_up = self.w_ukv(c_kv).view(batch, n_keys, c.n_heads, -1)  # [B, S, H, N + V]
        k_nope, v = kv_up.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None, :].expand(-1, -1, c.n_heads, -1)  # [B, S, H, R]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, N + R]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # [B, H, S, N + R]
        o = _sdpa(q, k, v.transpose(1, 2), mask, c.softmax_scale)  # [B, H, T, V]
        return o.transpose(1, 2)  # [B, T, H, V]

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """`W_UK: [H, N, C]` and `W_UV: [H, V, C]`, views of `w_ukv`."""
        c = self.config
        w_ukv = self.w_ukv.weight.view(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w_ukv.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        return w_uk, w_uv

    def attend_absorbed(
        self,
        q_nope: Tensor,
        q_pe: Tensor,
        kv: Tensor | LatentKeys,
        mask: Tensor | None,
        *,
        lengths: Tensor | None = None,
    ) -> Tensor:
        """Attend in latent space: MQA with one (C + R)-wide key per token whose value is c_KV.

        `q_lat = q_nope · W_UK` per head; scores are `[q_lat | q_pe] · [c_KV | k_pe]` for all T·H query
        rows at once against the cache rows (`latent_attention`, blocked for paged and 8-bit caches, its
        GEMMs in `absorbed_gemm_dtype`; or the fused CPU kernel reading the keys' storage, given each
        sequence's cached `lengths` before this step); `o = (softmax · c_KV) · W_UV` per head.
        `attend_absorbed_paper` is the same computation written as the paper does.
        """
        c = self.config
        w_uk, w_uv = self.absorbed_weights()
        q = torch.cat([self.absorb_query(q_nope, w_uk), q_pe], dim=-1)  # [B, T, H, C + R]
        o_lat = None
        if self.fused_kernel and lengths is not None and isinstance(kv, LatentKeys):
            o_lat = fused_latent_attention(q, kv, lengths, c.softmax_scale, c.kv_lora_rank)
        if o_lat is None:
            gemm = absorbed_gemm_dtype(q.dtype, q.device)
            o_lat = latent_attention(q, kv, mask, c.softmax_scale, c.kv_lora_rank, gemm_dtype=gemm)
        return self.absorb_output(o_lat, w_uv)

    def absorb_query(self, q_nope: Tensor, w_uk: Tensor) -> Tensor:
        """`q_lat = q_nope · W_UK` per head: `[B, T, H, N]`, `[H, N, C]` → `[B, T, H, C]`; by the
        head-product CPU kernel for a few rows (`head_products_serve`, with `fused_kernel` on)."""
        if self.fused_kernel and head_products_serve(q_nope, w_uk, "absorb", q_nope.shape[:2].numel()):
            return fused_head_products(q_nope.flatten(0, 1), w_uk).unflatten(0, q_nope.shape[:2])
        return torch.einsum("bthn,hnc->bthc", q_nope, w_uk)

    def absorb_output(self, o_lat: Tensor, w_uv: Tensor) -> Tensor:
        """`o = o_lat · W_UVᵀ` per head: `[B, T, H, C]`, `[H, V, C]` → `[B, T, H, V]`; by the
        head-product CPU kernel for a few rows, else as `W_UV · o_latᵀ`, which reads W_UV where it lies
        (an einsum copies the strided view transposed every step, slowly in bf16)."""
        if self.fused_kernel and head_products_serve(o_lat, w_uv, "absorb", o_lat.shape[:2].numel()):
            o = fused_head_products(o_lat.flatten(0, 1), w_uv, transposed=True)
            return o.unflatten(0, o_lat.shape[:2])
        o = torch.matmul(w_uv, o_lat.flatten(0, 1).permute(1, 2, 0))  # [H, V, B·T]
        return o.permute(2, 0, 1).unflatten(0, o_lat.shape[:2])  # [B, T, H, V]

    def attend_absorbed_paper(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        """The absorbed path as the paper writes it, one einsum per product over the cached rows
        `kv: [B, S, C + R] = [c_KV | k_pe]` (as DeepSeek-V3's `inference/model.py` does); mask `[B, T, S]`
        or None (aligned causal) → [B, T, H, V]. The readable oracle of `attend_absorbed`."""
        c = self.config
        w_uk, w_uv = self.absorbed_weights()  # [H, N, C], [H, V, C]
        c_kv, k_pe = kv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)  # [B, S, C], [B, S, R]
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # W_UK absorbed into the query
        scores = torch.einsum("bthc,bsc->bths", q_lat, c_kv) + torch.einsum("bthr,bsr->bths", q_pe, k_pe)
        keep = causal_mask(q_nope.shape[1], kv.shape[1], kv.device) if mask is None else mask  # [B, T, S]
        scores = (scores * c.softmax_scale).masked_fill(~keep[:, :, None, :], float("-inf"))
        o_lat = torch.einsum("bths,bsc->bthc", scores.softmax(dim=-1), c_kv)  # values are c_KV
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # W_UV absorbed into the output


class GQAAttention(nn.Module):
    """Grouped-query attention with RoPE: MHA (G = H), GQA (1 < G < H) or MQA (G = 1).

    Weights: w_q [H·D, d], w_k [G·D, d], w_v [G·D, d] (each with a bias when `qkv_bias`), w_o [d, H·D].
    The cache holds RoPE'd K and V.
    """

    def __init__(
        self,
        config: GQAConfig,
        *,
        fused_kernel: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = c = config
        self.fused_kernel = fused_kernel
        """Use the CPU kernels where they serve: GQA/MQA chunks over a cache (`fused_kernel_serves`),
        the projections of a few rows (`head_products_serve`)."""
        factory = {"device": device, "dtype": dtype}
        self.w_q = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.w_k = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.w_v = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.w_o = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False, **factory)
        self.rope = RotaryEmbedding(c.head_dim, c.rope)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        static: bool = False,
        sequences: ContiguousSequences | None = None,
    ) -> KVCache:
        """An empty K/V cache on this layer's device, in its dtype (a model's layers share `sequences`;
        `static`: see `ContiguousSequences`)."""
        weight = self.w_k.weight
        return KVCache(
            self.config,
            batch_size,
            max_len,
            static=static,
            sequences=sequences,
            device=weight.device,
            dtype=weight.dtype,
        )

    def check_mode(self, mode: str) -> None:
        """Raise a ValueError unless `mode` is "auto" or "naive" (this layer has one execution path)."""
        if mode not in ("auto", "naive"):
            raise ValueError(
                f"{self.config.kind.upper()} has one execution path; "
                f"mode must be 'auto' or 'naive', not {mode!r}"
            )

    def forward(
        self,
        x: Tensor,
        cache: AttentionCache | None = None,
        *,
        n_new: Tensor | None = None,
        mode: Mode = "auto",
        step: Step | None = None,
    ) -> Tensor:
        """x: [B, T, d] → [B, T, d]. One execution path: `mode` may be "auto" or "naive"."""
        c = self.config
        self.check_mode(mode)
        _check_input(
            x, self.w_o.weight, cache, n_new, step, d_model=c.d_model, family="kv", name=c.kind.upper()
        )
        if cache is not None and step is None:
            with cache.stepping(x.shape[1], n_new) as step:
                return self._forward(x, cache, step)
        return self._forward(x, cache, step)

    def _forward(self, x: Tensor, cache: AttentionCache | None, step: Step | None) -> Tensor:
        c = self.config
        batch, n_tokens = x.shape[:2]
        positions, memo = _positions(x, step), None if step is None else step.memo
        fused = self.fused_kernel
        q = project(self.w_q, x, fused).view(batch, n_tokens, c.n_heads, c.head_dim)  # [B, T, H, D]
        k = project(self.w_k, x, fused).view(batch, n_tokens, c.n_kv_heads, c.head_dim)  # [B, T, G, D]
        q, k = self.rope(q, positions, memo), self.rope(k, positions, memo)
        v = project(self.w_v, x, fused).view(batch, n_tokens, c.n_kv_heads, c.head_dim)
        rows, mask = (None, None) if cache is None else cache.update(k, v, step=step)  # mask [B, T, S]
        if rows is not None and self.fused_kernel:
            o = fused_grouped_attention(q, rows, step.lengths, c.softmax_scale)  # [B, T, H, D]
            if o is not None:
                return project(self.w_o, o.flatten(2), fused)
        if rows is not None and rows.copies and n_tokens == 1 and x.device.type == "cpu":
            # Decode over gathered pages: cache-sized blocks, merged by their log-sum-exp.
            o = decode_in_blocks(q.view(batch, c.n_kv_heads, -1, c.head_dim), rows, mask, c.softmax_scale)
            return project(self.w_o, o.reshape(batch, 1, -1), fused)
        if rows is not None:
            k, v = rows.full()  # [B, S, G, D] each
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, G, S, D]
        if n_tokens == 1 and c.n_kv_heads != c.n_heads:
            # Decode: each group's H/G query heads become its query rows, [B, G, H/G, D], so SDPA reads
            # every K/V head once instead of repeating it per query head (docs/bench: MQA, GQA decode).
            o = F.scaled_dot_product_attention(
                q.view(batch, c.n_kv_heads, -1, c.head_dim),
                k,
                v,
                attn_mask=None if mask is None else mask[:, None],  # [B, 1, 1, S]
                scale=c.softmax_scale,
            )
        else:
            o = _sdpa(
                q.transpose(1, 2), k, v, mask, c.softmax_scale, c.n_kv_heads != c.n_heads
            )  # [B, H, T, D]
        return project(
            self.w_o, o.reshape(batch, c.n_heads, n_tokens, c.head_dim).transpose(1, 2).flatten(2), fused
        )


KV_BLOCK_BYTES = 8 * 2**20
"""Keys + values per block when decode reads a paged K/V cache block by block: small enough to stay in
the CPU's cache between the gather and the attention that reads them back (README: paged caches)."""


def decode_in_blocks(q: Tensor, rows: KVRows, mask: Tensor | None, scale: float) -> Tensor:
    """One query position per sequence, q `[B, G, h, D]` (each K/V head's h query heads), over keys and
    values read in blocks (`rows.iter_blocks`): per block, the output and log-sum-exp of torch's CPU
    flash-attention kernel; then the blocks' outputs weighted by the softmax of their log-sum-exps.
    mask `[B, 1, S]` or None (all keys) → `[B, G, h, D]`."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, _, heads, dim = rows.shape
    max_rows = max(1, KV_BLOCK_BYTES // (2 * batch * heads * dim * q.element_size()))
    outputs, lses, start = [], [], 0
    for k, v in rows.iter_blocks(max_rows=max_rows):  # [B, s, G, D] each
        stop = start + k.shape[1]
        keep = None if mask is None else mask[:, None, :, start:stop]  # [B, 1, 1, s]
        bias = (
            None if keep is None else torch.zeros_like(keep, dtype=q.dtype).masked_fill_(~keep, float("-inf"))
        )
        o, lse = flash(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale)  # lse [B, G, h]
        if keep is not None:  # the kernel gives a row without keys in this block lse 0, not -inf
            lse = lse.masked_fill(~keep.any(dim=-1), float("-inf"))
        outputs.append(o)
        lses.append(lse)
        start = stop
    weights = torch.softmax(torch.stack(lses), dim=0).nan_to_num_(0.0)  # [blocks, B, G, h]; no key: 0
    merged = torch.einsum("nbgh,nbghd->bghd", weights, torch.stack(outputs).to(weights.dtype))
    return merged.to(q.dtype)


def build_attention(
    config: AttentionConfig,
    *,
    recompute_kv: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MLA | GQAAttention:
    """The layer for `config`: the `layer` its kind names in `registry.ATTENTION_KINDS` (`MLA` for an
    `MLAConfig`, `GQAAttention` for a `GQAConfig`). `recompute_kv` applies to the latent family (the K/V
    family caches its K/V as computed, nothing to recompute)."""
    if getattr(config, "kind", None) not in ATTENTION_KINDS:
        raise TypeError(
            f"build_attention takes an attention config (MLAConfig, GQAConfig ...), "
            f"got {type(config).__name__}"
        )
    spec = ATTENTION_KINDS[config.kind]
    options = {"recompute_kv": recompute_kv} if spec.family == "latent" else {}
    return resolve(spec.layer)(config, device=device, dtype=dtype, **options)
