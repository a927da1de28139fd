r"""Lesson 11: decoupled-head attention, fusing the heads of a checkpoint (DHA), P36.

Chen, Zhang, Shang, Zhang, Liu, Wang, Sun, *DHA: Learning Decoupled-Head Attention from Transformer
Checkpoints via Adaptive Heads Fusion*, 2024 (arXiv:2406.06567, NeurIPS 2024).

**The forward pass.** A layer keeps its $h$ query heads but has its own numbers of key heads $h_k$ and
value heads $h_v$, and two index maps $g_k : \{0..h-1\} \to \{0..h_k-1\}$, $g_v : \{0..h-1\} \to
\{0..h_v-1\}$ that say which key head and which value head each query head reads:

$$O_i = \operatorname{softmax}\!\Big(\frac{Q_i K_{g_k(i)}^\top}{\sqrt d}\Big)\, V_{g_v(i)}, \qquad
  Y = [O_1, \dots, O_h]\, W^O .$$

With $g_k = g_v = \mathrm{id}$ this is multi-head attention; with $g_k(i) = g_v(i) = \lfloor i h_{kv}/h
\rfloor$ it is grouped-query attention (lesson 10). DHA lets the maps differ between keys and values
and between layers, so each layer spends its key/value budget where its heads are least redundant.
The KV cache of a layer holds $(h_k + h_v)\, d$ numbers per token instead of $2hd$.

**Fusing a checkpoint.** Heads of a trained MHA layer are grouped by similarity (the key heads and the
value heads separately). During fusion every query head $i$ reads its own *fused* key head, a linear
combination of the checkpoint's key heads in its group $G(i)$,

$$\widetilde W_K^{(i)} = \sum_{j \in G(i)} \omega_{ij}\, W_K^{(j)}, \qquad \omega_{ij} = [i = j]
  \text{ at the start,}$$

(the same for values), so the model starts out *exactly* equal to the checkpoint. A fusion loss pulls
the fused heads of a group towards each other,

$$\mathcal L_\text{fuse} = \frac{\sum_g \sum_{i \in G_g} \lVert \widetilde W^{(i)} - \overline W_g \rVert_F^2}
  {\sum_i \lVert \widetilde W^{(i)} \rVert_F^2}, \qquad \overline W_g = \frac{1}{|G_g|}\sum_{i\in G_g} \widetilde W^{(i)},$$

while the task loss keeps the model working; once the heads of a group agree, the group is
*collapsed* into the one head $\overline W_g$, and the layer becomes decoupled-head attention with
$g(i) = $ the group of $i$. Grouped-query attention's usual start (Ainslie et al., 2023) instead
mean-pools each group at once, $\omega_{ij} = 1/|G(i)|$, which changes the model's function before
any training.

What follows the paper and what is simplified (the lesson says it too). Checked against the paper's
abstract and figure captions: the forward pass, the decoupled per-layer K/V budgets, the three stages
(search, fusion, continued pre-training), a linear fusion operator that preserves the checkpoint's
function at the start, a fusion loss that makes the heads of a group agree before they are merged, and a
search under an augmented-Lagrangian constraint towards the head budget. Not checked against the paper's
equations, and this library's own choices: the similarity measure (linear CKA of the heads' parameter
matrices, which secondary accounts attribute to the paper), the exact fusion loss (the relative squared
distance above), and the search, replaced here by agglomerative clustering (:func:`cluster_heads`) and
a greedy merge of the most similar groups across all layers (:func:`allocate_budgets`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..core import attention
from ..registry import register_mechanism

# --------------------------------------------------------------------------------------------------
# index maps and the functional forward pass
# --------------------------------------------------------------------------------------------------


def check_index_map(name: str, index_map, num_query_heads: int, num_kv_heads: int | None = None) -> list[int]:
    """Check that ``index_map`` gives, for each of ``num_query_heads`` query heads, a head in ``[0, num_kv_heads)``.

    With ``num_kv_heads=None`` the map must use every head from 0 to its maximum (a *grouping*: no
    empty group). Returns the map as a list of ints.
    """
    if isinstance(index_map, torch.Tensor):
        if index_map.dtype.is_floating_point or index_map.dim() != 1:
            raise TypeError(f"{name}: expected a 1-d integer tensor or a list of ints, got a tensor of "
                            f"dtype {index_map.dtype} and shape {tuple(index_map.shape)}")
        index_map = index_map.tolist()
    if not isinstance(index_map, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in index_map):
        raise TypeError(f"{name}: expected a list of ints (one head index per query head), got {index_map!r}")
    index_map = list(index_map)
    if len(index_map) != num_query_heads:
        raise ValueError(f"{name}: expected one entry per query head ({num_query_heads}), "
                         f"got {len(index_map)}: {index_map}")
    if num_kv_heads is None:
        num_kv_heads = max(index_map) + 1 if index_map else 0
        missing = sorted(set(range(num_kv_heads)) - set(index_map))
        if missing:
            raise ValueError(f"{name}: expected groups numbered 0..{num_kv_heads - 1} with none empty, "
                             f"got {index_map} (no query head in group {missing})")
    bad = [i for i in index_map if not 0 <= i < num_kv_heads]
    if bad:
        raise ValueError(f"{name}: expected head indices in [0, {num_kv_heads}) ({num_kv_heads} heads), "
                         f"got {index_map} (out of range: {bad})")
    return index_map


def grouped_query_map(num_heads: int, num_kv_heads: int) -> list[int]:
    r"""GQA's map $g(i) = \lfloor i\, h_{kv} / h \rfloor$ (consecutive query heads share a head; uneven
    groups when $h_{kv}$ does not divide $h$)."""
    check_positive_int("num_heads", num_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_kv_heads > num_heads:
        raise ValueError(f"num_kv_heads: expected at most num_heads={num_heads} heads (a budget cannot "
                         f"exceed the query heads), got {num_kv_heads}")
    return [i * num_kv_heads // num_heads for i in range(num_heads)]


def decoupled_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_map, value_map, *,
                             causal: bool = False, mask: torch.Tensor | None = None,
                             return_weights: bool = False):
    r"""$O_i = \operatorname{softmax}(Q_i K_{g_k(i)}^\top / \sqrt d)\, V_{g_v(i)}$ for every query head $i$.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k: keys ``(B, Hk, Lk, D)``, any number ``Hk >= 1`` of key heads.
        v: values ``(B, Hv, Lk, Dv)``, any number ``Hv >= 1`` of value heads.
        key_map: ``H`` ints in ``[0, Hk)``, $g_k$.
        value_map: ``H`` ints in ``[0, Hv)``, $g_v$.
        causal, mask: as in :func:`attnlib.attention`.
        return_weights: also return the weights ``(B, H, Lq, Lk)``.

    Returns ``(B, H, Lq, Dv)`` (and the weights).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4)
    heads = q.shape[1]
    key_map = check_index_map("key_map", key_map, heads, k.shape[1])
    value_map = check_index_map("value_map", value_map, heads, v.shape[1])
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k, v: expected the same number of keys, got {k.shape[2]} and {v.shape[2]}")
    # K_{g_k(i)}, V_{g_v(i)} gathered per query head: then it is plain multi-head attention
    k_per_query, v_per_query = _gather_heads(k, key_map), _gather_heads(v, value_map)
    return attention(q, k_per_query, v_per_query, causal=causal, mask=mask, return_weights=return_weights)


