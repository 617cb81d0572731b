"""Diagnostics fire with their numbers on hand-built evaluations and histories, and stay silent on a good one."""

import pytest

from spd.diagnostics import diagnose, slope_t, trend

SHAPES = {"a": (20, 5, 2), "b": (20, 2, 5)}  # (C, d_in, d_out): rank 2 each


def good_results(**over):
    r = {
        "recon/stochastic_all": 1e-4, "recon/zero_output_baseline": 1e-2,
        "ci_near_one/a": 0.9, "ci_near_one/b": 0.85, "ci_l0/a": 0.3, "ci_l0/b": 0.3, "ci_l0/total": 0.6,
        "alive/a": 5, "alive/b": 5, "faithfulness_rel/a": 0.02, "faithfulness_rel/b": 0.03,
    }  # fmt: skip
    return r | over


def history(n=100, l0=lambda s: 0.6, recon=lambda s: 1e-4, adv=None):
    rows = []
    for s in range(0, n, 5):
        rows.append(
            {"step": s, "loss/stochastic_recon": recon(s), "train_ci_l0/a": l0(s) / 2, "train_ci_l0/b": l0(s) / 2}
        )
        if adv is not None:
            rows.append({"step": s, "eval/recon/adversarial_all@20x0.1": adv(s)})
    rows.append(
        {"step": n - 1, "loss/stochastic_recon": recon(n - 1), "train_ci_l0/a": l0(n) / 2, "train_ci_l0/b": l0(n) / 2}
    )
    return rows


def kinds(diags):
    return sorted({d.kind for d in diags})


def test_silent_on_a_good_run():
    assert diagnose(good_results(), history(adv=lambda s: 1e-3), 100, SHAPES, 0.1) == []


