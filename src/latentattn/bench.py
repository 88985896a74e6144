"""Decode-step benchmark: every attention implementation at fixed contexts, against this machine's
roofline measured in the same run.

One row = one implementation, dtype, batch B and context S: the median time of one decode step (one
new token per sequence attending to S cached tokens) over repeats after warm-up. Cost model per step:
bytes = the layer's weights + the cache read; FLOPs = projections + attention (MLA's from
`mla_path_flops`). Roofline bound = max(bytes / bandwidth, FLOPs / peak), bandwidth from a large copy
and peak from a large GEMM timed in the same run.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.table import Table

from latentattn.attention import MLA, GQAAttention, absorbed_gemm_dtype, fused_kernel_serves, mla_path_flops
from latentattn.caches import PagedLatentCache, QuantizedLatentCache
from latentattn.calculator import format_bytes
from latentattn.config import GQAConfig, MLAConfig
from latentattn.hf import attention_state_dict_to_hf, mla_config_to_hf
from latentattn.kernels import kernel_status
from latentattn.metrics import relative_error
from latentattn.registry import ATTENTION_KINDS, LATENT_FORMATS, canonical_dtype, kv_heads, torch_dtype

KV_IMPLS = tuple(kind for kind, spec in ATTENTION_KINDS.items() if spec.family == "kv")
"""The K/V attention kinds (mha, gqa, mqa), one row each."""
IMPLS = (
    *KV_IMPLS,
    "mla-naive",
    "mla-absorbed",
    "mla-absorbed-torch",
    "mla-paged",
    *(f"mla-{name}" for name in LATENT_FORMATS),
    "hf-deepseek-v3",
)
"""mla-paged and mla-<format> decode on the absorbed path from a paged or an 8-bit latent cache
(`registry.LATENT_FORMATS`); the absorbed rows run the fused CPU kernel where it serves,
mla-absorbed-torch always the torch path."""
DTYPES = ("float32", "bfloat16", "float64")
"""Benchmarked dtypes (canonical names; `registry.DTYPES` lists their short spellings)."""
GEMM_MIN_MS = 50.0
"""The roofline's GEMM grows until one product takes this long: long enough to reach the peak."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run. The layer defaults to DeepSeek-V2-Lite's attention (d 2048, 16 heads, d_c 512,
    d_R 64, nope 128, v 128); MHA/GQA/MQA use the same 16 heads of 128 with 16/`gqa_kv_heads`/1 K/V heads."""

    mla: MLAConfig = field(default_factory=MLAConfig)
    gqa_kv_heads: int = 4
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    batch_sizes: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    impls: tuple[str, ...] = IMPLS
    hf_max_context: int = 65536
    warmup: int = 2
    repeats: int = 7
    max_seconds: float = 10.0
    """A row stops repeating once its timed steps took this long (after at least `MIN_REPEATS`)."""
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for impl in self.impls:
            if impl not in IMPLS:
                raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
        canonical = tuple(canonical_dtype(dtype, DTYPES, "BenchConfig.dtypes") for dtype in self.dtypes)
        object.__setattr__(self, "dtypes", canonical)
        for name in ("contexts", "batch_sizes"):
            if not getattr(self, name) or min(getattr(self, name)) <= 0:
                raise ValueError(f"BenchConfig.{name} must be positive integers, got {getattr(self, name)}")
        if self.repeats <= 0 or self.warmup < 0 or self.max_seconds <= 0:
            raise ValueError(
                f"need repeats > 0, warmup >= 0 and max_seconds > 0, got {self.repeats}, {self.warmup} "
                f"and {self.max_seconds}"
            )
        if self.gqa_kv_heads <= 0 or self.mla.n_heads % self.gqa_kv_heads:
            raise ValueError(
                f"gqa_kv_heads={self.gqa_kv_heads} must be positive and divide the {self.mla.n_heads} heads"
            )


@dataclass(frozen=True)
class Roofline:
    """This machine's memory bandwidth (GB/s, from a large copy) and GEMM peak (GFLOP/s) per dtype."""

    bandwidth_gbs: float
    peak_gflops: dict[str, float]

    def bound_ms(self, bytes_moved: int, flops: int, dtype: str) -> float:
        return 1e3 * max(bytes_moved / (self.bandwidth_gbs * 1e9), flops / (self.peak_gflops[dtype] * 1e9))