def _gather_heads(x: torch.Tensor, index_map: list[int]) -> torch.Tensor:
    if index_map == list(range(x.shape[1])):
        return x  # the identity map: no copy, so that MHA is reproduced bit for bit
    return x.index_select(1, torch.tensor(index_map, device=x.device))


def kv_cache_per_token(num_key_heads: int, num_value_heads: int, head_dim: int) -> int:
    r"""Numbers a layer caches per token: $(h_k + h_v)\,d$ (multi-head attention: $2hd$)."""
    for name, value in (("num_key_heads", num_key_heads), ("num_value_heads", num_value_heads),
                        ("head_dim", head_dim)):
        check_positive_int(name, value)
    return (num_key_heads + num_value_heads) * head_dim


# --------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------


def _resolve_map(name: str, index_map, budget, num_heads: int, budget_name: str) -> tuple[list[int], int]:
    if index_map is not None and budget is not None:
        raise ValueError(f"{name}, {budget_name}: expected at most one of them, got both "
                         f"({name}={index_map!r}, {budget_name}={budget!r})")
    if index_map is None:
        budget = num_heads if budget is None else budget
        check_positive_int(budget_name, budget)
        return grouped_query_map(num_heads, budget), budget
    index_map = check_index_map(name, index_map, num_heads)
    return index_map, max(index_map) + 1