def test_collapse_needs_indecisive_cis_and_poor_or_rising_reconstruction():
    r = good_results(**{"ci_near_one/a": 0.2, "recon/stochastic_all": 2e-3})  # 20% of the baseline
    d = diagnose(r, history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["collapse"] and d[0].module == "a"
    assert "20.0% of the CIs" in d[0].message and "20.0% of the zero-output baseline" in d[0].message
    # indecisive CIs alone (reconstruction fine and flat) are not a collapse
    assert diagnose(good_results(**{"ci_near_one/a": 0.2}), history(), 100, SHAPES, 0.1) == []
    # ... but rising reconstruction is: best 1e-4 early, settled at 5e-4
    rising = history(recon=lambda s: 1e-4 if s < 50 else 5e-4)
    d = diagnose(good_results(**{"ci_near_one/a": 0.2}), rising, 100, SHAPES, 0.1)
    assert kinds(d) == ["collapse"] and "5.0x its best value" in d[0].message
    # ... and so are CIs of which almost none is decisive, whatever the reconstruction (ResidMLP 1 at 30x its
    # importance coefficient: 0.2% reach 0.9, recon 2% of the baseline); the collapse replaces a capacity warning
    d = diagnose(good_results(**{"ci_near_one/b": 0.002, "alive/b": 20}), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["collapse"] and d[0].module == "b" and "holds the CIs down" in d[0].message
    assert "may be too high" in d[0].message
    assert diagnose(good_results(**{"ci_near_one/b": 0.1}), history(), 100, SHAPES, 0.1) == []  # a good W_out: 12%


def test_too_dense_dead_and_capacity():
    d = diagnose(good_results(**{"ci_l0/a": 1.5}), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["too_dense"] and "CI-L0 1.50" in d[0].message and "rank 2" in d[0].message
    # no more alive pieces than the rank, each on every input: one dense mechanism (an identity layer)
    d = diagnose(good_results(**{"ci_l0/a": 1.9, "alive/a": 2}), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["too_dense"] and "one dense mechanism" in d[0].message and "2 alive" in d[0].message
    assert "should be sparse, the importance coefficient may be too low" in d[0].message
    d = diagnose(good_results(**{"ci_l0/a": 1.5, "alive/a": 2}), history(), 100, SHAPES, 0.1)  # 2 alive, L0 1.5
    assert kinds(d) == ["too_dense"] and "is too dense" in d[0].message
    d = diagnose(good_results(**{"alive/b": 0}), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["dead"] and "all 20 subcomponents of b" in d[0].message and "0.1" in d[0].message
    d = diagnose(good_results(**{"alive/b": 20}), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["capacity"] and "rerun with a larger C" in d[0].message


def test_too_dense_by_firing_pattern_redundancy():
    # ResidMLP 1 at 1/30 of its coefficient: CI-L0 well below the rank, but 15 pieces per input on inputs of rank 1
    red = {"redundancy/a": 15.0, "redundancy_coverage/a": 0.27, "redundancy_l0/a": 15.0, "redundancy_rank/a": 1.0}
    d = diagnose(good_results(**red), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["too_dense"] and d[0].module == "a" and d[0].numbers["redundancy"] == 15.0
    assert "on the 27.0% of inputs whose firing pattern repeats, 15.0 subcomponents" in d[0].message
    assert "span rank 1.00" in d[0].message and "the importance coefficient may be too low" in d[0].message
    # silent when the repeated patterns cover too little of the data, or the pieces match the inputs' rank
    assert diagnose(good_results(**red | {"redundancy_coverage/a": 0.01}), history(), 100, SHAPES, 0.1) == []
    assert diagnose(good_results(**red | {"redundancy/a": 1.3}), history(), 100, SHAPES, 0.1) == []
    # one warning per module: the L0-vs-rank rule speaks first
    d = diagnose(good_results(**red | {"ci_l0/a": 1.5}), history(), 100, SHAPES, 0.1)
    assert len(d) == 1 and "CI-L0 1.50" in d[0].message


def test_apd_runs_get_apd_wording_and_no_collapse_check():
    d = diagnose(good_results(**{"alive/b": 20}), history(), 100, SHAPES, 0.1, method="apd")
    assert kinds(d) == ["capacity"] and "all 20 components of b" in d[0].message and "apd.topk" in d[0].message
    r = good_results(**{"ci_near_one/a": 0.2, "recon/stochastic_all": 2e-3})  # a collapse for SPD
    assert diagnose(r, history(), 100, SHAPES, 0.1, method="apd") == []


def test_unconverged_by_trend_and_by_early_stop():
    d = diagnose(good_results(), history(l0=lambda s: 3.0 - s / 50), 100, SHAPES, 0.1)
    assert kinds(d) == ["unconverged"] and "CI-L0 still moving" in d[0].message
    d = diagnose(good_results(), history(adv=lambda s: 1e-3 * 2 ** (s / 10)), 100, SHAPES, 0.1)
    assert kinds(d) == ["unconverged"] and "adversarial_all@20x0.1 still moving" in d[0].message
    d = diagnose(good_results(), history(n=10), 1000, SHAPES, 0.1)
    assert kinds(d) == ["unconverged"] and "stopped at step 9 of 1000" in d[0].message


def test_faithfulness_outlier():
    d = diagnose(good_results(**{"faithfulness_rel/b": 0.8}), history(), 100, SHAPES, 0.1)
    assert kinds(d) == ["faithfulness"] and d[0].module == "b" and "0.8" in d[0].message
    # large but uniform errors (inputs confined to a subspace) are not outliers
    assert diagnose(good_results(**{"faithfulness_rel/a": 0.6, "faithfulness_rel/b": 0.9}), history(), 100, SHAPES,
                    0.1) == []  # fmt: skip


def test_noisy_adversarial_evals_are_not_a_trend():
    # alternating values around a flat mean: a large relative fit change is possible with few points, not significant
    noisy = history(adv=lambda s: 1e-3 * (1.6 if (s // 5) % 2 else 0.6))
    assert diagnose(good_results(), noisy, 100, SHAPES, 0.1) == []


def test_trend_by_hand():
    assert trend([0, 1, 2], [1.0, 1.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
    assert trend([0, 10], [1.0, 2.0]) == pytest.approx(1 / 1.5)
    assert slope_t([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0]) > 1e12  # a perfect line
    # y = (0, 2, 1, 3): slope 0.8, residuals (-0.3, 0.9, -0.9, 0.3), s^2 = 1.8 / 2, Sxx = 5: t = 0.8 / sqrt(0.18)
    assert slope_t([0, 1, 2, 3], [0.0, 2.0, 1.0, 3.0]) == pytest.approx(0.8 / 0.18**0.5)


# ---- end to end: deliberately broken tiny TMS 5-2 runs --------------------------------------------------------
def _tms(tmp_path, name, *overrides):
    from spd.config import load_config
    from spd.run import decompose
    from toy_models import TOYS

    toy = TOYS["tms_5-2"]
    cfg = load_config(toy.config_path, [*toy.fast, "train.log_every=20", "train.compile=false", *overrides])
    return decompose(cfg, tmp_path / name, progress=False)[1]


def test_diagnostics_on_real_tiny_runs(tmp_path, monkeypatch, tms_5_2_fast):
    good = tms_5_2_fast[1]  # the session's run of the reduced schedule (conftest), logged every 20 steps
    assert good["gt/passed"] and good["diagnostics"] == []
    assert good["redundancy/linear1"] == pytest.approx(1.0) and good["redundancy_coverage/linear1"] > 0.1

    strong = _tms(tmp_path, "x1000", "losses.2.coeff=3.0", "train.steps=1000")  # 1000x the importance coefficient
    assert {"collapse", "dead"} <= {d.split("]")[0][1:] for d in strong["diagnostics"]}, strong["diagnostics"]

    none = _tms(tmp_path, "zero", "losses.2.coeff=0.0", "train.steps=1000")  # no importance minimality at all
    assert "too_dense" in {d.split("]")[0][1:] for d in none["diagnostics"]}, none["diagnostics"]

    # a run that crashed after 1% of its 4000 steps, evaluated from its last checkpoint
    import spd.train as train_mod
    from spd.run import load_run

    real_step, calls = train_mod.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 40:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tms(tmp_path, "crashed", "train.checkpoint_every=40")
    diags = load_run(tmp_path / "crashed").evaluate()["diagnostics"]
    assert any("stopped at step 39 of 4000 (1.0%); evaluated from its last checkpoint" in d for d in diags), diags
    assert any(d.startswith("[unconverged] CI-L0 still moving") for d in diags), diags
