"""Grouping statistics and merges (spd/cluster.py) against hand-computed cases and a brute-force reference."""

import math

import pytest
import torch

from spd.cluster import (
    COMPACT_MIN,
    adjusted_rand_index,
    coactivation,
    description_length,
    hierarchical_groups,
    mdl_groups,
    mdl_merge,
    merge_cost_matrix,
    planted_mechanisms,
)

# 4 samples, 3 subcomponents: 0 and 1 always fire together, 2 fires alone once.
HAND = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)


def random_active(n: int = 200, c: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 4, generator=g) < 0.15
    return (base[:, torch.randint(4, (c,), generator=g)] & (torch.rand(n, c, generator=g) < 0.9)) | (
        torch.rand(n, c, generator=g) < 0.03
    )


def test_coactivation_counts_hand_case():
    assert coactivation(HAND).tolist() == [[2, 2, 0], [2, 2, 0], [0, 0, 1]]


def test_description_length_hand_computed():
    # {0,1},{2}: k=2 (1 index bit); s = 1/2 (rank 2), 1/4 (rank 1): 0.5 (1 + 2) + 0.25 (1 + 1) = 2.0 at alpha 1
    assert description_length(HAND, torch.tensor([0, 0, 1]), 1.0) == pytest.approx(2.0)
    # singletons: k=3; s = 1/2, 1/2, 1/4: 1.25 (log2 3 + 1)
    assert description_length(HAND, torch.tensor([0, 1, 2]), 1.0) == pytest.approx(1.25 * (math.log2(3) + 1))
    # one group: no index bits; fires on 3/4 with rank 3 -> 2.25 alpha
    assert description_length(HAND, torch.tensor([0, 0, 0]), 2.0) == pytest.approx(4.5)
    # ranks count: an APD-style rank-2 column
    assert description_length(HAND, torch.tensor([0, 1, 2]), 1.0, torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(
        1.25 * math.log2(3) + 0.5 * 2 + 0.5 + 0.25
    )


@pytest.mark.parametrize("alpha", [0.0, 0.7, 3.0])
def test_merge_cost_matrix_is_the_exact_change_in_description_length(alpha):
    active = random_active()
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6])  # some groups already merged
    groups = labels.unique()
    A = torch.stack([active[:, labels == g].any(1) for g in groups], 1)
    ranks = torch.stack([(labels == g).sum() for g in groups]).double()
    cost = merge_cost_matrix(coactivation(A), ranks, active.shape[0], alpha)
    before = description_length(active, labels, alpha)
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            merged = torch.where(labels == groups[j], groups[i], labels)
            assert cost[i, j].item() == pytest.approx(description_length(active, merged, alpha) - before, abs=1e-12)
    assert cost[0, 0] == math.inf


@pytest.mark.parametrize("c", [12, COMPACT_MIN + 44])  # the second also exercises compaction of the matrices
def test_every_greedy_merge_is_the_best_pair_and_the_recorded_mdl_is_exact(c):
    active = random_active(n=400, c=c, seed=c)
    alpha = 1.5
    hist = mdl_merge(active, alpha)
    assert len(hist.merges) == c - 1 and len(hist.mdl) == c
    steps = range(c - 1) if c <= 12 else [0, 1, 40, 150, 200, c - 60, c - 5, c - 2]
    for t in steps:
        labels = hist.labels(t)
        groups = labels.unique()
        A = torch.stack([active[:, labels == g].any(1) for g in groups], 1)
        ranks = torch.stack([(labels == g).sum() for g in groups]).double()
        best = merge_cost_matrix(coactivation(A), ranks, active.shape[0], alpha).min().item()
        assert hist.costs[t] == pytest.approx(best, abs=1e-10), t
        assert hist.mdl[t] == pytest.approx(description_length(active, labels, alpha), abs=1e-10)
        assert hist.mdl[t + 1] - hist.mdl[t] == pytest.approx(hist.costs[t], abs=1e-10)
    assert hist.labels(c - 1).unique().numel() == 1
    assert hist.best_step == min(range(c), key=lambda t: hist.mdl[t])


def test_tolerance_picks_among_near_best_pairs_only():
    active = random_active(n=300, c=14, seed=3)
    alpha, tol = 1.0, 0.3
    histories = [mdl_merge(active, alpha, tolerance=tol, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({tuple(h.merges) for h in histories}) > 1  # it is stochastic
    for hist in histories:
        for t in range(len(hist.merges)):
            labels = hist.labels(t)
            groups = labels.unique()
            A = torch.stack([active[:, labels == g].any(1) for g in groups], 1)
            ranks = torch.stack([(labels == g).sum() for g in groups]).double()
            best = merge_cost_matrix(coactivation(A), ranks, active.shape[0], alpha).min().item()
            assert hist.costs[t] <= best + tol * abs(best) + 1e-9


def test_restarts_keep_the_lowest_minimum_and_restart_zero_is_greedy():
    active = random_active(n=300, c=14, seed=4)
    best, minima = mdl_groups(active, 1.0, restarts=3, tolerance=0.3, seed=0)
    assert len(minima) == 3 and best.mdl[best.best_step] == min(minima)
    assert minima[0] == pytest.approx(min(mdl_merge(active, 1.0).mdl))


def test_always_co_firing_pieces_merge_at_any_resolution():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2000, 3, generator=g) < 0.05
    active = torch.stack([f[:, 0], f[:, 0], f[:, 0], f[:, 1], f[:, 2]], 1)  # a rank-3 mechanism and two rank-1s
    for alpha in (2.0, 50.0):
        labels = mdl_merge(active, alpha).labels().tolist()
        assert labels[0] == labels[1] == labels[2] and len(set(labels)) == 3, (alpha, labels)


def test_planted_mechanisms_are_recovered():
    active, truth = planted_mechanisms(6000, 300)
    hist, _ = mdl_groups(active, 2.0, restarts=2)
    assert adjusted_rand_index(hist.labels(), truth) >= 0.95
    assert adjusted_rand_index(hierarchical_groups(active), truth) >= 0.9


def test_hierarchical_groups_hand_case():
    active = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    # Jaccard distances: d(0,1) = 1 - 2/3, d(1,2) = 1 - 1/4, d(0,2) = 1
    assert hierarchical_groups(active, 0.5).tolist() == [0, 0, 1]
    assert hierarchical_groups(active, 0.2).tolist() == [0, 1, 2]


def test_adjusted_rand_index_hand_computed():
    # contingency {(0,0):2, (1,1):1, (1,2):1}: index 1, expected 2*1/6, max 1.5 -> (1 - 1/3) / (1.5 - 1/3) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 2], ["a", "a", "c", "b"]) == 1.0  # label names do not matter
    assert adjusted_rand_index([0, 1, 2], [0, 1, 2]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0  # worse than chance
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_rand_index([0, 1], [0])


def test_bad_input_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="non-empty"):
        mdl_merge(torch.zeros(0, 3, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        mdl_merge(HAND, -1.0)
    with pytest.raises(ValueError, match="ranks"):
        mdl_merge(HAND, 1.0, ranks=torch.ones(2))
    with pytest.raises(ValueError, match="restarts"):
        mdl_groups(HAND, 1.0, restarts=0)