class DecoupledHeadAttention(nn.Module):
    r"""Decoupled-head self-attention (DHA), a token mixer ``(B, L, dim) -> (B, L, dim)``.

    $h$ query heads; $h_k$ key heads and $h_v$ value heads; query head $i$ reads key head
    ``key_map[i]`` and value head ``value_map[i]`` (see the module docstring for the equation).

    Args:
        dim: model width, a multiple of ``num_heads``; the head size is ``dim // num_heads``.
        num_heads: query heads $h$.
        key_map, value_map: $g_k$, $g_v$ as lists of ``num_heads`` ints; every head from 0 to the
            maximum must be used. Give a map or a budget, not both.
        num_key_heads, num_value_heads: budgets $h_k$, $h_v$ (at most ``num_heads``) with GQA's
            consecutive grouping. Default: ``num_heads`` (multi-head attention).
        causal: each token sees only itself and earlier tokens.
        bias: whether the projections have biases.
    """

    def __init__(self, dim: int, num_heads: int, *, key_map: Sequence[int] | None = None,
                 value_map: Sequence[int] | None = None, num_key_heads: int | None = None,
                 num_value_heads: int | None = None, causal: bool = False, bias: bool = False):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        self.key_map, self.num_key_heads = _resolve_map("key_map", key_map, num_key_heads, num_heads,
                                                        "num_key_heads")
        self.value_map, self.num_value_heads = _resolve_map("value_map", value_map, num_value_heads, num_heads,
                                                            "num_value_heads")
        self.dim, self.num_heads, self.head_dim, self.causal = dim, num_heads, dim // num_heads, causal
        d = self.head_dim
        self.q_proj = nn.Linear(dim, num_heads * d, bias=bias)
        self.k_proj = nn.Linear(dim, self.num_key_heads * d, bias=bias)
        self.v_proj = nn.Linear(dim, self.num_value_heads * d, bias=bias)
        self.out_proj = nn.Linear(num_heads * d, dim, bias=bias)
        self.last_weights: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, key_heads={self.num_key_heads}, value_heads={self.num_value_heads}, "
                f"key_map={self.key_map}, value_map={self.value_map}, causal={self.causal}")

    def kv_cache_per_token(self) -> int:
        r"""$(h_k + h_v)\, d$ numbers cached per token."""
        return kv_cache_per_token(self.num_key_heads, self.num_value_heads, self.head_dim)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        """Mix ``x (B, L, dim)``; returns ``(B, L, dim)`` (and the weights ``(B, H, L, L)``)."""
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (the model width), got shape {tuple(x.shape)}")
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(x), self.num_key_heads)
        v = self._split(self.v_proj(x), self.num_value_heads)
        out, weights = decoupled_head_attention(q, k, v, self.key_map, self.value_map, causal=self.causal,
                                                mask=mask, return_weights=True)
        self.last_weights = weights.detach()
        # Y = [O_1 .. O_h] W^O
        out = self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return (out, weights) if return_weights else out


# --------------------------------------------------------------------------------------------------
# head similarity, clustering, budgets
# --------------------------------------------------------------------------------------------------