@dataclass(frozen=True)
class Result:
    impl: str
    dtype: str
    context: int
    batch: int
    ms_per_step: float
    ms_min: float
    ms_max: float
    tokens_per_s: float
    cache_bytes: int
    bytes_moved: int
    flops: int
    achieved_gbs: float
    achieved_gflops: float
    roofline_ms: float
    x_roofline: float
    max_rel_err: float | None
    path: str
    """What computed attention: "fused" (the CPU kernel), "torch" (the absorbed torch path), "sdpa", "hf"."""
    vs_mha: float | None = None
    vs_hf: float | None = None


MIN_REPEATS = 3


def time_ms(
    step: Callable[[], object],
    warmup: int,
    repeats: int,
    max_seconds: float = math.inf,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Wall-clock milliseconds of `repeats` calls of `step` after `warmup` calls (see
    `time_interleaved`, of which this is the one-step case)."""
    return time_interleaved({"step": step}, warmup, repeats, max_seconds, device)["step"]


def time_interleaved(
    steps: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    max_seconds: float = math.inf,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Wall-clock milliseconds of each step's calls, each waiting for the kernels it queued on
    `device`, taken round-robin — one timed call of every step per round — so that a busy moment of
    the machine slows every step alike and their ratios hold. Each step first gets `warmup` calls
    (skipping the rest once one took a third of `max_seconds`), then stays in the rounds until it has
    `repeats` times, or, after at least `MIN_REPEATS` (or `repeats` if fewer), until its timed calls
    took `max_seconds`."""
    device = torch.device(device)

    def timed(step: Callable[[], object]) -> float:
        start = time.perf_counter()
        step()
        if device.type != "cpu":  # accelerators run asynchronously
            getattr(torch, device.type).synchronize()
        return (time.perf_counter() - start) * 1e3

    for step in steps.values():
        for _ in range(warmup):
            if timed(step) > max_seconds * 1e3 / 3:
                break
    times: dict[str, list[float]] = {name: [] for name in steps}

    def running(name: str) -> bool:
        taken = times[name]
        return len(taken) < repeats and (len(taken) < MIN_REPEATS or sum(taken) < max_seconds * 1e3)

    active = [name for name in steps if running(name)]
    while active:
        for name in active:
            times[name].append(timed(steps[name]))
        active = [name for name in active if running(name)]
    return times


def gemm_peak_gflops(dtype: torch.dtype, device: str, repeats: int = 7) -> float:
    """The fastest run of square GEMMs of side 256, 512, ... 2048, growing while one GEMM takes under
    `GEMM_MIN_MS` (a CPU without native bf16 runs bf16 GEMMs far slower than fp32, where the largest
    one would take too long; measured figures: README)."""
    peak, n = 0.0, 256
    while n <= 2048:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        gemm_ms = min(time_ms(lambda a=a, b=b: a @ b, 1, repeats, device=device))
        peak = max(peak, 2 * n**3 / (gemm_ms * 1e-3) / 1e9)
        if gemm_ms >= GEMM_MIN_MS:
            break
        n *= 2
    return peak


def measure_roofline(dtypes: tuple[str, ...], device: str, repeats: int = 7) -> Roofline:
    """Bandwidth: the fastest of `repeats` copies of 256 MiB (bytes read + written). Peak per dtype: the
    faster of a GEMM in that dtype and one in the dtype the absorbed path multiplies it in
    (`absorbed_gemm_dtype`: fp32 for bf16 on a CPU, exact for bf16 products) — the fastest this machine
    multiplies such data. Fastest runs, not medians: a busy moment only ever slows a run down, and a low
    bound would flatter every ratio against it."""
    source = torch.ones(64 * 2**20, device=device)  # 256 MiB of fp32
    target = torch.empty_like(source)
    copy_ms = min(time_ms(lambda: target.copy_(source), 1, repeats, device=device))
    bandwidth = 2 * source.nbytes / (copy_ms * 1e-3) / 1e9
    measured: dict[torch.dtype, float] = {}
    peaks = {}
    for name in dtypes:
        candidates = {torch_dtype(name), absorbed_gemm_dtype(torch_dtype(name), torch.device(device))}
        for dtype in candidates - measured.keys():
            measured[dtype] = gemm_peak_gflops(dtype, device, repeats)
        peaks[name] = max(measured[dtype] for dtype in candidates)
    return Roofline(bandwidth_gbs=bandwidth, peak_gflops=peaks)


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU, threads, versions, and the accelerator's name when `device` is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "fused_kernel": kernel_status().detail,
        **(
            {"device_name": torch.cuda.get_device_name(device)} if torch.device(device).type == "cuda" else {}
        ),
    }


