"""What the source's attention does with its inputs on calibration: the moments the per-head refit of
the converted layer's up-projections reads (`convert.layer`, `refit="attention"`).

Notation: H query heads, G kv heads, D head dim, d model width; x̃ = [x; 1] the augmented inputs (see
`moments`); p_ij head h's attention weight of query i on key j; u_j = W_O,h v_j what key j's value
adds to head h's output, ū_i = Σ_j p_ij u_j.

- attended `[H, d+1, d+1]`: E[x̄ x̄ᵀ] over queries, x̄_i = Σ_j p_ij x̃_j. Head h's output is
  W_O,h W_V x̄_i, so an error E in W_V costs it E‖W_O,h E x̄‖²: exactly (given the attention weights),
  where the inputs' moments E[x̃ x̃ᵀ] price what no query reads.
- keys, queries `[H, d+1, d+1]`: to first order a score error δs_ij moves head h's output by
  δo_i = Σ_j p_ij δs_ij (u_j − ū_i) (softmax ignores a shift shared by all keys); on the diagonal
  (errors on different keys uncorrelated) E‖δo_i‖² ≈ Σ_j w_ij δs_ij², w_ij = p_ij² ‖u_j − ū_i‖². With
  δs_ij = q_iᵀ δk_j this is Σ_ij w_ij (q_iᵀ δk_j)², priced with the keys' inputs weighted by Σ_i w_ij
  (keys) and the queries' by Σ_j w_ij (queries): a key no query reads, or an attention sink whose
  value is the output, costs nothing. `key_weight` Σ_ij w_ij.

Windows are independent sequences from position 0 (causal attention within each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentattn.attention import GQAAttention
from latentattn.layers import fp32_or_wider

WORK_ELEMENTS = 2**26
"""Elements of the largest work tensor (`[b, H, T, max(T, d + 1)]`) `AttentionMoments.of` batches
windows to (256 MiB in fp32)."""


@dataclass
class AttentionMoments:
    """Running sums over `count` queries, per head, in fp64: attended `Σ_i x̄_i x̄_iᵀ`, keys
    `Σ_ij w_ij x̃_j x̃_jᵀ`, queries `Σ_ij w_ij x̃_i x̃_iᵀ`, key_weight `Σ_ij w_ij`."""

    attended: Tensor
    keys: Tensor
    queries: Tensor
    key_weight: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, heads: int, d_model: int, device: torch.device | str | None = None) -> AttentionMoments:
        square = torch.zeros(heads, d_model + 1, d_model + 1, dtype=torch.float64, device=device)
        return cls(
            square, square.clone(), square.clone(), torch.zeros(heads, dtype=torch.float64, device=device)
        )

    @classmethod
    def of(cls, layer: GQAAttention, windows: list[Tensor]) -> AttentionMoments:
        """The moments of `layer` on `windows` (`[b, T, d]` each), a few windows at a time."""
        c, weight = layer.config, layer.w_q.weight
        moments = cls.zeros(c.n_heads, c.d_model, weight.device)
        for x in windows:
            per_window = c.n_heads * x.shape[1] * max(x.shape[1], c.d_model + 1)  # largest work tensor
            for part in x.split(max(1, WORK_ELEMENTS // per_window)):
                moments.add(layer, part.to(weight.device))
        return moments

    @torch.no_grad()
    def add(self, layer: GQAAttention, x: Tensor) -> None:
        """Accumulate `layer`'s attention over the windows `x: [B, T, d]` (computed in fp32 or wider,
        summed in fp64)."""
        c = layer.config
        dtype = fp32_or_wider(layer.w_q.weight.dtype)
        x = x.to(dtype)
        batch, n_tokens, _ = x.shape
        positions = torch.arange(n_tokens, device=x.device).expand(batch, n_tokens)

        def project(linear: nn.Linear) -> Tensor:
            bias = None if linear.bias is None else linear.bias.to(dtype)
            return F.linear(x, linear.weight.to(dtype), bias)

        q = layer.rope(project(layer.w_q).view(batch, n_tokens, c.n_heads, c.head_dim), positions)
        q = q.view(batch, n_tokens, c.n_kv_heads, -1, c.head_dim)  # [B, T, G, H/G, D]
        k = layer.rope(project(layer.w_k).view(batch, n_tokens, c.n_kv_heads, c.head_dim), positions)
        v = project(layer.w_v).view(batch, n_tokens, c.n_kv_heads, c.head_dim)
        scores = torch.einsum("btgrd,bsgd->bgrts", q, k).flatten(1, 2) * c.softmax_scale  # [B, H, T, S]
        future = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=x.device).triu(1)
        p = scores.masked_fill(future, float("-inf")).softmax(-1)
        x_aug = torch.cat([x, x.new_ones(batch, n_tokens, 1)], dim=-1)  # x̃: [B, T, d+1]
        attended = p @ x_aug[:, None]  # x̄: [B, H, T, d+1]
        self.attended += torch.einsum("bhti,bhtj->hij", attended, attended).double()

        w_o = layer.w_o.weight.to(dtype).view(c.d_model, c.n_heads, c.head_dim)
        metric = torch.einsum("ehd,ehf->hdf", w_o, w_o)  # W_O,hᵀ W_O,h: [H, D, D]
        values = (
            v[:, :, :, None].expand(-1, -1, -1, c.n_heads // c.n_kv_heads, -1).flatten(2, 3)
        )  # [B, S, H, D]
        values = values.transpose(1, 2)  # v_j per head: [B, H, S, D]
        read = values @ metric  # W_O,hᵀ W_O,h v_j: [B, H, S, D]
        mean = p @ values  # v̄_i: [B, H, T, D]; ‖u_j − ū_i‖² = (v_j − v̄_i)ᵀ W_O,hᵀ W_O,h (v_j − v̄_i)
        distance = (
            (read * values).sum(-1)[:, :, None, :]
            - 2 * (mean @ read.mT)
            + ((mean @ metric) * mean).sum(-1)[..., None]
        ).clamp_min(0)  # [B, H, T, S]
        weight = p * p * distance  # w_ij
        self.keys += torch.einsum("bhs,bsi,bsj->hij", weight.sum(2), x_aug, x_aug).double()
        self.queries += torch.einsum("bht,bti,btj->hij", weight.sum(3), x_aug, x_aug).double()
        self.key_weight += weight.sum((0, 2, 3)).double()
        self.count += batch * n_tokens

    @property
    def attended_moment(self) -> Tensor:
        """E[x̄ x̄ᵀ] per head, `[H, d+1, d+1]`."""
        if self.count == 0:
            raise ValueError("no calibration rows were seen")
        return self.attended / self.count

    def weighted(self, total: Tensor) -> Tensor:
        """`total / key_weight` per head (heads whose keys cost nothing: E[x̄ x̄ᵀ] instead)."""
        weight = self.key_weight[:, None, None]
        return torch.where(
            weight > 0, total / weight.clamp_min(torch.finfo(torch.float64).tiny), self.attended_moment
        )

    @property
    def key_moment(self) -> Tensor:
        """E_w[x̃ x̃ᵀ] over keys per head, `[H, d+1, d+1]`."""
        return self.weighted(self.keys)

    @property
    def query_moment(self) -> Tensor:
        """E_w[x̃ x̃ᵀ] over queries per head, `[H, d+1, d+1]`."""
        return self.weighted(self.queries)

    @property
    def key_cost(self) -> Tensor:
        """Σ_ij w_ij per query, `[H]`: what a unit score error costs relative to the attended moment."""
        return self.key_weight / max(self.count, 1)
