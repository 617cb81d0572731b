"""Firing-pattern redundancy against hand-computed cases."""

import pytest
import torch

from spd.redundancy import PatternTally, effective_rank


def test_effective_rank_by_hand():
    assert effective_rank(torch.tensor([[1.0, 0.0], [2.0, 0.0]])) == 1
    assert effective_rank(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == 2  # 50% + 50% of the energy
    # singular values 3 and 0.1: the first holds 9 / 9.01 = 99.9% of the energy
    assert effective_rank(torch.tensor([[3.0, 0.0], [0.0, 0.1]])) == 1
    assert effective_rank(torch.tensor([[3.0, 0.0], [0.0, 0.4]])) == 2  # 9 / 9.16 = 98.3%
    assert effective_rank(torch.zeros(3, 2)) == 0


def _batch(groups):
    """groups: [(pattern, rows)] -> (acts, ci) of one module "m" with C = 4, d_in = 3."""
    acts, ci = [], []
    for pattern, rows in groups:
        for r in rows:
            acts.append(torch.tensor(r, dtype=torch.float32))
            ci.append(torch.tensor([0.8 if c in pattern else 0.05 for c in range(4)]))
    return {"m": torch.stack(acts)}, {"m": torch.stack(ci)}


E0 = [[float(k), 0.0, 0.0] for k in range(1, 6)]  # five inputs on one line: rank 1


def test_redundancy_by_hand():
    # per batch: pattern {0, 1, 2} on 5 inputs of rank 1; {3} on 3 inputs spanning rank 2; {0} on 2 inputs;
    # {0, 1, 3} on 3 inputs; {1} on 1 input (never repeats inside a batch: not kept); one input firing nothing
    batch = [
        ({0, 1, 2}, E0),
        ({0, 1, 3}, E0[:3]),
        ({3}, [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]),
        ({0}, [[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]]),
        ({1}, [[0.0, 0.0, 1.0]]),
        (set(), [[1.0, 2.0, 3.0]]),
    ]
    tally = PatternTally(threshold=0.1)
    for _ in range(2):
        tally.add(*_batch(batch))
    s = tally.summary()["m"]
    # over both batches, judged when seen on >= 2 |S| + 2 inputs: {0,1,2} (10 >= 8), {3} (6 >= 4), {0} (4 >= 4);
    # not {0,1,3} (6 < 8). {0}: rows (1,1,1), (2,0,1); A A^T = [[3, 3], [3, 5]] has eigenvalues 4 +- sqrt(10),
    # 89% + 11% of the energy: rank 2. Inputs judged: 10 + 6 + 4 = 20 of 30; mean |S| = (30 + 6 + 4) / 20;
    # mean rank = (10 x 1 + 6 x 2 + 4 x 2) / 20
    assert s["coverage"] == pytest.approx(20 / 30)
    assert s["l0"] == pytest.approx(40 / 20)
    assert s["rank"] == pytest.approx(30 / 20)
    assert s["redundancy"] == pytest.approx(40 / 30)
    assert s["patterns"] == 3


def test_spread_pieces_score_their_count_and_rows_are_capped():
    # 4 pieces always firing together on inputs along one line: 4 pieces do one's work
    line = [[float(k), 0.0, 0.0] for k in range(1, 41)]
    acts, ci = _batch([({0, 1, 2, 3}, line)])
    tally = PatternTally(threshold=0.1)
    tally.add(acts, ci)
    s = tally.summary()["m"]
    assert s["redundancy"] == 4.0 and s["coverage"] == 1.0 and s["rank"] == 1.0
    stored = sum(r.shape[0] for r in next(iter(tally.modules["m"].rows.values())))
    assert stored == 2 * 2 * 4 + 8  # enough to show rank 4, no more


def test_too_few_repeats_are_not_judged():
    acts, ci = _batch([({0, 1, 2}, E0[:4])])  # 4 inputs < 2 x 3 + 2
    tally = PatternTally(threshold=0.1)
    tally.add(acts, ci)
    assert tally.summary()["m"] == {"redundancy": 0.0, "coverage": 0.0, "l0": 0.0, "rank": 0.0, "patterns": 0.0}
