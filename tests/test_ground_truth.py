import pytest
import torch

from spd.ground_truth import (
    alive_counts,
    dense_ci_entries_below,
    dense_ci_error,
    firing_density,
    identity_ci_error,
    mmcs_ml2r,
    orphaned_features,
)


def test_identity_ci_error_is_permutation_invariant():
    ci = torch.zeros(3, 6)
    ci[0, 4], ci[1, 0], ci[2, 2] = 1.0, 0.95, 1.0
    assert identity_ci_error(ci) == 0
    ci[0, 1] = 0.3  # one off-diagonal entry above tolerance
    assert identity_ci_error(ci) == 1
    ci[1, 0] = 0.85  # a diagonal entry below 1 - tol
    assert identity_ci_error(ci) == 2
    assert identity_ci_error(ci, tol=0.35) == 0


def test_dense_ci_error():
    ci = torch.zeros(4, 5)
    ci[:, 1] = 1.0
    ci[:, 3] = 0.95
    assert dense_ci_error(ci, k=2) == 0
    ci[2, 3] = 0.5  # one of the k is below 1 - tol on one probe: allowed (reference definition) ...
    assert dense_ci_error(ci, k=2) == 0
    assert dense_ci_entries_below(ci, k=2) == 1  # ... but reported
    ci[:, 3] = 0.85  # one of the k never reaches 1 - tol
    ci[0, 0] = 0.2  # a should-be-dead one fires
    assert dense_ci_error(ci, k=2) == 2


def test_mmcs_ml2r_exact_and_scaled():
    torch.manual_seed(0)
    W = torch.randn(5, 2)  # x @ W orientation: 5 features in, 2 hidden out
    # one subcomponent per feature: V = e_f, U = W[f]; plus extra zero subcomponents
    V = torch.zeros(5, 8)
    U = torch.zeros(8, 2)
    V[torch.arange(5), torch.arange(5)] = 1.0
    U[:5] = W
    mm, ml = mmcs_ml2r(V, U, W, "in", list(range(5)))
    assert mm == pytest.approx(1.0) and ml == pytest.approx(1.0)
    mm, ml = mmcs_ml2r(V, U * 0.5, W, "in", list(range(5)))
    assert mm == pytest.approx(1.0) and ml == pytest.approx(0.5)
    # axis "out": the transposed problem (W^T, U^T, V^T) gives the same numbers
    mm2, ml2 = mmcs_ml2r(U.T, V.T, W.T, "out", list(range(5)))
    assert mm2 == pytest.approx(1.0) and ml2 == pytest.approx(1.0)
    # a single subcomponent equal to all of W is not per-feature
    mm3, _ = mmcs_ml2r(torch.ones(5, 1), W.sum(0, keepdim=True), W, "in", list(range(5)))
    assert mm3 < 0.9


def test_orphaned_features_by_hand():
    W = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # x @ W; row norms 5, 1, 2
    V, U = torch.zeros(3, 12), torch.zeros(12, 2)
    V[0, 0], U[0] = 1.0, W[0]  # feature 0: all in subcomponent 0
    V[1, 1:11], U[1:11] = 0.15, W[1]  # feature 1: ten pieces of 0.15 |W_1| each
    V[2, 11], U[11] = 1.0, torch.tensor([0.0, 1.0])  # feature 2: one piece of half of it
    assert orphaned_features(V, U, W, "in", [0, 1, 2]) == [1]
    assert orphaned_features(V, U, W, "in", [0, 2]) == []
    assert orphaned_features(V, U, W, "in", [0, 1, 2], min_ratio=0.6) == [1, 2]
    # rank 2: subcomponents (2, 3), (4, 5), ... form one component each, whose piece of feature 1 is 0.3 |W_1|
    assert orphaned_features(V, U, W, "in", [0, 1, 2], rank=2) == []
    assert orphaned_features(U.T, V.T, W.T, "out", [0, 1, 2]) == [1]  # the transposed problem


def test_alive_counts():
    a = {"m": torch.tensor([[0.0, 0.5, 0.05], [0.0, 0.0, 0.2]])}
    b = {"m": torch.tensor([[0.11, 0.0, 0.0]])}
    assert alive_counts([a], 0.1) == {"m": 2}
    assert alive_counts([a, b], 0.1) == {"m": 3}
    # densities over the 3 inputs: [1/3, 1/3, 1/3]; over 2 inputs of a: [0, 1/2, 1/2]
    assert firing_density([a, b], 0.1)["m"].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert alive_counts([a], 0.1, min_density=0.4) == {"m": 2}
    assert alive_counts([a], 0.1, min_density=0.5) == {"m": 0}  # more than the fraction, not at least
