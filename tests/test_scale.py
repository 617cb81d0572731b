"""Loss -> compute curves (spd.scale): frontier, inversion, file format, the published scaling laws."""

import json
import math

import numpy as np
import pytest

from spd.scale import (
    CHINCHILLA_LAWS,
    ComputeCurve,
    CurvePoint,
    chinchilla_compute_fraction,
    curve_from_log,
    load_curve,
)


def power_law_curve() -> tuple[ComputeCurve, np.ndarray, np.ndarray]:
    compute = np.geomspace(1e6, 1e12, 25)
    loss = 1.7 + 400.0 * compute**-0.3
    pts = [CurvePoint(float(c), float(v), f"ladder {i}") for i, (c, v) in enumerate(zip(compute, loss, strict=True))]
    return ComputeCurve(pts, float(compute[-1]), float(loss[-1]), target_rtol=0.0), compute, loss


def test_inversion_is_exact_at_every_point_of_a_synthetic_curve():
    curve, compute, loss = power_law_curve()
    for c, v in zip(compute, loss, strict=True):
        assert curve.compute_for(float(v)) == pytest.approx(c, rel=1e-12)
        assert curve.loss_at(float(c)) == pytest.approx(v, rel=1e-12)
    assert curve.fraction(float(loss[-1])) == pytest.approx(1.0)
    assert curve.fraction(float(loss[0])) == pytest.approx(1e-6, rel=1e-9)


def test_inversion_is_monotone_and_inverts_the_forward_map_between_points():
    curve, _, loss = power_law_curve()
    probes = np.sort(np.random.default_rng(0).uniform(loss[-1], loss[0], 500))
    computes = [curve.compute_for(float(v)) for v in probes]
    assert all(a >= b for a, b in zip(computes, computes[1:], strict=False))  # higher loss, never more compute
    for v, c in zip(probes, computes, strict=True):
        assert curve.loss_at(c) == pytest.approx(v, rel=1e-10)  # linear in log compute between points: exact


def test_frontier_drops_points_beaten_by_cheaper_ones_hand_case():
    pts = [CurvePoint(1, 4.0), CurvePoint(2, 3.0), CurvePoint(4, 3.5), CurvePoint(8, 1.0)]
    curve = ComputeCurve(pts, target_compute=8, target_loss=1.0, target_rtol=0.0)
    logc, ls = curve.frontier()
    assert np.allclose(np.exp(logc), [1, 2, 8]) and list(ls) == [4.0, 3.0, 1.0]
    # loss 2 is halfway from (2, 3) to (8, 1) in loss, so halfway in log compute: sqrt(2 * 8) = 4
    assert curve.compute_for(2.0) == pytest.approx(4.0)
    assert curve.fraction(2.0) == pytest.approx(0.5)
    assert curve.compute_for(5.0) == 1.0 and curve.bound(5.0) == "at most"  # above the curve: an upper bound
    assert math.isinf(curve.compute_for(0.5)) and curve.bound(0.5) == "beyond"


def test_fraction_is_relative_to_the_frontier_compute_of_the_target_loss():
    # an overtrained target (its run reaches loss 1 at compute 8 but keeps training to 32): fraction 1 at its loss
    pts = [CurvePoint(2, 3.0), CurvePoint(8, 1.0), CurvePoint(32, 1.0)]
    curve = ComputeCurve(pts, target_compute=32, target_loss=1.0, target_rtol=0.0)
    assert curve.target_frontier_compute == pytest.approx(8)
    assert curve.fraction(1.0) == pytest.approx(1.0)
    assert curve.fraction(3.0) == pytest.approx(0.25)


