"""Which key dims keep RoPE in MLA's one shared key, which lose it (RoRoPE: TransMLA; partial RoPE:
MHA2MLA).

Notation: H query heads, G kv heads (group of head h: g(h) = h // (H/G)), D head dim, P = D/2 rotary
pairs, R shared RoPE width (R/2 slots), N NoPE width, d model width. Weights are augmented
(`[..., d + 1]`, the last column the bias; see `moments`).

RoPE turns both dims of pair i of every head by the same angle, so an orthogonal mix U_i of the G kv
heads' pair-i keys commutes with it. In the basis U_i (the PCA of those keys over heads, components
j by falling energy) the pair's keys are k'_{i,j} = Σ_g U_i[g, j] k_{g,i}, and query head h scores its
group's key as Σ_j U_i[g(h), j] q_{h,i} · k'_{i,j}. A slot (i, j) placed in the shared RoPE key k_pe
keeps its rotation exactly, with the per-head query U_i[g(h), j] · q_{h,i}: R = G·D holds every key.

Choosing R/2 slots:
- "highest": component 0 of every pair from the highest frequency down, then component 1, …; for
  R ≤ D these are the R/2 highest frequencies' main components (TransMLA's RoRoPE, MHA2MLA's "high");
- "score": the slots with the largest √(E‖q'‖² · E‖k'‖²), summed over the query heads, which bounds
  the RMS of the slot's score term (MHA2MLA's 2-norm criterion, on rotated components).
Pairs with no slot keep all their dims as NoPE dims (rotation lost). For the components of a pair
that has a slot but that are not in k_pe, `residual` decides: "drop" them, or keep them as "nope"
dims (exact between equal positions; TransMLA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SlotRule = Literal["highest", "score"]
SLOT_RULES: tuple[SlotRule, ...] = ("highest", "score")
Residual = Literal["drop", "nope"]
RESIDUALS: tuple[Residual, ...] = ("drop", "nope")
Slot = tuple[int, int]
"""(pair i, component j)."""


def rope_pairs(head_dim: int, interleave: bool) -> list[tuple[int, int]]:
    """Dims of each rotary pair i (highest frequency first): adjacent, or i and i + D/2."""
    half = head_dim // 2
    return [(2 * i, 2 * i + 1) if interleave else (i, i + half) for i in range(half)]


def pair_layout(n_pairs: int, interleave: bool) -> list[int]:
    """Where pair s's (first, second) dims, stacked pair after pair, go in a rotary vector of 2·n_pairs."""
    if interleave:
        return list(range(2 * n_pairs))
    return [2 * i for i in range(n_pairs)] + [2 * i + 1 for i in range(n_pairs)]


@dataclass(frozen=True)
class RotaryKeys:
    """The kv heads' keys, pair by pair, in their principal basis over heads.

    rotations [P, G, G]: U_i, columns by falling energy; key_energy [P, G]: E‖k'_{i,j}‖²;
    query_energy [P, G]: Σ_h U_i[g(h), j]² · E‖q_{h,i}‖².
    """

    rotations: Tensor
    key_energy: Tensor
    query_energy: Tensor

    @classmethod
    def analyse(cls, w_q: Tensor, w_k: Tensor, second_moment: Tensor, interleave: bool) -> RotaryKeys:
        """From `w_q: [H, D, d+1]`, `w_k: [G, D, d+1]` and E[x̃ x̃ᵀ] `[d+1, d+1]`."""
        heads, head_dim, _ = w_q.shape
        group_of = torch.arange(heads) // (heads // w_k.shape[0])
        pairs = torch.tensor(rope_pairs(head_dim, interleave))  # [P, 2]
        pair_k, pair_q = w_k[:, pairs], w_q[:, pairs]  # [G, P, 2, d+1], [H, P, 2, d+1]
        head_cov = torch.einsum("gipd,de,hipe->igh", pair_k, second_moment, pair_k)  # [P, G, G]
        energy, u = torch.linalg.eigh(head_cov)
        u, energy = u.flip(-1), energy.flip(-1).clamp_min(0)  # falling energy
        q_energy = torch.einsum("hipd,de,hipe->ih", pair_q, second_moment, pair_q)  # [P, H]
        return cls(u, energy, torch.einsum("ihj,ih->ij", u[:, group_of] ** 2, q_energy))

    @property
    def scores(self) -> Tensor:
        """√(query energy · key energy) per slot, `[P, G]`."""
        return (self.key_energy * self.query_energy).sqrt()


