"""Subcomponents -> mechanisms: co-importance statistics and the merge procedures (pure tensor functions).

A grouping reads one boolean matrix, `active[n, c]`: whether subcomponent (column) c was causally important
(CI above a stated threshold) on sample n, over all decomposed matrices at once. A group fires on a sample when
any member fires.

Description length (bits per sample) of a partition into k groups with firing frequencies s_g and ranks r_g:

    MDL = sum_g s_g (log2 k + alpha r_g)

i.e. the bits to say which groups fired (an index of log2 k bits each) plus alpha bits per unit of rank of the
firing groups (APD's L_MDL with group size as rank; ../shared/docs/method.md §1.7, §6). Merging groups i and j
(co-firing frequency C_ij, so s_{i+j} = s_i + s_j - C_ij) changes it by

    dMDL(i, j) = S log2((k-1)/k) - C_ij log2(k-1) + alpha (s_i r_j + s_j r_i - C_ij (r_i + r_j))

(S = sum_g s_g; the s_i log2 k terms cancel). The first term is the same for every pair, so the pair order
only depends on p_ij(lam) = -lam C_ij + alpha B_ij with lam = log2(k-1). lam shrinks as groups merge and
C_ij >= 0, so an untouched pair's p_ij never decreases: a row minimum computed earlier stays a lower bound.
`mdl_merge` keeps those lower bounds per row and refreshes only the rows that could hold a (near-)best pair,
plus the merged group's row: O(k) work per merge instead of recomputing the k x k cost matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from jaxtyping import Bool, Float, Int
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.special import comb
from torch import Tensor

REFRESH_CHUNK = 32  # rows whose lower bound is refreshed together
COMPACT_MIN = 256  # below this many slots the matrices are not compacted


# ---- statistics ---------------------------------------------------------------------------------------
def coactivation(active: Bool[Tensor, "n c"]) -> Int[Tensor, "c c"]:
    """Co-importance counts A^T A (the diagonal is each column's firing count), via a sparse product."""
    a = sp.csc_matrix(active.cpu().numpy().astype(np.int32))
    return torch.from_numpy((a.T @ a).toarray().astype(np.int64))


def description_length(
    active: Bool[Tensor, "n c"], labels: Int[Tensor, " c"], alpha: float, ranks: Tensor | None = None
) -> float:
    """MDL (bits per sample) of the partition `labels` computed from scratch (the reference for tests)."""
    ranks = torch.ones(active.shape[1]) if ranks is None else ranks.double()
    groups = labels.unique()
    k = len(groups)
    index_bits = math.log2(k) if k > 1 else 0.0
    total = 0.0
    for g in groups:
        cols = labels == g
        s = active[:, cols].any(1).double().mean().item()
        total += s * (index_bits + alpha * ranks[cols].sum().item())
    return total


def merge_cost_matrix(
    coact: Int[Tensor, "k k"], ranks: Float[Tensor, " k"], n: int, alpha: float
) -> Float[Tensor, "k k"]:
    """dMDL of merging each pair of the current k groups (diagonal: inf), from raw counts. Reference for tests
    and for small problems; `mdl_merge` never builds it."""
    k = coact.shape[0]
    C = coact.double() / n
    s = C.diagonal()
    r = ranks.double()
    S = s.sum()
    lam = math.log2(k - 1) if k > 2 else 0.0
    cost = S * math.log2((k - 1) / k) - lam * C + alpha * (s[:, None] * r + s * r[:, None] - C * (r[:, None] + r))
    cost.fill_diagonal_(math.inf)
    return cost


# ---- the MDL merge -------------------------------------------------------------------------------------
def _cutoff(best: float, tolerance: float, shared: float) -> float:
    """Pair costs p up to here count as near-best: dMDL = shared + p within `tolerance` of the best dMDL (exact
    ties within float rounding always count)."""
    if math.isinf(best):
        return math.inf
    return best + tolerance * abs(best + shared) + 1e-12 * max(1.0, abs(best))


@dataclass
class MergeHistory:
    """Agglomerative merges from singletons. merges[t] = (kept, absorbed) column indices (a group is named by
    its first column); mdl[t] = description length after t merges (mdl[0]: all singletons)."""

    n_columns: int
    merges: list[tuple[int, int]]
    mdl: list[float]
    alpha: float
    costs: list[float] = field(default_factory=list)  # dMDL of each merge

    @property
    def best_step(self) -> int:
        """Number of merges at the minimum description length (the first minimum)."""
        return int(np.argmin(self.mdl))

    def labels(self, step: int | None = None) -> Int[Tensor, " c"]:
        """Group of every column after `step` merges (default: at the MDL minimum), numbered 0..k-1 by first
        column."""
        step = self.best_step if step is None else step
        parent = list(range(self.n_columns))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for keep, absorbed in self.merges[:step]:
            parent[find(absorbed)] = find(keep)
        roots = [find(a) for a in range(self.n_columns)]
        index: dict[int, int] = {}
        return torch.tensor([index.setdefault(r, len(index)) for r in roots])


def mdl_merge(
    active: Bool[Tensor, "n c"],
    alpha: float,
    ranks: Tensor | None = None,
    tolerance: float = 0.0,
    generator: torch.Generator | None = None,
    max_merges: int | None = None,
) -> MergeHistory:
    """Merge groups pairwise, each time choosing uniformly among the near-best pairs: dMDL <= best + tolerance *
    |best| (tolerance 0: greedy; exact ties still broken at random). Runs to one group (or `max_merges`) and
    records the MDL after every merge, so the minimum is chosen afterwards, not by an iteration count."""
    n, c = active.shape
    if n == 0 or c == 0:
        raise ValueError(f"active must be a non-empty [samples, subcomponents] matrix (got {tuple(active.shape)})")
    if alpha < 0 or tolerance < 0:
        raise ValueError(f"alpha and tolerance must be >= 0 (got alpha={alpha}, tolerance={tolerance})")
    G = active.cpu().bool().clone()  # group activations by slot
    C = coactivation(G).to(torch.int32 if n < 2**31 else torch.int64)  # group co-firing counts by slot
    r = torch.ones(c, dtype=torch.float64) if ranks is None else ranks.detach().cpu().double().clone()
    if r.shape != (c,):
        raise ValueError(f"ranks must have one entry per column ({c}), got shape {tuple(r.shape)}")
    s = C.diagonal().double() / n
    name = torch.arange(c)  # each slot's group name (its first column), kept through compaction
    alive = torch.ones(c, dtype=torch.bool)
    k = c
    S, R = s.sum().item(), (s * r).sum().item()
    mdl = [S * (math.log2(k) if k > 1 else 0.0) + alpha * R]
    merges: list[tuple[int, int]] = []
    costs: list[float] = []
    inf = torch.tensor(math.inf, dtype=torch.float64)

    def pair_costs(rows: Tensor, lam: float) -> Float[Tensor, "rows slots"]:
        Cr = C[rows].double() / n
        sr, rr = s[rows, None], r[rows, None]
        p = -lam * Cr + alpha * (sr * r + s * rr - Cr * (rr + r))
        p = torch.where(alive, p, inf)
        p[torch.arange(len(rows)), rows] = math.inf
        return p

    lam0 = math.log2(c - 1) if c > 2 else 0.0
    lb = torch.cat([pair_costs(ch, lam0).min(1).values for ch in torch.arange(c).split(1024)]) if c > 1 else inf[None]
    limit = c - 1 if max_merges is None else min(max_merges, c - 1)
    for _ in range(limit):
        lam = math.log2(k - 1) if k > 2 else 0.0
        shared = S * math.log2((k - 1) / k)  # the part of dMDL every pair shares
        # 1. the exact best pair and every pair within the tolerance, refreshing rows in lower-bound order
        fresh = torch.zeros(len(alive), dtype=torch.bool)
        found: list[tuple[Tensor, Tensor]] = []
        best = math.inf
        while True:
            cutoff = _cutoff(best, tolerance, shared)
            pending = torch.where(alive & ~fresh, lb, inf)
            m = int(min(REFRESH_CHUNK, int((alive & ~fresh).sum())))
            if m == 0:
                break
            vals, rows = torch.topk(pending, m, largest=False)
            rows = rows[vals <= cutoff]
            if len(rows) == 0:
                break
            p = pair_costs(rows, lam)
            lb[rows] = p.min(1).values
            fresh[rows] = True
            found.append((rows, p))
            best = min(best, lb[rows].min().item())
        cutoff = _cutoff(best, tolerance, shared)
        near = []
        for rows, p in found:
            ri, cj = torch.nonzero(p <= cutoff, as_tuple=True)
            near.append(torch.stack([torch.minimum(rows[ri], cj), torch.maximum(rows[ri], cj)]))
        cand = torch.cat(near, dim=1).unique(dim=1)
        pick = int(torch.randint(cand.shape[1], (1,), generator=generator)) if cand.shape[1] > 1 else 0
        i, j = int(cand[0, pick]), int(cand[1, pick])
        # 2. merge j into i: co-firing of the union with g is C_ig + C_jg - |A_i & A_j & A_g|
        both = torch.nonzero(G[:, i] & G[:, j]).flatten()
        triple = G[both].sum(0, dtype=C.dtype) if len(both) else torch.zeros(len(alive), dtype=C.dtype)
        row = C[i] + C[j] - triple
        row[i] = C[i, i] + C[j, j] - C[i, j]
        s_new = row[i].item() / n
        delta = shared + (
            -lam * C[i, j].item() / n + alpha * (s[i] * r[j] + s[j] * r[i] - C[i, j].item() / n * (r[i] + r[j])).item()
        )
        S += s_new - s[i].item() - s[j].item()
        R += s_new * (r[i] + r[j]).item() - (s[i] * r[i] + s[j] * r[j]).item()
        G[:, i] |= G[:, j]
        G[:, j] = False
        C[i], C[:, i] = row, row
        C[j], C[:, j] = 0, 0
        s[i], r[i] = s_new, r[i] + r[j]
        alive[j] = False
        k -= 1
        merges.append((int(name[i]), int(name[j])))
        mdl.append(S * (math.log2(k) if k > 1 else 0.0) + alpha * R)
        costs.append(delta)
        if k == 1:
            break
        # 3. lower bounds: row i is new; every other row gained the pair (., i)
        lam = math.log2(k - 1) if k > 2 else 0.0
        p_i = pair_costs(torch.tensor([i]), lam)[0]
        lb[i] = p_i.min()
        lb = torch.minimum(lb, p_i)
        if len(alive) > COMPACT_MIN and k < len(alive) // 2:
            keep = alive.nonzero().flatten()
            G, C = G[:, keep].contiguous(), C[keep][:, keep].contiguous()
            s, r, lb, name = s[keep], r[keep], lb[keep], name[keep]
            alive = torch.ones(len(keep), dtype=torch.bool)
    return MergeHistory(c, merges, mdl, alpha, costs)


def mdl_groups(
    active: Bool[Tensor, "n c"],
    alpha: float,
    ranks: Tensor | None = None,
    restarts: int = 4,
    tolerance: float = 0.05,
    seed: int = 0,
) -> tuple[MergeHistory, list[float]]:
    """Restart 0 is greedy; restarts 1.. sample among near-best pairs (`tolerance`). Returns the history whose
    minimum MDL is lowest, and every restart's minimum (to report how much the restarts disagree)."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1 (got {restarts})")
    runs = []
    for t in range(restarts):
        g = torch.Generator().manual_seed(seed + t)
        runs.append(mdl_merge(active, alpha, ranks, 0.0 if t == 0 else tolerance, g))
    minima = [h.mdl[h.best_step] for h in runs]
    return runs[int(np.argmin(minima))], minima


# ---- the alternative: hierarchical clustering of the co-importance matrix -------------------------------
def hierarchical_groups(
    active: Bool[Tensor, "n c"], max_distance: float = 0.5, method: str = "average"
) -> Int[Tensor, " c"]:
    """Agglomerative clustering on the Jaccard distance between columns' firing sets (1 - |A_i & A_j| /
    |A_i | A_j|), cut at `max_distance` (0.5: on average, members fire together at least half the time they
    fire at all). Columns that never fire are at distance 1 from everything."""
    c = active.shape[1]
    if c == 1:
        return torch.zeros(1, dtype=torch.long)
    C = coactivation(active).double()
    s = C.diagonal()
    union = s[:, None] + s[None] - C
    dist = torch.where(union > 0, 1 - C / union.clamp_min(1), torch.ones_like(C))
    dist.fill_diagonal_(0)
    iu = np.triu_indices(c, 1)
    Z = linkage(dist.numpy()[iu], method=method)
    labels = fcluster(Z, t=max_distance, criterion="distance")
    _, canon = np.unique(labels, return_inverse=True)
    return torch.from_numpy(canon.astype(np.int64))


# ---- synthetic data with known mechanisms ---------------------------------------------------------------
def planted_mechanisms(
    n: int, c: int, seed: int = 0, keep: float = 0.95, noise: float = 5e-4
) -> tuple[Bool[Tensor, "n c"], list[int]]:
    """Co-importance data with known groups (for tests and scale benchmarks): columns in planted mechanisms of 1-6
    members, each mechanism firing on 0.5-3% of samples; a member fires with its mechanism with probability `keep`,
    and spuriously with probability `noise`. Returns the data and each column's mechanism."""
    g = torch.Generator().manual_seed(seed)
    labels: list[int] = []
    while len(labels) < c:
        labels += [len(set(labels))] * int(torch.randint(1, 7, (1,), generator=g))
    lab = torch.tensor(labels[:c])
    p = 0.005 + 0.025 * torch.rand(int(lab.max()) + 1, generator=g)
    fire = torch.rand(n, len(p), generator=g) < p
    active = (fire[:, lab] & (torch.rand(n, c, generator=g) < keep)) | (torch.rand(n, c, generator=g) < noise)
    return active, lab.tolist()


# ---- agreement between partitions ---------------------------------------------------------------------
def adjusted_rand_index(a: list | Tensor, b: list | Tensor) -> float:
    """Hubert-Arabie adjusted Rand index of two labelings of the same items (1: identical partitions, ~0:
    chance). Two identical trivial partitions (all singletons, or all one group) score 1."""
    a, b = list(map(str, a)), list(map(str, b))
    if len(a) != len(b):
        raise ValueError(f"labelings differ in length ({len(a)} vs {len(b)})")
    n = len(a)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    pairs = comb(table, 2).sum()
    pa, pb = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    total = comb(n, 2)
    expected = pa * pb / total if total else 0.0
    top = (pa + pb) / 2
    if top == expected:
        return 1.0
    return float((pairs - expected) / (top - expected))
