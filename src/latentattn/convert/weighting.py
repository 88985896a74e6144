"""What an error in the NoPE keys and values costs the attention output: the metric the joint K/V
factorisation minimises with `kv_objective="attention"`.

Notation: H query heads, G kv heads (head h reads group g(h)), N NoPE width, D head dim (value width),
d model width; weights augmented (`[..., d + 1]`, see `moments`), Σ = E[x̃ x̃ᵀ], s the source's score
scale. For query head h, an error δk in its group's NoPE key moves its score by s·q_hᵀδk, an error δv
in the value moves its output by W_O,h δv. To first order a score error δs_j on key j moves the head's
output by p_j (δs_j − Σ_i p_i δs_i)(u_j − ū) (u_j = W_O,h v_j, p the attention weights), so with errors
independent over keys a score error costs about λ_h = E‖u − E u‖² (the spread of the head's value
outputs) times what it costs in the logits. Summed over the heads of group g:

    M_K,g = Σ_h λ_h s² E[q_h,nope q_h,nopeᵀ]   (`[N, N]`: keys weighted by the queries that read them)
    M_V,g = Σ_h W_O,hᵀ W_O,h                    (`[D, D]`: values weighted by the output projection)

An error in a shared value moves every head of its group, by p_h,j W_O,h δv_j for head h: M_V,g above
("heads") is E‖δo‖² when the heads' attention weights are uncorrelated; when they attend alike the
errors add before the norm, M_V,g = (Σ_h W_O,h)ᵀ (Σ_h W_O,h) ("group", `value_metric`).

and E‖δo‖² ≈ E[δkᵀ M_K δk + δvᵀ M_V δv] up to a factor Σ_j p_j² shared by both. `key_weight` scales M_K
(1 is the estimate above). Each block is regularised by `ridge` times its mean eigenvalue, so the
square root is invertible: the factorisation stays exact at full rank.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ValueMetric = Literal["heads", "group"]
VALUE_METRICS: tuple[ValueMetric, ...] = ("heads", "group")

RIDGE = 1e-3
"""Each block's regulariser: this times its mean eigenvalue is added to its diagonal."""


def group_index(heads: int, groups: int, device: torch.device | str | None = None) -> Tensor:
    """g(h) for each query head h: `[H]` (head h reads kv group h // (H/G))."""
    return torch.arange(heads, device=device) // (heads // groups)


def ridge_of(matrix: Tensor, ridge: float) -> Tensor:
    """`ridge` times the mean eigenvalue (mean diagonal) of each `[..., n, n]` block, at least the
    smallest normal: `[...]`."""
    mean = torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1)
    return ridge * mean.clamp_min(torch.finfo(matrix.dtype).tiny)


def regularised(matrix: Tensor, ridge: float) -> Tensor:
    """`matrix: [..., n, n]` plus `ridge_of(matrix, ridge)` on its diagonal."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix + ridge_of(matrix, ridge)[..., None, None] * eye


def solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """X with `matrix` X = `rhs` for `matrix: [B, n, n]`, `rhs: [B, n, k]`: `torch.linalg.solve`, one
    matrix at a time. torch 2.13's batched CPU LU fails with more than one thread for n ≥ 160
    ("Pivots given to lu_solve must all be greater or equal to 1"); single matrices solve."""
    return torch.stack([torch.linalg.solve(a, b) for a, b in zip(matrix, rhs, strict=True)])


def attention_metric(
    q_nope: Tensor,
    w_v: Tensor,
    w_o: Tensor,
    second_moment: Tensor,
    score_scale: float,
    key_weight: float = 1.0,
    value_metric: ValueMetric = "heads",
    ridge: float = RIDGE,
) -> Tensor:
    """The block-diagonal metric `[G, N + D, N + D]` (M_K,g over the NoPE key rows, M_V,g over the
    value rows) from `q_nope: [H, N, d+1]`, `w_v: [G, D, d+1]`, `w_o: [d, H·D]`, Σ `[d+1, d+1]`."""
    heads, nope, _ = q_nope.shape
    groups, head_dim, _ = w_v.shape
    group_of = group_index(heads, groups, q_nope.device)
    mean = second_moment[:, -1]  # E[x̃]
    covariance = second_moment - mean[:, None] * mean[None, :]
    w_o_heads = w_o.view(-1, heads, head_dim).transpose(0, 1)  # [H, d, D]
    head_outputs = torch.einsum("hed,hdf->hef", w_o_heads, w_v[group_of])  # W_O,h W_V,g(h): [H, d, d+1]
    spread = torch.einsum("hef,fk,hek->h", head_outputs, covariance, head_outputs)  # λ_h
    query_moment = torch.einsum("hnd,de,hme->hnm", q_nope, second_moment, q_nope)  # E[q qᵀ]: [H, N, N]
    key_metric = torch.zeros(groups, nope, nope, dtype=q_nope.dtype, device=q_nope.device)
    key_metric.index_add_(0, group_of, (key_weight * score_scale**2) * spread[:, None, None] * query_moment)
    if value_metric == "group":
        group_outputs = torch.zeros(groups, *w_o_heads.shape[1:], dtype=w_o.dtype, device=w_o.device)
        group_outputs.index_add_(0, group_of, w_o_heads)  # Σ_h W_O,h: [G, d, D]
        values = group_outputs.transpose(1, 2) @ group_outputs
    else:
        values = torch.zeros(groups, head_dim, head_dim, dtype=w_o.dtype, device=w_o.device)
        values.index_add_(0, group_of, w_o_heads.transpose(1, 2) @ w_o_heads)
    metric = torch.zeros(groups, nope + head_dim, nope + head_dim, dtype=q_nope.dtype, device=q_nope.device)
    if nope:
        metric[:, :nope, :nope] = regularised(key_metric, ridge)
    metric[:, nope:, nope:] = regularised(values, ridge)
    return metric