def choose_slots(
    rule: SlotRule, qk_rope_head_dim: int, n_pairs: int, n_kv_heads: int, scores: Tensor | None
) -> list[Slot]:
    """The R/2 slots of k_pe, sorted by pair (so by falling frequency), by `rule` ("score" reads
    `scores: [P, G]`)."""
    slots = [(i, j) for j in range(n_kv_heads) for i in range(n_pairs)]  # "highest" order
    if rule == "score":
        if scores is None:
            raise ValueError("the 'score' rule needs slot scores")
        slots.sort(key=lambda slot: -scores[slot].item())  # stable: ties keep the "highest" order
    return sorted(slots[: qk_rope_head_dim // 2])


@dataclass(frozen=True)
class RopeSplit:
    """The converted query/key parts, augmented weights.

    k_pe [R, d+1] shared RoPE key; q_pe [H, R, d+1]; pairs: the source pair of each of k_pe's R/2
    pairs (its frequency); k_nope [G, N, d+1] each kv head's NoPE key; q_nope [H, N, d+1].
    """

    k_pe: Tensor
    q_pe: Tensor
    pairs: list[int]
    k_nope: Tensor
    q_nope: Tensor


def nope_dims(
    slots: list[Slot], head_dim: int, n_kv_heads: int, residual: Residual, interleave: bool
) -> list[int]:
    """Source dims that stay as NoPE dims, in source order."""
    covered = {i: sum(1 for pair, _ in slots if pair == i) for i in range(head_dim // 2)}
    keep = [
        dim
        for i, pair in enumerate(rope_pairs(head_dim, interleave))
        if covered[i] == 0 or (residual == "nope" and covered[i] < n_kv_heads)
        for dim in pair
    ]
    return sorted(keep)


def largest_nope_width(qk_rope_head_dim: int, head_dim: int, n_kv_heads: int, residual: Residual) -> int:
    """The most NoPE dims any R/2 slots can leave: "drop" keeps the pairs without a slot (fewest
    touched: slots crowd into whole pairs), "nope" the pairs not wholly in k_pe (fewest: slots spread
    over all pairs before completing any)."""
    slots, pairs = qk_rope_head_dim // 2, head_dim // 2
    fewest_touched, fewest_whole = -(-slots // n_kv_heads), max(0, slots - pairs * (n_kv_heads - 1))
    return max(head_dim - 2 * (fewest_touched if residual == "drop" else fewest_whole), 0)


def split_rope(
    keys: RotaryKeys, w_q: Tensor, w_k: Tensor, slots: list[Slot], residual: Residual, interleave: bool
) -> RopeSplit:
    """k_pe from `slots`, the NoPE keys from the rest (`w_q: [H, D, d+1]`, `w_k: [G, D, d+1]`)."""
    heads, head_dim, _ = w_q.shape
    groups = w_k.shape[0]
    group_of = torch.arange(heads) // (heads // groups)
    pairs = torch.tensor(rope_pairs(head_dim, interleave))  # [P, 2]
    pair_index, component = (torch.tensor(index) for index in zip(*slots, strict=True))  # [S], [S]
    u = keys.rotations[pair_index, :, component]  # [S, G]: each slot's mix of the kv heads
    k_pe = torch.einsum("sg,gspd->spd", u, w_k[:, pairs[pair_index]])  # [S, 2, d+1]
    q_pe = u.T[group_of, :, None, None] * w_q[:, pairs[pair_index]]  # [H, S, 2, d+1]
    layout = pair_layout(len(slots), interleave)

    outside = torch.ones(head_dim // 2, groups, dtype=torch.float64)  # [P, G]: components not in k_pe
    outside[pair_index, component] = 0
    residual_k = w_k.clone()  # [G, D, d+1]; a pair with a slot keeps its components outside k_pe
    partly = (outside.sum(1) < groups).nonzero()[:, 0]  # pairs with a slot
    if len(partly):
        rotation = keys.rotations[partly]  # [p, G, G]
        keep = torch.einsum("igj,ij,ihj->igh", rotation, outside[partly], rotation)  # projectors [p, G, G]
        residual_k[:, pairs[partly]] = torch.einsum("igh,hipd->gipd", keep, w_k[:, pairs[partly]])
    nope = nope_dims(slots, head_dim, groups, residual, interleave)
    return RopeSplit(
        k_pe=k_pe.reshape(-1, k_pe.shape[-1])[layout],
        q_pe=q_pe.flatten(1, 2)[:, layout],
        pairs=pair_index.tolist(),
        k_nope=residual_k[:, nope],
        q_nope=w_q[:, nope],
    )