def head_weights(projection: nn.Linear, num_heads: int) -> torch.Tensor:
    r"""The per-head parameter matrices $W^{(i)} \in \mathbb R^{d \times \text{dim}}$ of a projection:
    ``(num_heads, d, dim)`` (rows ``i*d .. (i+1)*d`` of ``projection.weight``)."""
    weight = projection.weight
    if weight.shape[0] % num_heads:
        raise ValueError(f"num_heads: expected a divisor of the projection's {weight.shape[0]} outputs, got {num_heads}")
    return weight.view(num_heads, weight.shape[0] // num_heads, weight.shape[1])


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Linear centered kernel alignment (Kornblith et al., 2019) of ``x (n, p)`` and ``y (n, q)``.

    Rows are the $n$ shared samples; after centring each column over the samples,

    $$\operatorname{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}{\lVert X^\top X \rVert_F\, \lVert Y^\top Y \rVert_F} \in [0, 1].$$

    It is 1 when $Y = XR$ for an orthogonal $R$ times a positive scale, so two heads that differ only by a
    rotation of their $d$ outputs (which the query or output projection can undo) count as the same.
    Returns a 0-d tensor (0 if either input is constant).
    """
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: expected the same number of rows (samples), got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype:
        raise TypeError(f"x, y: expected one dtype, got {x.dtype} and {y.dtype}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
    cross = (y.transpose(0, 1) @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.transpose(0, 1) @ x) * torch.linalg.matrix_norm(y.transpose(0, 1) @ y)
    return torch.where(norm > 0, cross / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(norm))


def head_similarity(heads: torch.Tensor) -> torch.Tensor:
    r"""Pairwise linear CKA of the heads' parameter matrices: ``heads (H, d, dim) -> (H, H)``.

    Head $i$'s matrix is read as $\text{dim}$ samples of $d$ features, $X_i = (W^{(i)})^\top$.
    """
    check_tensor("heads", heads, ndim=3)
    n = heads.shape[0]
    sim = torch.empty(n, n, dtype=heads.dtype, device=heads.device)
    for i in range(n):
        for j in range(n):
            sim[i, j] = linear_cka(heads[i].transpose(0, 1), heads[j].transpose(0, 1))
    return sim


def _merge_cost(similarity: torch.Tensor, a: list[int], b: list[int]) -> float:
    # average linkage: the mean dissimilarity 1 - S over the pairs of the two groups
    return float(1.0 - similarity[a][:, b].mean())


def _as_groups(clusters: list[list[int]], num_heads: int) -> list[int]:
    # number groups by their smallest head, so that the result does not depend on merge order
    groups = [0] * num_heads
    for g, members in enumerate(sorted(clusters, key=min)):
        for i in members:
            groups[i] = g
    return groups


def _check_similarity(similarity) -> None:
    check_tensor("similarity", similarity, ndim=2)
    if similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity: expected a square (heads, heads) matrix, got shape {tuple(similarity.shape)}")


def cluster_heads(similarity: torch.Tensor, num_groups: int) -> list[int]:
    r"""Group $H$ heads into ``num_groups`` clusters by agglomerative clustering (average linkage).

    Start with one group per head; repeatedly merge the two groups with the smallest mean
    dissimilarity $1 - S_{ij}$ (ties: the lowest indices). Returns the group of each head, ``H`` ints,
    numbered by each group's smallest head.
    """
    _check_similarity(similarity)
    n = similarity.shape[0]
    check_positive_int("num_groups", num_groups)
    if num_groups > n:
        raise ValueError(f"num_groups: expected at most {n} (the number of heads), got {num_groups}")
    clusters = [[i] for i in range(n)]
    while len(clusters) > num_groups:
        costs = [(_merge_cost(similarity, clusters[a], clusters[b]), a, b)
                 for a in range(len(clusters)) for b in range(a + 1, len(clusters))]
        _, a, b = min(costs)
        clusters[a] = clusters[a] + clusters.pop(b)
    return _as_groups(clusters, n)


def allocate_budgets(similarities: dict, total_heads: int) -> dict:
    r"""Share a total head budget among several head sets (the key and value heads of every layer).

    A simplified stand-in for the paper's learned search: every set starts with one group per head;
    repeatedly the single cheapest merge over *all* sets (smallest average-linkage dissimilarity) is
    made, until ``total_heads`` groups remain in all. Sets whose heads are redundant lose heads first.

    Args:
        similarities: ``{name: (H_name, H_name) similarity}``, e.g. ``{("layer 0", "key"): S, ...}``.
        total_heads: groups to keep in all, from ``len(similarities)`` (one each) to the total head count.

    Returns ``{name: groups}`` with ``groups`` the group of each head as in :func:`cluster_heads`.
    """
    if not isinstance(similarities, dict) or not similarities:
        raise TypeError(f"similarities: expected a non-empty dict {{name: (H, H) tensor}}, got {type(similarities).__name__}")
    for sim in similarities.values():
        _check_similarity(sim)
    total = sum(s.shape[0] for s in similarities.values())
    check_positive_int("total_heads", total_heads)
    if not len(similarities) <= total_heads <= total:
        raise ValueError(f"total_heads: expected from {len(similarities)} (one head per set) to {total} "
                         f"(every head kept), got {total_heads}")
    clusters = {name: [[i] for i in range(s.shape[0])] for name, s in similarities.items()}
    names = list(similarities)
    for _ in range(total - total_heads):
        best = None
        for order, name in enumerate(names):
            groups, sim = clusters[name], similarities[name]
            for a in range(len(groups)):
                for b in range(a + 1, len(groups)):
                    key = (_merge_cost(sim, groups[a], groups[b]), order, a, b)
                    best = key if best is None or key < best else best
        _, order, a, b = best
        groups = clusters[names[order]]
        groups[a] = groups[a] + groups.pop(b)
    return {name: _as_groups(clusters[name], similarities[name].shape[0]) for name in names}


# --------------------------------------------------------------------------------------------------
# fusion: linear combinations of the checkpoint's heads, the fusion loss, the collapse
# --------------------------------------------------------------------------------------------------


def group_mask(groups: Sequence[int]) -> torch.Tensor:
    r"""$M_{ij} = [G(i) = G(j)]$, ``(H, H)`` bool: which heads may be combined into head $i$."""
    g = torch.tensor(list(groups))
    return g[:, None] == g[None, :]


def fuse_heads(heads: torch.Tensor, omega: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    r"""$\widetilde W^{(i)} = \sum_{j \in G(i)} \omega_{ij} W^{(j)}$: ``heads (H, d, dim)``, ``omega (H, H)`` -> ``(H, d, dim)``.

    Entries of ``omega`` outside a head's group are ignored (masked to zero).
    """
    check_tensor("heads", heads, ndim=3)
    check_tensor("omega", omega, ndim=2)
    n = heads.shape[0]
    groups = check_index_map("groups", groups, n)
    if omega.shape != (n, n):
        raise ValueError(f"omega: expected shape ({n}, {n}) (heads, heads), got {tuple(omega.shape)}")
    weights = omega * group_mask(groups).to(omega.device, omega.dtype)
    # W~_i = sum_j omega_ij [G(i) = G(j)] W_j
    return torch.einsum("ij,jdm->idm", weights, heads)


def fusion_loss(fused: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    r"""$\sum_g \sum_{i\in G_g} \lVert \widetilde W^{(i)} - \overline W_g \rVert_F^2 \,/\, \sum_i \lVert \widetilde W^{(i)} \rVert_F^2$.

    ``fused (H, d, dim)``; 0 exactly when the heads of every group are equal. The denominator makes the
    loss blind to a common scale, so it cannot be lowered by shrinking every head.
    """
    check_tensor("fused", fused, ndim=3)
    n = fused.shape[0]
    groups = check_index_map("groups", groups, n)
    index = torch.tensor(groups, device=fused.device)
    num_groups = max(groups) + 1
    sums = torch.zeros(num_groups, *fused.shape[1:], dtype=fused.dtype, device=fused.device).index_add(0, index, fused)
    counts = torch.bincount(index, minlength=num_groups).to(fused.dtype)
    means = sums / counts[:, None, None]
    spread = (fused - means[index]).pow(2).sum()
    return spread / fused.pow(2).sum().clamp_min(torch.finfo(fused.dtype).tiny)


def collapse_heads(fused: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    r"""One head per group, the mean $\overline W_g$ of its fused heads: ``(H, d, dim) -> (G, d, dim)``.

    When the heads of a group have converged (equal), this loses nothing.
    """
    check_tensor("fused", fused, ndim=3)
    groups = check_index_map("groups", groups, fused.shape[0])
    index = torch.tensor(groups, device=fused.device)
    num_groups = max(groups) + 1
    sums = torch.zeros(num_groups, *fused.shape[1:], dtype=fused.dtype, device=fused.device).index_add(0, index, fused)
    return sums / torch.bincount(index, minlength=num_groups).to(fused.dtype)[:, None, None]


class FusingHeadAttention(nn.Module):
    r"""The training-time form of DHA: multi-head attention whose key and value heads are fused linearly.

    Query head $i$ reads the fused key head $\widetilde W_K^{(i)} = \sum_{j\in G_k(i)} \omega^K_{ij} W_K^{(j)}$ and
    the fused value head $\widetilde W_V^{(i)}$ likewise. With ``omega`` the identity (the default) it is
    exactly multi-head attention. In training it stores ``aux_loss`` $= \lambda\,(\mathcal L_\text{fuse}^K +
    \mathcal L_\text{fuse}^V)$, which :func:`attnlib.train` adds to the task loss. :meth:`collapse` turns
    it into a :class:`DecoupledHeadAttention` with one key (value) head per key (value) group.

    Args:
        dim, num_heads, causal, bias: as in :class:`DecoupledHeadAttention`.
        key_groups, value_groups: the group of each head (``num_heads`` ints, no empty group);
            default: consecutive pairs, $G(i) = \lfloor i/2 \rfloor$.
        fusion_weight: $\lambda \ge 0$.
        omega_init: ``"identity"`` (DHA: start equal to MHA) or ``"mean"`` (start equal to mean-pooled GQA).
    """

    def __init__(self, dim: int, num_heads: int, *, key_groups: Sequence[int] | None = None,
                 value_groups: Sequence[int] | None = None, fusion_weight: float = 1.0,
                 omega_init: str = "identity", causal: bool = False, bias: bool = False):
        super().__init__()
        self.attn = DecoupledHeadAttention(dim, num_heads, causal=causal, bias=bias)
        pairs = [i // 2 for i in range(num_heads)]
        self.key_groups = check_index_map("key_groups", pairs if key_groups is None else key_groups, num_heads)
        self.value_groups = check_index_map("value_groups", pairs if value_groups is None else value_groups,
                                            num_heads)
        if isinstance(fusion_weight, bool) or not isinstance(fusion_weight, (int, float)) or fusion_weight < 0:
            raise ValueError(f"fusion_weight: expected a number >= 0, got {fusion_weight!r}")
        if omega_init not in ("identity", "mean"):
            raise ValueError(f"omega_init: expected 'identity' or 'mean', got {omega_init!r}")
        self.fusion_weight = float(fusion_weight)
        self.omega_key = nn.Parameter(self._initial_omega(self.key_groups, omega_init))
        self.omega_value = nn.Parameter(self._initial_omega(self.value_groups, omega_init))
        self.aux_loss: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    @staticmethod
    def _initial_omega(groups: list[int], how: str) -> torch.Tensor:
        mask = group_mask(groups).float()
        return torch.eye(len(groups)) if how == "identity" else mask / mask.sum(1, keepdim=True)

    @classmethod
    def from_attention(cls, module: nn.Module, *, key_groups: Sequence[int], value_groups: Sequence[int],
                       fusion_weight: float = 1.0, omega_init: str = "identity") -> FusingHeadAttention:
        """Start fusion from a trained multi-head attention module (``MultiHeadAttention`` or a
        :class:`DecoupledHeadAttention` with identity maps), copying its weights."""
        kv_heads = (getattr(module, "num_kv_heads", None), getattr(module, "num_key_heads", None),
                    getattr(module, "num_value_heads", None))
        if any(h not in (None, module.num_heads) for h in kv_heads) or \
                getattr(module, "key_map", list(range(module.num_heads))) != list(range(module.num_heads)) or \
                getattr(module, "value_map", list(range(module.num_heads))) != list(range(module.num_heads)):
            raise ValueError("module: expected multi-head attention (as many key and value heads as query heads, "
                             f"identity maps), got {module.__class__.__name__} with key/value heads {kv_heads}")
        fusing = cls(module.dim, module.num_heads, key_groups=key_groups, value_groups=value_groups,
                     fusion_weight=fusion_weight, omega_init=omega_init, causal=module.causal,
                     bias=module.q_proj.bias is not None)
        fusing.attn.load_state_dict(module.state_dict())
        return fusing.to(module.q_proj.weight.device, module.q_proj.weight.dtype)

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$(\widetilde W_K, \widetilde W_V)$, each ``(H, d, dim)``."""
        h = self.num_heads
        wk = fuse_heads(head_weights(self.attn.k_proj, h), self.omega_key, self.key_groups)
        wv = fuse_heads(head_weights(self.attn.v_proj, h), self.omega_value, self.value_groups)
        return wk, wv

    def _fused_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.attn.k_proj.bias is None:
            return None, None
        h, d = self.num_heads, self.attn.head_dim
        bk = fuse_heads(self.attn.k_proj.bias.view(h, d, 1), self.omega_key, self.key_groups)
        bv = fuse_heads(self.attn.v_proj.bias.view(h, d, 1), self.omega_value, self.value_groups)
        return bk.reshape(-1), bv.reshape(-1)

    def fusion_loss(self) -> torch.Tensor:
        r"""$\mathcal L_\text{fuse}^K + \mathcal L_\text{fuse}^V$ of the current fused heads (no $\lambda$)."""
        wk, wv = self.fused_weights()
        return fusion_loss(wk, self.key_groups) + fusion_loss(wv, self.value_groups)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        """``x (B, L, dim) -> (B, L, dim)``; every query head reads its own fused key and value head."""
        attn = self.attn
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != attn.dim:
            raise ValueError(f"x: expected last dim {attn.dim} (the model width), got shape {tuple(x.shape)}")
        wk, wv = self.fused_weights()
        bk, bv = self._fused_biases()
        q = attn._split(attn.q_proj(x), attn.num_heads)
        k = attn._split(nn.functional.linear(x, wk.reshape(-1, attn.dim), bk), attn.num_heads)
        v = attn._split(nn.functional.linear(x, wv.reshape(-1, attn.dim), bv), attn.num_heads)
        out, weights = attention(q, k, v, causal=attn.causal, mask=mask, return_weights=True)
        self.last_weights = weights.detach()
        if self.training and self.fusion_weight > 0:
            # the fusion loss, weighted, for attnlib.train to add to the task loss
            self.aux_loss = self.fusion_weight * (fusion_loss(wk, self.key_groups) + fusion_loss(wv, self.value_groups))
        else:
            self.aux_loss = None
        out = attn.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return (out, weights) if return_weights else out

    @torch.no_grad()
    def collapse(self) -> DecoupledHeadAttention:
        r"""The :class:`DecoupledHeadAttention` with $g_k$ = ``key_groups``, $g_v$ = ``value_groups`` and each
        group's head the mean of its fused heads (exact when the group has converged)."""
        attn = self.attn
        wk, wv = self.fused_weights()
        bk, bv = self._fused_biases()
        out = DecoupledHeadAttention(attn.dim, attn.num_heads, key_map=self.key_groups, value_map=self.value_groups,
                                     causal=attn.causal, bias=attn.q_proj.bias is not None)
        out = out.to(wk.device, wk.dtype)
        out.q_proj.load_state_dict(attn.q_proj.state_dict())
        out.out_proj.load_state_dict(attn.out_proj.state_dict())
        out.k_proj.weight.copy_(collapse_heads(wk, self.key_groups).reshape(-1, attn.dim))
        out.v_proj.weight.copy_(collapse_heads(wv, self.value_groups).reshape(-1, attn.dim))
        if bk is not None:
            out.k_proj.bias.copy_(collapse_heads(bk.view(-1, attn.head_dim, 1), self.key_groups).reshape(-1))
            out.v_proj.bias.copy_(collapse_heads(bv.view(-1, attn.head_dim, 1), self.value_groups).reshape(-1))
        return out


def mean_pooled_attention(module: nn.Module, *, key_groups: Sequence[int],
                          value_groups: Sequence[int]) -> DecoupledHeadAttention:
    r"""GQA's conversion (Ainslie et al., 2023) generalised to any groups: each group's key (value) head is
    the mean of its members' heads, at once. Returns a :class:`DecoupledHeadAttention`."""
    return FusingHeadAttention.from_attention(module, key_groups=key_groups, value_groups=value_groups,
                                              omega_init="mean").collapse()


# --------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------


def _check_layer_groups(model: nn.Module, name: str, layer_groups) -> list:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model: expected a TinyTransformer (with .blocks), got {type(model).__name__}")
    if not isinstance(layer_groups, (list, tuple)) or len(layer_groups) != len(blocks):
        raise ValueError(f"{name}: expected one grouping per layer ({len(blocks)}), got {layer_groups!r}")
    return list(layer_groups)


def convert_model(model: nn.Module, key_groups: Sequence, value_groups: Sequence, *, how: str = "fuse",
                  fusion_weight: float = 1.0) -> nn.Module:
    r"""A copy of a trained multi-head ``TinyTransformer`` whose attention layers are converted.

    Args:
        model: the checkpoint (left unchanged).
        key_groups, value_groups: one grouping per layer (``num_heads`` ints each): per-layer budgets.
        how: ``"fuse"`` (DHA: :class:`FusingHeadAttention` with identity $\omega$, equal to the checkpoint)
            or ``"mean"`` (GQA: :func:`mean_pooled_attention`, collapsed at once).
        fusion_weight: $\lambda$ for ``"fuse"``.
    """
    key_groups = _check_layer_groups(model, "key_groups", key_groups)
    value_groups = _check_layer_groups(model, "value_groups", value_groups)
    if how not in ("fuse", "mean"):
        raise ValueError(f"how: expected 'fuse' or 'mean', got {how!r}")
    converted = copy.deepcopy(model)
    for block, kg, vg in zip(converted.blocks, key_groups, value_groups):
        if how == "fuse":
            block.mixer = FusingHeadAttention.from_attention(block.mixer, key_groups=kg, value_groups=vg,
                                                             fusion_weight=fusion_weight)
        else:
            block.mixer = mean_pooled_attention(block.mixer, key_groups=kg, value_groups=vg)
    return converted


def collapse_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`FusingHeadAttention` collapsed into :class:`DecoupledHeadAttention`."""
    collapsed = copy.deepcopy(model)
    for block in collapsed.blocks:
        if isinstance(block.mixer, FusingHeadAttention):
            block.mixer = block.mixer.collapse()
    return collapsed


def kv_cache_per_layer(model: nn.Module) -> list[int]:
    r"""Numbers cached per token in each layer of a ``TinyTransformer`` ($(h_k + h_v) d$; a fusing layer
    counts as its collapsed form)."""
    sizes = []
    for block in model.blocks:
        mixer = block.mixer
        if isinstance(mixer, FusingHeadAttention):
            sizes.append(kv_cache_per_token(max(mixer.key_groups) + 1, max(mixer.value_groups) + 1,
                                            mixer.attn.head_dim))
        elif isinstance(mixer, DecoupledHeadAttention):
            sizes.append(mixer.kv_cache_per_token())
        else:
            kv = getattr(mixer, "num_kv_heads", mixer.num_heads)
            sizes.append(kv_cache_per_token(kv, kv, mixer.head_dim))
    return sizes


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------


@register_mechanism("dha", paper="P36", lesson="11", supports_causal=True,
                    summary="decoupled-head attention: per-layer key/value budgets and maps key_map=, value_map= "
                            "(or num_key_heads=, num_value_heads=); default MHA")
def build_dha(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return DecoupledHeadAttention(dim, num_heads, causal=causal, **options)


@register_mechanism("dha-fusion", paper="P36", lesson="11", supports_causal=True,
                    summary="DHA's fusion stage: heads fused linearly within key_groups=, value_groups= "
                            "(default pairs), fusion loss as aux_loss; .collapse() gives 'dha'")
def build_dha_fusion(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return FusingHeadAttention(dim, num_heads, causal=causal, **options)


__all__ = [
    "DecoupledHeadAttention", "FusingHeadAttention", "decoupled_head_attention", "grouped_query_map",
    "check_index_map", "kv_cache_per_token", "head_weights", "linear_cka", "head_similarity", "cluster_heads",
    "allocate_budgets", "group_mask", "fuse_heads", "fusion_loss", "collapse_heads", "mean_pooled_attention",
    "convert_model", "collapse_model", "kv_cache_per_layer",
]
