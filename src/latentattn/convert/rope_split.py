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
        rotations, key_energy, query_energy = [], [], []
        for pair in rope_pairs(head_dim, interleave):
            pair_k, pair_q = w_k[:, pair], w_q[:, pair]  # [G, 2, d+1], [H, 2, d+1]
            head_cov = torch.einsum("gpd,de,hpe->gh", pair_k, second_moment, pair_k)  # [G, G]
            energy, u = torch.linalg.eigh(head_cov)
            u, energy = u.flip(-1), energy.flip(-1).clamp_min(0)  # falling energy
            q_energy = torch.einsum("hpd,de,hpe->h", pair_q, second_moment, pair_q)  # [H]
            rotations.append(u)
            key_energy.append(energy)
            query_energy.append(torch.einsum("hj,h->j", u[group_of] ** 2, q_energy))
        return cls(torch.stack(rotations), torch.stack(key_energy), torch.stack(query_energy))

    @property
    def scores(self) -> Tensor:
        """√(query energy · key energy) per slot, `[P, G]`."""
        return (self.key_energy * self.query_energy).sqrt()


def choose_slots(
    rule: SlotRule, rope_dim: int, n_pairs: int, n_kv_heads: int, scores: Tensor | None
) -> list[Slot]:
    """The R/2 slots of k_pe, sorted by pair (so by falling frequency), by `rule` ("score" reads
    `scores: [P, G]`)."""
    slots = [(i, j) for j in range(n_kv_heads) for i in range(n_pairs)]  # "highest" order
    if rule == "score":
        if scores is None:
            raise ValueError("the 'score' rule needs slot scores")
        slots.sort(key=lambda slot: -scores[slot].item())  # stable: ties keep the "highest" order
    return sorted(slots[: rope_dim // 2])


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


def split_rope(
    keys: RotaryKeys, w_q: Tensor, w_k: Tensor, slots: list[Slot], residual: Residual, interleave: bool
) -> RopeSplit:
    """k_pe from `slots`, the NoPE keys from the rest (`w_q: [H, D, d+1]`, `w_k: [G, D, d+1]`)."""
    heads, head_dim, _ = w_q.shape
    groups = w_k.shape[0]
    group_of = torch.arange(heads) // (heads // groups)
    pairs = rope_pairs(head_dim, interleave)
    k_pe, q_pe = [], []
    for i, j in slots:
        u = keys.rotations[i, :, j]  # [G]
        k_pe.append(torch.einsum("g,gpd->pd", u, w_k[:, pairs[i]]))  # [2, d+1]
        q_pe.append(u[group_of, None, None] * w_q[:, pairs[i]])  # [H, 2, d+1]
    layout = pair_layout(len(slots), interleave)

    chosen = set(slots)
    residual_k = w_k.clone()  # [G, D, d+1]; pairs with a slot keep only their components outside k_pe
    for i, pair in enumerate(pairs):
        outside = [j for j in range(groups) if (i, j) not in chosen]
        if len(outside) < groups:
            u = keys.rotations[i, :, outside]  # [G, J]
            residual_k[:, pair] = torch.einsum("gh,hpd->gpd", u @ u.T, w_k[:, pair])
    nope = nope_dims(slots, head_dim, groups, residual, interleave)
    return RopeSplit(
        k_pe=torch.cat(k_pe)[layout],
        q_pe=torch.cat(q_pe, dim=1)[:, layout],
        pairs=[i for i, _ in slots],
        k_nope=residual_k[:, nope],
        q_nope=w_q[:, nope],
    )
