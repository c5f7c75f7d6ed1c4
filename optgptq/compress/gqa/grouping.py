"""Partitioning a layer's query heads into equal groups that will share one K/V head.

Two groupings:

- ``contiguous`` (the GQA paper's baseline): group ``i`` is heads ``i*g .. i*g+g-1``, with
  ``g = H / H_kv'`` heads per group.
- ``similarity``: heads whose keys and values are alike share a K/V head.

Similarity. For query head ``h`` let ``K_h = X W_K(h)`` and ``V_h = X W_V(h)`` be the
``[tokens, head_dim]`` keys and values it attends with over the calibration tokens ``X`` (its
own K/V head in a multi-head model; the K/V head it shares in a GQA model; ``X`` carries a
column of ones so biases count). Heads ``a`` and ``b`` score
``S[a, b] = (cos(K_a, K_b) + cos(V_a, V_b)) / 2``, the cosine of the flattened activation
matrices. The inner products come from the layer's input Gram matrix
``G = X^T X`` as ``<X W_a, X W_b> = trace(W_a^T G W_b)``, so only ``G`` is accumulated over the
calibration data. Keys are compared before RoPE: RoPE rotates every head of a token by the
same orthogonal matrix, so per-token inner products, and with them the cosines, are the same
before and after it; and the merged key is a linear mix of pre-RoPE keys anyway.

Partition. Maximise the total intra-group similarity ``sum over groups of sum_{a<b in group}
S[a, b]`` over partitions into ``H_kv'`` groups of ``g`` heads:

- exactly, by enumerating every partition, when there are at most ``EXACT_LIMIT`` of them
  (``H! / (g!^H_kv' * H_kv'!)``: 280 for 9 heads in 3 groups, 2.6 million for 16 in 4);
- otherwise greedily: seed a group with the most similar free pair, grow it by the free head
  with the largest summed similarity to its members, repeat; then improve by swap local
  search (apply the best head swap between two groups while it raises the score).

Heads with identical K and V (a GQA model expanded to multi-head attention) have similarity
1, the maximum, so the original groups are the unique optimum when other pairs score lower,
and both searches return them. Groups are returned sorted (members ascending, groups by their
first member) so the result is deterministic.
"""

from __future__ import annotations

import math

import torch

EXACT_LIMIT = 20_000
_TOL = 1e-9


def check_group_count(num_heads: int, num_kv_heads: int, target: int) -> None:
    """A target K/V head count must divide the query heads and not exceed the current K/V heads."""
    if target < 1 or num_heads % target:
        raise ValueError(f"num_kv_heads={target} must be a positive divisor of the model's "
                         f"{num_heads} attention heads")
    if target > num_kv_heads:
        raise ValueError(f"num_kv_heads={target} is more than the model's {num_kv_heads} K/V "
                         f"heads; conversion can only merge heads")


def contiguous_groups(num_heads: int, num_groups: int) -> list[list[int]]:
    """Neighbouring heads: ``[[0..g-1], [g..2g-1], ...]``."""
    g = num_heads // num_groups
    return [list(range(i * g, (i + 1) * g)) for i in range(num_groups)]


def activation_cosine(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``[H, H]`` cosines between the activations ``X W_h`` of ``weights [H, in, D]``,
    given the inputs' Gram matrix ``gram = X^T X [in, in]``."""
    w = weights.double()
    inner = torch.einsum("aid,ij,bjd->ab", w, gram.double(), w)
    norm = inner.diagonal().clamp_min(1e-30).sqrt()
    return inner / norm[:, None] / norm[None, :]


def head_similarity(k_weights: torch.Tensor, v_weights: torch.Tensor,
                    gram: torch.Tensor) -> torch.Tensor:
    """The similarity ``S`` of the module docstring, ``[H, H]`` float64."""
    return (activation_cosine(k_weights, gram) + activation_cosine(v_weights, gram)) / 2


def partition_score(sim: torch.Tensor, groups: list[list[int]]) -> float:
    """Total similarity of the pairs that share a group."""
    return sum(float(sim[a, b]) for grp in groups for i, a in enumerate(grp) for b in grp[i + 1:])


def _canonical(groups: list[list[int]]) -> list[list[int]]:
    return sorted(sorted(g) for g in groups)


def num_partitions(num_heads: int, group_size: int) -> int:
    """How many ways there are to split ``num_heads`` heads into groups of ``group_size``."""
    m = num_heads // group_size
    return math.factorial(num_heads) // (math.factorial(group_size) ** m * math.factorial(m))


def _exact(sim: list[list[float]], heads: list[int], g: int) -> tuple[float, list[list[int]]]:
    if not heads:
        return 0.0, []
    first, rest = heads[0], heads[1:]
    best: tuple[float, list[list[int]]] = (-math.inf, [])
    for mates in _combinations(rest, g - 1):
        grp = [first, *mates]
        inside = sum(sim[a][b] for i, a in enumerate(grp) for b in grp[i + 1:])
        score, tail = _exact(sim, [h for h in rest if h not in mates], g)
        if inside + score > best[0] + _TOL:
            best = (inside + score, [grp, *tail])
    return best


def _combinations(items: list[int], k: int):
    if k == 0:
        yield ()
        return
    for i in range(len(items) - k + 1):
        for tail in _combinations(items[i + 1:], k - 1):
            yield (items[i], *tail)


def _greedy(sim: list[list[float]], n: int, g: int) -> list[list[int]]:
    free = set(range(n))
    groups = []
    while free:
        a, b = max(((a, b) for a in sorted(free) for b in sorted(free) if a < b),
                   key=lambda p: sim[p[0]][p[1]])
        grp = [a, b]
        free -= {a, b}
        while len(grp) < g:
            c = max(sorted(free), key=lambda h: sum(sim[h][x] for x in grp))
            grp.append(c)
            free.discard(c)
        groups.append(grp)
    return groups


def _swap_search(sim: list[list[float]], groups: list[list[int]]) -> list[list[int]]:
    groups = [list(g) for g in groups]

    def pull(h: int, grp: list[int], without: int) -> float:
        return sum(sim[h][x] for x in grp if x != without)

    while True:
        best = (_TOL, None)
        for ia in range(len(groups)):
            for ib in range(ia + 1, len(groups)):
                ga, gb = groups[ia], groups[ib]
                for i in ga:
                    for j in gb:
                        gain = (pull(j, ga, i) + pull(i, gb, j)) - (pull(i, ga, i) + pull(j, gb, j))
                        if gain > best[0]:
                            best = (gain, (ia, i, ib, j))
        if best[1] is None:
            return groups
        ia, i, ib, j = best[1]
        groups[ia][groups[ia].index(i)] = j
        groups[ib][groups[ib].index(j)] = i


def similarity_groups(sim: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Equal groups of heads maximising intra-group similarity (see the module docstring)."""
    n = sim.shape[0]
    g = n // num_groups
    if g == 1 or num_groups == 1:
        return contiguous_groups(n, num_groups)
    table = sim.double().tolist()
    if num_partitions(n, g) <= EXACT_LIMIT:
        return _canonical(_exact(table, list(range(n)), g)[1])
    return _canonical(_swap_search(table, _greedy(table, n, g)))