def test_curve_file_round_trip_and_errors_name_file_and_field(tmp_path):
    curve, _, _ = power_law_curve()
    curve.save(tmp_path / "c.json")
    again = load_curve(tmp_path / "c.json")
    assert again.points == curve.points and again.target_loss == curve.target_loss
    bad = {"target": {"compute": 10}, "points": [{"compute": 1, "loss": 2}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json.*'target'"):
        load_curve(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"target": {"compute": 1, "loss": 1}, "points": [{"loss": 1}]}))
    with pytest.raises(ValueError, match=r"points\[0\]"):
        load_curve(tmp_path / "bad2.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_curve(tmp_path / "nope.json")


def test_curve_from_a_logged_training_run():
    curve = curve_from_log([0, 10, 20, 40], [5.0, 3.0, 2.0, 1.5], compute_per_step=100.0)
    assert curve.target_compute == 4000 and curve.target_loss == 1.5
    assert curve.compute_for(2.0) == pytest.approx(2000)


def test_chinchilla_law_optimum_and_inversion():
    law = CHINCHILLA_LAWS["besiroglu2024"]
    C = 1e21
    n, d = law.optimal_split(C)
    assert 6 * n * d == pytest.approx(C)
    for f in (0.9, 1.1):  # the split is a minimum along 6 N D = C
        assert law.loss(n * f, C / 6 / (n * f)) > law.optimal_loss(C)
    assert law.compute_for(law.optimal_loss(C)) == pytest.approx(C, rel=1e-6)
    assert math.isinf(law.compute_for(law.E))


def test_chinchilla_compute_fraction_hand_case_and_monotone():
    # zero gap: the target itself (fraction 1); a larger gap: less compute
    assert chinchilla_compute_fraction(1.35e8, 2e12, 0.0)["compute_fraction"] == pytest.approx(1.0, rel=1e-6)
    fracs = [chinchilla_compute_fraction(1.35e8, 2e12, g)["compute_fraction"] for g in (0.01, 0.05, 0.2)]
    assert 1 > fracs[0] > fracs[1] > fracs[2] > 0
    # hand case: on the compute-optimal frontier both reducible terms fall as C^(-ab/(a+b)), so raising the
    # reducible loss R = L - E by 1% takes compute to 1.01^(-(a+b)/(ab)) of the anchor's (~0.946 for the refit)
    law = CHINCHILLA_LAWS["besiroglu2024"]
    reducible = chinchilla_compute_fraction(1e9, 2e10, 0.0)["law_loss_at_target"] - law.E
    f = chinchilla_compute_fraction(1e9, 2e10, 0.01 * reducible)["compute_fraction"]
    a, b = law.alpha, law.beta
    assert f == pytest.approx(1.01 ** (-(a + b) / (a * b)), rel=1e-6)


def test_same_model_curve_drops_other_sizes_whose_frontier_jumps():
    # a wider model reaches a much lower loss almost at once: the family frontier jumps, the target's size does not
    pts = [CurvePoint(1, 4.0, model="w=1"), CurvePoint(4, 2.0, model="w=1"), CurvePoint(16, 1.0, model="w=1"),
           CurvePoint(2, 0.1, model="w=2")]  # fmt: skip
    curve = ComputeCurve(pts, target_compute=16, target_loss=1.0, target_model="w=1", target_rtol=0.0)
    own = curve.same_model()
    assert own.models == ["w=1"] and curve.models == ["w=1", "w=2"]
    assert own.fraction(2.0) == pytest.approx(0.25)  # loss 2 is the w=1 run at compute 4
    # on the family frontier the target's loss lies on the jump from (1, 4) to (2, 0.1)
    assert curve.target_frontier_compute == pytest.approx(2 ** ((4 - 1) / 3.9))
    assert own.to_json()["target_model"] == "w=1"


def test_target_reached_within_tolerance_on_a_flat_curve():
    # an overtrained target: its loss is reached at compute 10 up to noise in the last digits
    pts = [CurvePoint(1, 2.0), CurvePoint(10, 1.0004), CurvePoint(100, 1.0001), CurvePoint(1000, 1.0)]
    # loss 1.001 lies just before the point (10, 1.0004): log-linear between (1, 2.0) and it
    expected = 10 ** ((2.0 - 1.001) / (2.0 - 1.0004))
    assert ComputeCurve(pts, 1000, 1.0, target_rtol=1e-3).target_frontier_compute == pytest.approx(expected)
    assert ComputeCurve(pts, 1000, 1.0, target_rtol=0.0).target_frontier_compute == pytest.approx(1000)
    # a target better than every point (a rerun of its recipe is not bit-identical): the best point reaches it
    assert ComputeCurve(pts, 1000, 0.9, target_rtol=0.0).target_frontier_compute == pytest.approx(1000)