def idle_cores(interval: float = 0.25) -> float | None:
    """How many of the cores this process may run on (its CPU affinity) sat idle over `interval`
    seconds, from the per-core counters in /proc/stat (Linux: idle + iowait over all time); None where
    they cannot be read. Sampled rather than taken from the load average, which counts every core of
    the host, not the ones a container or `taskset` allows."""
    try:
        cores = os.sched_getaffinity(0)
        before = _core_times(cores)
        time.sleep(interval)
        after = _core_times(cores)
    except (OSError, AttributeError, ValueError):
        return None
    idle = 0.0
    for core in cores:
        (idle_before, total_before), (idle_after, total_after) = before[core], after[core]
        idle += (idle_after - idle_before) / max(1, total_after - total_before)
    return idle


def _core_times(cores: set[int]) -> dict[int, tuple[int, int]]:
    """Per core: (idle + iowait, all) jiffies since boot, from /proc/stat."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                ticks = [int(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    if times.keys() != cores:
        raise ValueError("/proc/stat does not list every core of this process's affinity")
    return times


def _linear_params(layer: torch.nn.Module, skip: str | None = None) -> int:
    return sum(p.numel() for name, p in layer.named_parameters() if p.dim() == 2 and name != skip)


def _weight_bytes(layer: torch.nn.Module) -> int:
    return sum(p.nbytes for p in layer.parameters())


@dataclass
class DecodeCase:
    """One implementation set up at one (dtype, batch, context): a step function and its cost model."""

    step: Callable[[], torch.Tensor]
    cache_bytes: int
    bytes_moved: int
    flops: int
    path: str


def _fragmented_pages(mla: MLA, latent: torch.Tensor, block_size: int = 64) -> PagedLatentCache:
    """A paged cache holding `latent: [B, S, C + R]` in every other block of the pool, as in a busy
    server, so attention gathers pages (a lone sequence in consecutive blocks is read in place)."""
    batch, context = latent.shape[:2]
    n_blocks = -(-(context + 1) // block_size)
    cache = PagedLatentCache(
        mla.config, 2 * batch * n_blocks, block_size=block_size, device=latent.device, dtype=latent.dtype
    )
    sequences, spacer = cache.new_batch(batch), cache.add_sequence()
    for start in range(0, context, block_size):
        cache.select(sequences).update(latent[:, start : start + block_size])
        cache.select([spacer]).update(latent[:1, start : start + 1])  # takes the next block
    cache.free(spacer)
    cache.select(sequences)
    return cache


def mla_decode_case(mla: MLA, x: torch.Tensor, latent: torch.Tensor, impl: str) -> DecodeCase:
    """An `mla-*` row (`impl`: naive, absorbed, absorbed-torch, paged or a latent format) decoding
    `x: [B, 1, d_model]` after the cached `latent: [B, S, C + R]`, every step at the same context."""
    batch, context = latent.shape[:2]
    storage = impl.removeprefix("mla-")
    mode = "naive" if storage == "naive" else "absorbed"
    fused = storage != "absorbed-torch"
    factory = {"device": latent.device, "dtype": latent.dtype}
    if storage == "paged":
        cache = _fragmented_pages(mla, latent)
    else:
        if storage in LATENT_FORMATS:
            cache = QuantizedLatentCache(mla.config, batch, context + 1, format=storage, **factory)
        else:
            cache = mla.new_cache(batch, context + 1)
        cache.update(latent)
    attention = "sdpa" if mode == "naive" else "torch"
    q = x.new_empty(batch, 1, mla.config.n_heads, mla.config.cache_width)
    if fused and mode == "absorbed" and fused_kernel_serves(q, cache.storage()):
        attention = "fused"

    def step() -> torch.Tensor:
        cache.truncate([context] * batch)  # every step decodes at the same context
        mla.fused_kernel = fused
        return mla(x, cache, mode=mode)

    path = mla_path_flops(mla.config, n_queries=1, n_keys=context + 1)[mode]
    flops = batch * (path + 2 * _linear_params(mla, skip="w_ukv.weight"))
    cache_bytes = batch * context * cache.bytes_per_token
    return DecodeCase(step, cache_bytes, _weight_bytes(mla) + cache_bytes, flops, attention)


def hf_decode_case(mla: MLA, x: torch.Tensor, latent: torch.Tensor) -> DecodeCase:
    """HF transformers' DeepseekV3Attention with MLA's weights; its DynamicCache holds the same latent."""
    from transformers import DeepseekV3Config, DynamicCache
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    c = mla.config
    config = DeepseekV3Config(
        **mla_config_to_hf(c), max_position_embeddings=latent.shape[1] + 1, attn_implementation="sdpa"
    )
    weight = mla.w_o.weight
    hf = DeepseekV3Attention(config, layer_idx=0).to(device=weight.device, dtype=weight.dtype).eval()
    hf.load_state_dict(attention_state_dict_to_hf(mla.state_dict(), c))
    batch, context = latent.shape[:2]
    c_kv, k_pe = latent.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
    if c.rope.interleave:  # HF keeps interleaved RoPE keys in half-split order
        k_pe = torch.cat([k_pe[..., 0::2], k_pe[..., 1::2]], dim=-1)
    cache = DynamicCache(config=config)
    cache.update(c_kv[:, None].contiguous(), k_pe[:, None].contiguous(), 0)
    positions = torch.full((batch, 1), context, device=x.device)
    rotary = DeepseekV3RotaryEmbedding(config).to(x.device)
    position_embeddings = rotary(x, positions)

    def step() -> torch.Tensor:
        out = hf(x, position_embeddings, None, cache)[0]  # positional: HF renamed past_key_values to cache
        cache.crop(-1)  # drop the new token: every step decodes at the same context
        return out

    path = mla_path_flops(c, n_queries=1, n_keys=context + 1)["naive"]
    flops = batch * (path + 2 * _linear_params(mla, skip="w_ukv.weight"))
    cache_bytes = batch * context * c.cache_width * latent.element_size()
    return DecodeCase(step, cache_bytes, _weight_bytes(mla) + cache_bytes, flops, "hf")


def gqa_decode_case(layer: GQAAttention, x: torch.Tensor, context: int) -> DecodeCase:
    """An MHA/GQA/MQA row decoding `x: [B, 1, d_model]` after `context` random cached keys and values."""
    c = layer.config
    batch = x.shape[0]
    cache = layer.new_cache(batch, context + 1)
    kv_shape = (batch, context, c.n_kv_heads, c.head_dim)
    cache.update(torch.randn(kv_shape).to(x), torch.randn(kv_shape).to(x))

    def step() -> torch.Tensor:
        cache.truncate([context] * batch)  # every step decodes at the same context
        return layer(x, cache)

    flops = batch * (2 * _linear_params(layer) + 4 * c.n_heads * c.head_dim * (context + 1))
    cache_bytes = batch * context * cache.bytes_per_token
    queries = x.new_empty(batch, 1, c.n_heads, c.head_dim)
    fused = layer.fused_kernel and fused_kernel_serves(queries, cache.storage())
    return DecodeCase(
        step, cache_bytes, _weight_bytes(layer) + cache_bytes, flops, "fused" if fused else "sdpa"
    )


DECOMPRESSING = ("mla-naive", "hf-deepseek-v3")
"""Rows that rebuild every head's keys and values from the whole latent cache each step."""


