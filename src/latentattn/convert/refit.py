"""Fit the converted layer to what the source's attention does on the calibration windows
(`refit="attention"`): the latent W_DKV and each head's up-projections, from the joint factorisation's,
then the output projection.

Notation: H query heads, G kv heads (head h reads group g(h)), N NoPE width, D head dim, d model width,
C latent width; c = W_DKV x (`w_down: [C, d]`); s the source's score scale. Per query head h, with the
moments of `attention_moments` (weights without the bias column, moments without the bias row):

- keys: the error of the group's NoPE keys K_g x (`[N, d]`) read through c costs
  κ_h tr(Q_h E S_K,h Eᵀ): κ_h the key cost, Q_h = s² E_w[q_nope q_nopeᵀ] over its queries,
  S_K,h the keys' weighted covariance (centred: a key error shared by all keys moves no softmax);
- values: the error of W_V,g read through c̄ = W_DKV x̄ costs tr(W_O,hᵀ W_O,h E S_V,h Eᵀ),
  S_V,h = E[x̄ x̄ᵀ] (exact, given the attention weights).

For a fixed W_DKV each head's best up-projection is a least-squares fit (`W = Y S W_DKVᵀ G⁻¹`,
G = W_DKV S W_DKVᵀ), and a block (Y, M, S) then keeps tr(G⁻¹ W_DKV T W_DKVᵀ) of its cost, T = S Yᵀ M Y S.
`refine_down_projection` raises the kept cost summed over all blocks (`GroupTerms.kept`) by L-BFGS
from the factorisation's W_DKV (a generalised Rayleigh quotient for one block, which PCA solves; the
blocks' moments differ);
`fit_up_projections` then fits every head's W_UK,h and W_UV,h (free in MLA, shared in the source).
Last, `fit_output_projection` refits W_O on the converted layer's own head outputs, by least squares
against the source layer's output: it sees the errors as they add up across heads, beyond first order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentattn.attention import MLA, GQAAttention
from latentattn.convert.attention_moments import AttentionMoments
from latentattn.convert.weighting import ValueMetric, group_index, regularised, ridge_of, solve

RIDGE = 1e-12
"""Regulariser of G = W_DKV S W_DKVᵀ, relative to its mean eigenvalue (see weighting.regularised)."""

REFINE_STEPS = 20
"""L-BFGS iterations of `refine_down_projection`."""

OUTPUT_RIDGE = 1.0
"""`fit_output_projection`'s regulariser toward the current W_O, relative to the heads' mean power."""


def _blocks(
    w_k_nope: Tensor,
    q_nope: Tensor,
    w_v: Tensor,
    w_o: Tensor,
    attention: AttentionMoments,
    score_scale: float,
    key_weight: float,
    value_metric: ValueMetric,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Targets Y, metrics M and moments S of the key blocks and the value blocks, each `[H, ...]`:
    `w_k_nope: [G, N, d]`, `q_nope: [H, N, d+1]`, `w_v: [G, D, d]`, `w_o: [d, H·D]`. `key_weight` scales
    the key metrics; with `value_metric="group"` head h's value metric is W_O,hᵀ Σ_{h' in g(h)} W_O,h',
    so that a group's metrics sum to (Σ_h W_O,h)ᵀ (Σ_h W_O,h) (see weighting)."""
    heads, groups = q_nope.shape[0], w_v.shape[0]
    group_of = group_index(heads, groups, w_v.device)
    key_moment = attention.key_moment
    mean = key_moment[:, :-1, -1]  # E_w[x] over keys: [H, d]
    key_covariance = key_moment[:, :-1, :-1] - mean[:, :, None] * mean[:, None, :]
    query_metric = torch.einsum("hnd,hde,hme->hnm", q_nope, attention.query_moment, q_nope)  # [H, N, N]
    key_metric = (key_weight * attention.key_cost * score_scale**2)[:, None, None] * query_metric
    w_o_heads = w_o.view(w_o.shape[0], heads, -1).transpose(0, 1)  # [H, d, D]
    read_by = w_o_heads
    if value_metric == "group":
        read_by = w_o_heads.unflatten(0, (groups, -1)).sum(1)[group_of]  # Σ_{h' in g(h)} W_O,h'
    return (
        [w_k_nope[group_of], w_v[group_of]],
        [key_metric, w_o_heads.mT @ read_by],
        [key_covariance, attention.attended_moment[:, :-1, :-1]],
    )


@dataclass(frozen=True)
class GroupTerms:
    """Per block and kv group: gains T `[G, d, d]` = S Yᵀ (Σ_h M_h) Y S and moments S `[G, d, d]`, its
    heads' mean (the heads of a group read the same keys and values); `cost` Σ tr((Σ_h M_h) Y S Yᵀ),
    what all blocks cost with nothing kept."""

    gains: list[Tensor]
    moments: list[Tensor]
    cost: Tensor

    @classmethod
    def of(
        cls, targets: list[Tensor], metrics: list[Tensor], moments: list[Tensor], groups: int
    ) -> GroupTerms:
        gains, shared, cost = [], [], 0
        for y, m, s in zip(targets, metrics, moments, strict=True):
            s_group = s.unflatten(0, (groups, -1)).mean(1)
            y_group, m_group = y.unflatten(0, (groups, -1))[:, 0], m.unflatten(0, (groups, -1)).sum(1)
            gains.append(s_group @ y_group.mT @ m_group @ y_group @ s_group)
            shared.append(s_group)
            cost = cost + torch.diagonal(m_group @ y_group @ s_group @ y_group.mT, dim1=-2, dim2=-1).sum()
        return cls(gains, shared, cost)

    def kept(self, w_down: Tensor) -> Tensor:
        """Σ_blocks tr(G⁻¹ W_DKV T W_DKVᵀ) / cost (1 at full rank): the share of the cost that
        `w_down: [C, d]` keeps, each block with its least-squares up-projection."""
        captured = sum(
            solve(regularised(w_down @ s @ w_down.T, RIDGE), w_down @ t @ w_down.T)
            .diagonal(dim1=-2, dim2=-1)
            .sum()
            for t, s in zip(self.gains, self.moments, strict=True)
        )
        return captured / self.cost