def decompressed_bytes(c: MLAConfig, batch: int, context: int, dtype: torch.dtype) -> int:
    """Peak working memory of one decompressing decode step: per-head keys and values `[B, S, H, qk + v]`,
    about three copies alive at once (the up-projection's output, keys with k_pe, SDPA's inputs)."""
    width = c.n_heads * (c.qk_head_dim + c.v_head_dim)
    return 3 * batch * context * width * torch.empty((), dtype=dtype).element_size()


def available_bytes(device: torch.device | str) -> int | None:
    """Memory that can still be allocated on `device` (CUDA: free memory; CPU: Linux's MemAvailable),
    or None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def _naive_reference(mla: MLA, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The naive path over the full-precision latent cache, one sequence at a time (its decompressed
    keys and values are the largest tensors of the benchmark)."""
    return torch.cat(
        [mla_decode_case(mla, x[b : b + 1], latent[b : b + 1], "mla-naive").step() for b in range(len(x))]
    )


@torch.no_grad()
def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (dtype, batch, context, impl) of `config`; returns `{"machine", "roofline", "config",
    "results", "skipped"}` with one result dict per row (see `Result`). A decompressing row whose
    working memory would exceed half of what the device has free is skipped, with the reason."""
    report = progress or (lambda _message: None)
    torch.manual_seed(config.seed)
    roofline = measure_roofline(config.dtypes, config.device)
    results: list[Result] = []
    skipped: list[dict[str, Any]] = []
    for dtype_name in config.dtypes:
        layers = bench_layers(config, torch_dtype(dtype_name))
        for batch in config.batch_sizes:
            for context in config.contexts:
                rows = _bench_group(config, layers, dtype_name, batch, context, roofline, report, skipped)
                results += _with_ratios(rows)
    return {
        "machine": machine_info(config.device),
        "roofline": asdict(roofline),
        "config": asdict(config),
        "results": [asdict(result) for result in results],
        "skipped": skipped,
    }


def bench_layers(config: BenchConfig, dtype: torch.dtype) -> dict[str, MLA | GQAAttention]:
    """The layers of one dtype: "mla" (every MLA and HF row) and one per K/V row of `config.impls`, of
    the same heads (`gqa_kv_heads` for gqa)."""
    c = config.mla
    layers: dict[str, MLA | GQAAttention] = {"mla": MLA(c, device=config.device, dtype=dtype).eval()}
    for impl in KV_IMPLS:
        if impl in config.impls:
            n_kv_heads = kv_heads(impl, c.n_heads, config.gqa_kv_heads)
            shape = GQAConfig(
                d_model=c.d_model, n_heads=c.n_heads, n_kv_heads=n_kv_heads, head_dim=c.v_head_dim
            )
            layers[impl] = GQAAttention(shape, device=config.device, dtype=dtype).eval()
    return layers


def _bench_group(
    config: BenchConfig,
    layers: dict[str, MLA | GQAAttention],
    dtype_name: str,
    batch: int,
    context: int,
    roofline: Roofline,
    report: Callable[[str], None],
    skipped: list[dict[str, Any]],
) -> list[Result]:
    """Every implementation at one (dtype, batch, context), over one random cached context; the MLA
    and HF rows checked against the naive path over the full-precision latent cache. Rows are timed
    together, round-robin (`time_interleaved`), as many at once as memory allows: before building the
    next row, the rows built so far are timed and freed when less memory is free than twice the
    largest cache (or decompressed working set) among them and the next one's. Decompressing rows
    that would not fit even alone are added to `skipped` instead."""
    mla, device, dtype = layers["mla"], config.device, torch_dtype(dtype_name)
    d_model = config.mla.d_model
    x = torch.randn(batch, 1, d_model, device=device, dtype=dtype)
    latent = mla.latent(
        torch.randn(batch, context, d_model, device=device, dtype=dtype),
        torch.arange(context, device=device).expand(batch, context),
    )
    any_latent = any(impl.startswith(("mla", "hf")) for impl in config.impls)
    reference = _naive_reference(mla, x, latent) if any_latent else None
    rows: dict[str, Result] = {}
    built: dict[str, tuple[DecodeCase, float | None]] = {}
    largest = 0

    def time_built() -> None:
        steps = {impl: case.step for impl, (case, _) in built.items()}
        times = time_interleaved(steps, config.warmup, config.repeats, config.max_seconds, device)
        for impl, (case, error) in built.items():
            rows[impl] = _result(impl, dtype_name, batch, context, case, times[impl], roofline, error)
        built.clear()

    impls = [i for i in config.impls if not (i == "hf-deepseek-v3" and context > config.hf_max_context)]
    for impl in impls:
        where = f"{impl} {dtype_name} batch {batch} context {context:,}"
        needed = decompressed_bytes(config.mla, batch, context, dtype) if impl in DECOMPRESSING else 0
        free = available_bytes(device)
        if built and free is not None and free < 2 * max(largest, needed):
            time_built()
            largest, free = 0, available_bytes(device)
        if impl in DECOMPRESSING and free is not None and needed > free // 2:
            reason = f"needs ~{format_bytes(needed)}, {format_bytes(free)} available"
            skipped.append(dict(impl=impl, dtype=dtype_name, batch=batch, context=context, reason=reason))
            report(f"skipped {where}: {reason}")
            continue
        report(where)
        if impl in KV_IMPLS:
            case = gqa_decode_case(layers[impl], x, context)
        elif impl == "hf-deepseek-v3":
            case = hf_decode_case(mla, x, latent)
        else:
            case = mla_decode_case(mla, x, latent, impl)
        output = case.step()
        built[impl] = case, relative_error(output, reference) if impl.startswith(("mla", "hf")) else None
        largest = max(largest, case.cache_bytes, needed)
    if built:
        time_built()
    return [rows[impl] for impl in impls if impl in rows]


def _result(
    impl: str,
    dtype_name: str,
    batch: int,
    context: int,
    case: DecodeCase,
    times: list[float],
    roofline: Roofline,
    error: float | None,
) -> Result:
    """One row: the median step time `times` (ms) and the units derived from it."""
    median = statistics.median(times)
    bound = roofline.bound_ms(case.bytes_moved, case.flops, dtype_name)
    return Result(
        impl=impl,
        dtype=dtype_name,
        context=context,
        batch=batch,
        ms_per_step=median,
        ms_min=min(times),
        ms_max=max(times),
        tokens_per_s=batch / (median * 1e-3),
        cache_bytes=case.cache_bytes,
        bytes_moved=case.bytes_moved,
        flops=case.flops,
        achieved_gbs=case.bytes_moved / (median * 1e-3) / 1e9,
        achieved_gflops=case.flops / (median * 1e-3) / 1e9,
        roofline_ms=bound,
        x_roofline=median / bound,
        max_rel_err=error,
        path=case.path,
    )


def _with_ratios(rows: list[Result]) -> list[Result]:
    """Speed-ups against MHA and HF measured in the same (dtype, batch, context) group."""
    by_impl = {row.impl: row.ms_per_step for row in rows}

    def ratio(name: str, row: Result) -> float | None:
        return by_impl[name] / row.ms_per_step if name in by_impl else None

    return [
        Result(**{**asdict(row), "vs_mha": ratio("mha", row), "vs_hf": ratio("hf-deepseek-v3", row)})
        for row in rows
    ]


def results_table(report: dict[str, Any]) -> Table:
    """A rich table of `run_bench`'s report: one row per measurement, grouped by dtype/batch/context."""
    machine, roof = report["machine"], report["roofline"]
    peaks = ", ".join(f"{name} {gflops:,.0f} GFLOP/s" for name, gflops in roof["peak_gflops"].items())
    table = Table(
        title=(
            f"Decode step: median (min–max) of up to {report['config']['repeats']} steps, "
            f"at most ~{report['config']['max_seconds']:g} s per row"
        ),
        caption=(
            f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, fused kernel: "
            f"{machine['fused_kernel']}; roofline: "
            f"{roof['bandwidth_gbs']:.1f} GB/s copy, {peaks}. ×roof = measured / max(bytes/BW, FLOPs/peak); "
            "rel err: max |out − mla-naive| / max |mla-naive| on the same full-precision cache"
            + "".join(
                f"; skipped {row['impl']} {row['dtype']} batch {row['batch']} context {row['context']:,}: "
                f"{row['reason']}"
                for row in report.get("skipped", ())
            )
        ),
    )
    headers = ["impl", "path", "dtype", "batch", "context", "ms/step", "min–max", "tok/s", "cache", "GB/s"]
    headers += ["GFLOP/s"]
    headers += ["×roof", "vs MHA", "vs HF", "rel err"]
    for header in headers:
        table.add_column(header, justify="left" if header in ("impl", "path", "dtype") else "right")
    previous = None
    for row in report["results"]:
        group = (row["dtype"], row["batch"], row["context"])
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        table.add_row(
            row["impl"],
            row["path"],
            row["dtype"],
            str(row["batch"]),
            f"{row['context']:,}",
            f"{row['ms_per_step']:.2f}",
            f"{row['ms_min']:.2f}–{row['ms_max']:.2f}",
            f"{row['tokens_per_s']:,.1f}",
            format_bytes(row["cache_bytes"]),
            f"{row['achieved_gbs']:.1f}",
            f"{row['achieved_gflops']:.1f}",
            f"{row['x_roofline']:.2f}",
            _ratio(row["vs_mha"]),
            _ratio(row["vs_hf"]),
            "-" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}",
        )
    return table


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"