def refine_down_projection(w_down: Tensor, terms: GroupTerms) -> Tensor:
    """W_DKV `[C, d]` raising `terms.kept`, by L-BFGS from `w_down`."""
    scale = w_down.norm()
    variable = (w_down / scale).clone(memory_format=torch.contiguous_format).requires_grad_(True)
    optimizer = torch.optim.LBFGS([variable], max_iter=REFINE_STEPS, line_search_fn="strong_wolfe")

    def lost() -> Tensor:
        optimizer.zero_grad()
        loss = 1 - terms.kept(variable)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(lost)
    return variable.detach() * scale


def fit_up_projections(w_down: Tensor, targets: list[Tensor], moments: list[Tensor]) -> Tensor:
    """Each head's `[W_UK,h; W_UV,h]` `[H, N + D, C]`: the least-squares fit Y S W_DKVᵀ G⁻¹ of every
    block."""
    fitted = [
        y.new_zeros(y.shape[0], 0, w_down.shape[0])  # N = 0: LAPACK rejects a solve without right-hand sides
        if y.shape[1] == 0
        else solve(regularised(w_down @ s @ w_down.T, RIDGE), (y @ s @ w_down.T).mT).mT
        for y, s in zip(targets, moments, strict=True)
    ]
    return torch.cat(fitted, dim=1)


def fit_to_attention(
    w_down: Tensor,
    w_k_nope: Tensor,
    q_nope: Tensor,
    w_v: Tensor,
    w_o: Tensor,
    attention: AttentionMoments,
    score_scale: float,
    key_weight: float = 1.0,
    value_metric: ValueMetric = "group",
) -> tuple[Tensor, Tensor]:
    """(W_UKV per head `[H, N + D, C]`, W_DKV `[C, d]`) fitted to `attention`, from the factorisation's
    `w_down` (shapes and options: see `_blocks`)."""
    targets, metrics, moments = _blocks(
        w_k_nope, q_nope, w_v, w_o, attention, score_scale, key_weight, value_metric
    )
    w_down = refine_down_projection(w_down, GroupTerms.of(targets, metrics, moments, w_v.shape[0]))
    return balanced(fit_up_projections(w_down, targets, moments), w_down)


def balanced(w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor]:
    """The same product W_UKV W_DKV with each latent component k scaled so that W_DKV's row k and
    W_UKV's column k have equal RMS entries (`w_up: [H, N + D, C]`, `w_down: [C, d]`): a step of the
    same size on every weight, as Adam takes, then moves both factors by the same relative amount."""
    rms_up = w_up.square().mean((0, 1)).sqrt()  # [C]
    rms_down = w_down.square().mean(1).sqrt()
    scale = (rms_up / rms_down.clamp_min(torch.finfo(w_down.dtype).tiny)).sqrt()
    return w_up / scale, w_down * scale[:, None]


@torch.no_grad()
def fit_output_projection(mla: MLA, layer: GQAAttention, windows: list[Tensor]) -> None:
    """Refit `mla.w_o` (and its bias) so that on `windows` (`[b, T, d]` each, the source's inputs) the
    layer's output matches `layer`'s in least squares, regularised toward the current W_O:
    W = (Σ y õᵀ + λ W_O)(Σ õ õᵀ + λ I)⁻¹, õ the converted heads' outputs (w_o's input, with a 1 when
    w_o has a bias), λ = OUTPUT_RIDGE × the mean of diag(Σ õ õᵀ). This sees what the latent's errors do
    after attention, where they add up across heads."""
    weight = mla.w_o.weight
    heads_moment = cross = None
    for x in windows:
        x = x.to(device=weight.device, dtype=weight.dtype)
        positions = torch.arange(x.shape[1], device=x.device).expand(*x.shape[:2])
        q_nope, q_pe = mla.queries(x, positions)
        heads = mla.attend_naive(q_nope, q_pe, mla.latent(x, positions), None).flatten(2)  # õ: [b, T, H·V]
        heads = heads.reshape(-1, heads.shape[-1]).double()
        if mla.w_o.bias is not None:
            heads = torch.cat([heads, heads.new_ones(len(heads), 1)], dim=1)
        target = layer(x).reshape(len(heads), -1).double()  # y: [n, d]
        heads_moment = heads.T @ heads if heads_moment is None else heads_moment + heads.T @ heads
        cross = target.T @ heads if cross is None else cross + target.T @ heads
    current = weight.double()
    if mla.w_o.bias is not None:
        current = torch.cat([current, mla.w_o.bias.double()[:, None]], dim=1)
    fitted = torch.linalg.solve(
        regularised(heads_moment, OUTPUT_RIDGE), (cross + ridge_of(heads_moment, OUTPUT_RIDGE) * current).T
    ).T
    mla.w_o.weight.copy_(fitted[:, : mla.w_o.in_features])
    if mla.w_o.bias is not None:
        mla.w_o.bias.copy_(fitted[:, -1])
