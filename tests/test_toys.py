"""The toy zoo: models, data, ground-truth scorers (hand-computed cases) and the `spd toy` commands."""

import dataclasses
import json
import math
import re
import runpy
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import ROOT

from spd.cli import main as spd_main
from spd.config import load_config
from spd.ground_truth import DenseCI, GroundTruth, IdentityCI, concat_ci, matching, mechanism_labels
from spd.task import build_task
from toy_models import TOYS
from toy_models.cyclic import N_DAYS, build, days
from toy_models.induction import sample_sequences
from toy_models.resid_mlp import (
    SIZES,
    decomposed_neuron_contributions,
    earlier_output_share,
    ground_truth_pieces,
    init_resid_mlp,
    labels,
    neuron_contributions,
    resid_mlp_task,
    residual_entering,
)
from toy_models.targets import CACHE_ENV, trained_target
from toy_models.tms import tms_task


def test_every_toy_config_loads_and_names_a_factory():
    for name, toy in TOYS.items():
        cfg = load_config(toy.config_path, toy.fast)
        assert cfg.target.factory.startswith("toy_models."), name


# ---- ground-truth plumbing -----------------------------------------------------------------------------
def test_glob_patterns_concatenate_modules():
    ci = {
        "layers.0.mlp_in": torch.zeros(3, 2),
        "layers.1.mlp_in": torch.ones(3, 4),
        "layers.0.mlp_out": torch.zeros(3, 5),
    }
    names = matching(list(ci), "layers.*.mlp_in")
    assert names == ["layers.0.mlp_in", "layers.1.mlp_in"]
    cat, cols = concat_ci(ci, names)
    assert cat.shape == (3, 6) and cols[2] == ("layers.1.mlp_in", 0)
    with pytest.raises(ValueError, match="'nope' matches no decomposed module"):
        matching(list(ci), "nope")


def test_mechanism_labels_follow_the_ci_patterns():
    # two layers; feature 0 lives in layer 0 (column 1), feature 1 in layer 1 (column 0); a dense pair in "out".
    probe_ci = {
        "a.0": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "a.1": torch.tensor([[0.0, 0.0], [0.95, 0.0], [0.0, 0.0]]),
        "out": torch.tensor([[1.0, 0.0, 0.9], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
    }
    gt = GroundTruth(
        probe_inputs=None,
        ci_patterns={
            "a.*": IdentityCI(probes=[0, 1]),
            "out/pair": DenseCI(k=2, mechanism="W_out", probes=[0, 1], modules="out"),
        },
    )
    labels_ = mechanism_labels(None, gt, probe_ci)
    assert labels_ == {
        "a.0": [None, "feature 0", None],
        "a.1": ["feature 1", None],
        "out": ["W_out", None, "W_out"],
    }
    # a cross-layer feature: feature 0 also has a piece in layer 1 (column 1); both carry its label
    probe_ci["a.1"] = torch.tensor([[0.0, 0.8], [0.95, 0.0], [0.0, 0.0]])
    assert mechanism_labels(None, gt, probe_ci)["a.1"] == ["feature 1", "feature 0"]


def test_trained_target_cache(tmp_path, monkeypatch):
    calls = []

    def fit():
        calls.append(1)
        return {"w": torch.arange(3.0)}

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    s1, src1 = trained_target("toy", 0, {"a": 1}, fit)
    s2, src2 = trained_target("toy", 0, {"a": 1}, fit)
    _, src3 = trained_target("toy", 0, {"a": 2}, fit)  # another recipe: not the cached file
    assert (src1, src2, src3) == ("trained", "cache", "trained") and len(calls) == 2
    assert torch.equal(s1["w"], s2["w"])


def test_shipped_tms_40_10_targets_load_without_training():
    for hidden_identity in (False, True):
        t = tms_task(seed=0, n_features=40, n_hidden=10, train_batch_size=8192, hidden_identity=hidden_identity,
                     require_all_represented=False)  # fmt: skip
        assert t.info["target_source"] == "shipped"
        assert t.info["n_represented"] >= 38


@pytest.mark.parametrize("name", ["tms_5-2", "resid_mlp1"])
def test_the_fast_schedules_targets_are_shipped(name):
    """Seed 0's targets of the reduced schedules the default suite runs ship in toy_models/targets/ (made by
    `SPD_TARGET_CACHE=DIR`, then copied), so no test process trains them (~20 s and ~60 s); a changed recipe
    changes the key and fails here until its target is shipped again."""
    cfg = load_config(TOYS[name].config_path, TOYS[name].fast)
    assert build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed).info["target_source"] == "shipped"


# ---- ResidMLP ------------------------------------------------------------------------------------------
def test_resid_mlp_shapes_labels_and_embedding():
    for n_layers, (nf, dm) in SIZES.items():
        m = init_resid_mlp(n_layers, seed=0, d_embed=64)
        assert m.W_E.shape == (nf, 64) and len(m.layers) == n_layers
        assert m.layers[0].mlp_in.out_features == dm
        assert torch.allclose(m.W_E.norm(dim=1), torch.ones(nf))
    x = torch.tensor([[-0.5, 0.0, 0.25]])
    assert torch.equal(labels(x), torch.tensor([[-0.5, 0.0, 0.5]]))
    # state dicts saved before the embedding became a module (W_E at the top level) still load
    legacy = {("W_E" if k == "embed.W_E" else k): v for k, v in m.state_dict().items()}
    assert "W_E" in legacy
    fresh = init_resid_mlp(3, seed=1, d_embed=64)
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.W_E, m.W_E)


def test_neuron_contributions_hand_computed():
    W_E = torch.eye(2, 3)  # 2 features, d_embed 3, orthonormal rows
    W_in = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # d_embed x d_mlp
    W_out = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # d_mlp x d_embed
    nc = neuron_contributions(W_E, W_in, W_out)
    # feature 0: in (1, 2), out (W_out @ e_0) = (1, 0) -> (1, 0); feature 1: in (3, 4), out (0, 2) -> (0, 8)
    assert torch.equal(nc, torch.tensor([[1.0, 0.0], [0.0, 8.0]]))
    # one subcomponent per feature reading W_E[i] and writing W_E[i] @ W_in reproduces them exactly
    V_in = W_E.T.clone()
    U_in = W_E @ W_in
    assert torch.allclose(decomposed_neuron_contributions(W_E, V_in, U_in, W_out), nc)


def test_resid_mlp_small_target_trains_below_the_monosemantic_baseline():
    # 20 features, 10 neurons: a dedicated-neuron model leaves half the features with error E[ReLU(x)^2] p
    task = resid_mlp_task(seed=0, n_layers=1, d_embed=200, n_features=20, d_mlp=10, feature_prob=0.05,
                          train_steps=600)  # fmt: skip
    monosemantic = 0.5 * 0.05 * (1 / 6)
    assert task.info["target_loss"] < monosemantic
    assert task.ground_truth.expected_alive == {"layers.*.mlp_in": 20, "layers.*.mlp_out": 10}


# ---- cyclic (rank-2) -------------------------------------------------------------------------------------
def test_cyclic_layer_advances_the_day_and_scales_features():
    model, Q, scales = build(n_features=3, seed=0)
    d = days()
    raw = torch.zeros(N_DAYS, 5)
    raw[:, 3:] = d
    out_raw = model(raw @ Q) @ Q.T  # back to the raw basis
    assert torch.allclose(out_raw[:, 3:], d.roll(-1, dims=0), atol=1e-5)  # day k -> day k+1
    f = torch.zeros(1, 5)
    f[0, 1] = 1.0
    assert torch.allclose(model(f @ Q) @ Q.T, scales[1] * f, atol=1e-5)
    W = model.layer.weight.T
    assert torch.linalg.matrix_rank(Q[3:].T @ Q[3:] @ W).item() == 2  # the rotation block has rank 2
    assert math.isclose(torch.linalg.det(Q @ W @ Q.T)[()].item(), scales.prod().item(), rel_tol=1e-4)


# ---- induction ---------------------------------------------------------------------------------------------
def test_induction_sequences():
    tokens, label = sample_sequences(64, vocab=10, seq_len=12, g=torch.Generator().manual_seed(0))
    S = 11
    assert tokens.shape == (64, 12) and (tokens[:, 0] == 0).all() and (tokens[:, -1] == S).all()
    for row, m in zip(tokens, label, strict=True):
        first = (row == S).nonzero().flatten()[0].item()
        assert first < 12 - 1 and row[first + 1].item() == m.item() and 1 <= m.item() <= 10


# ---- the commands ------------------------------------------------------------------------------------------
def test_toy_train_writes_a_target_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "cyc.safetensors"
    assert spd_main(["toy", "train", "cyclic", "--seed", "1", "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit, match="exists"):
        spd_main(["toy", "train", "cyclic", "--out", str(out)])
    run_dir = tmp_path / "run"
    assert spd_main(["train", str(ROOT / "configs" / "cyclic.yaml"), "--out", str(run_dir), "--quiet",
                     "--set", f"target.state_file={out}", "--set", "seed=1", "--set", "train.steps=20",
                     "--set", "train.faithfulness_warmup.steps=2"]) == 0  # fmt: skip


def test_toy_reproduce_writes_the_table(tmp_path):
    md = tmp_path / "toy_results.md"
    argv = [
        "toy",
        "reproduce",
        "--toys",
        "cyclic",
        "--seeds",
        "0",
        "1",
        "--out",
        str(md),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--set",
        "train.steps=30",
        "--set",
        "train.checkpoint_every=1000",
    ]
    assert spd_main(argv) == 0  # fmt: skip
    text = md.read_text()
    assert "seeds passed" in text and re.search(r"\| cyclic \| [0-2] / 2 \|", text), text
    assert (tmp_path / "toy_ci" / "cyclic.png").is_file()
    assert (tmp_path / "runs" / "cyclic" / "seed1" / "eval.json").is_file()
    with pytest.raises(SystemExit, match="exists"):
        spd_main(argv)
    # --merge keeps the other toys' rows and says, per toy, where and when each ran
    data = json.loads(md.with_suffix(".json").read_text())
    data["meta"]["runs_on"]["cyclic"] = "an earlier machine"
    md.with_suffix(".json").write_text(json.dumps(data))
    argv2 = [
        "toy",
        "reproduce",
        "--toys",
        "tms_5-2",
        "--seeds",
        "0",
        "--out",
        str(md),
        "--runs-dir",
        str(tmp_path / "runs2"),
        "--set",
        "train.steps=30",
        "--set",
        "train.checkpoint_every=1000",
        "--merge",
    ]
    assert spd_main(argv2) == 0  # fmt: skip
    text = md.read_text()
    assert re.search(r"\| cyclic \| [0-2] / 2 \|", text) and "| tms_5-2 | " in text
    assert "run on an earlier machine." in text and text.count("; run on ") == 2


def test_toy_import_puts_recovery_results_into_the_table(tmp_path):
    md = tmp_path / "toy_results.md"
    old = {
        "meta": {
            "command": "spd toy reproduce --toys cyclic",
            "device": "x86_64 CPU",
            "torch": "2.13",
            "date": "2026-11-23",
            "total_wall_s": 90.0,
            "overrides": {"cyclic": []},
        },
        "runs": [{"toy": "cyclic", "seed": 0, "passed": True, "wall_s": 90.0, "alive/layer": 8, "failures": []}],
    }
    md.with_suffix(".json").write_text(json.dumps(old))  # a table from before per-toy commands were kept
    res = tmp_path / "recovery_tms.json"
    res.write_text(json.dumps({
        "config": "configs/tms_5-2.yaml", "overrides": ["train.threads=1"], "machine": "a 2-core box, 2026-11-24",
        "runs": [{"seed": 0, "passed": True, "wall_s": 80.0, "train_s": 79.0, "mmcs/linear1": 1.0,
                  "dense_sum_rel_error/linear1": 0.01, "failures": []},
                 {"seed": 1, "passed": False, "wall_s": 82.0, "mmcs/linear1": 0.99, "failures": ["mmcs low"],
                  "note": "re-scored later"}]}))  # fmt: skip
    assert spd_main(["toy", "import", str(res), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| tms_5-2 | 1 / 2 | MMCS 1.000" in text and "| cyclic | 1 / 1 |" in text
    assert text.index("## tms_5-2") < text.index("## cyclic")  # toys in TOYS order
    assert "run on a 2-core box, 2026-11-24 (from" in text and "Command: `spd toy reproduce --toys cyclic`" in text
    assert "overrides `train.threads=1`" in text and "Command: `python benchmarks/recovery.py" in text
    assert "- seed 1: mmcs low" in text and "- seed 1: re-scored later" in text
    assert "dense_sum_rel" not in text and "train_s" not in text  # the table shows the scorer's headline keys
    # importing again replaces that toy's rows rather than adding to them
    assert spd_main(["toy", "import", str(res), "--out", str(md)]) == 0
    assert len(json.loads(md.with_suffix(".json").read_text())["runs"]) == 3
    # a toy whose scorer also gives a verdict with the target's extra mechanisms allowed shows both counts
    res2 = tmp_path / "recovery_resid_mlp2.json"
    runs = [{"seed": s, "passed": False, "wall_s": 60.0, "with_extras/passed": s < 2, "failures": ["strict"],
             "with_extras/failures": [] if s < 2 else ["still off"]} for s in range(3)]  # fmt: skip
    res2.write_text(json.dumps({"config": "configs/resid_mlp2.yaml", "machine": "a 2-core box", "runs": runs}))
    assert spd_main(["toy", "import", str(res2), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| resid_mlp2 | 0 / 3 (2 with the extra mechanisms allowed) |" in text, text
    assert "| tms_5-2 | 1 / 2 | MMCS" in text  # no extras verdict, no second count
    res.write_text(json.dumps({"config": "configs/not_a_toy.yaml", "runs": []}))
    with pytest.raises(SystemExit, match="not a toy's config; toys use: tms_5-2.yaml"):
        spd_main(["toy", "import", str(res), "--out", str(md)])
    res.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a results file of benchmarks/recovery.py"):
        spd_main(["toy", "import", str(res), "--out", str(md)])


def test_recovery_benchmark_rows_keep_every_toys_scores(tmp_path, monkeypatch):
    """benchmarks/recovery.py rows carry the scores `spd toy` shows for each toy, here the induction scorer's
    (the rows once kept only TMS / ResidMLP keys), and `spd toy import` puts them into the table."""
    out = tmp_path / "recovery_induction.json"
    short = ["train.steps=20", "train.faithfulness_warmup.steps=2", "train.compile=false", "eval.n_batches=1",
             "eval.batch_size=256", "target.kwargs.train_steps=400", "target.kwargs.min_accuracy=0.0",
             "train.batch_size=32"]  # fmt: skip
    argv = ["recovery.py", str(ROOT / "configs" / "induction.yaml"), "--seeds", "0", "--json-out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + [a for o in short for a in ("--set", o)])
    runpy.run_path(str(ROOT / "benchmarks" / "recovery.py"), run_name="__main__")
    row = json.loads(out.read_text())["runs"][0]
    shown = {"accuracy/target", "previous_token/accuracy_ablated", "induction/accuracy_only_these", "ci_l0_total"}
    assert shown <= row.keys(), row
    md = tmp_path / "toy_results.md"
    assert spd_main(["toy", "import", str(out), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| induction/accuracy_ablated |" in text and "| ci_l0_total |" in text


# ---- scorers end to end on short runs (plumbing; recovery itself is in test_recovery.py) --------------------
def _short(name: str, *extra: str) -> dict:
    from spd.run import decompose

    over = ["train.steps=20", "train.faithfulness_warmup.steps=2", "train.compile=false",
            "train.checkpoint_every=1000", "eval.n_batches=1", "eval.batch_size=256", *extra]  # fmt: skip
    _, results = decompose(load_config(TOYS[name].config_path, over), None, progress=False)
    return results


def test_resid_mlp_two_layer_scores_span_layers():
    small = ["target.kwargs.d_embed=100", "target.kwargs.n_features=12", "target.kwargs.d_mlp=4",
             "target.kwargs.train_steps=50", "decomposition.modules.0.C=16", "decomposition.modules.1.C=16",
             "train.batch_size=64"]  # fmt: skip
    res = _short("resid_mlp2", *small)
    for key in ("identity_ci_error/layers.0.mlp_in", "identity_ci_error/layers.1.mlp_in",
                "dense_ci_error/layers.*.mlp_out", "alive/layers.0.mlp_in", "alive/layers.1.mlp_in",
                "alive/layers.*.mlp_out", "neuron_contrib_corr", "neuron_contrib_slope"):  # fmt: skip
        assert f"gt/{key}" in res, key
    assert 0 <= res["gt/alive/layers.*.mlp_out"] <= 32  # summed over both layers' 16 subcomponents


def test_resid_mlp_cross_layer_ground_truth_wants_every_feature_in_every_layer():
    """SPD paper 4.3: each feature has a W_in subcomponent in every layer (the pieces form one cross-layer
    component), W_out is one mechanism across the layers. A hand-made perfect 2-layer CI pattern passes; one
    layer with a single piece per feature across both layers (the old reading, 100 in all) fails."""
    from spd.ground_truth import dense_ci_error, identity_ci_error, mechanism_labels
    from toy_models.resid_mlp import ground_truth

    gt = ground_truth(init_resid_mlp(2, seed=0, d_embed=64))
    assert gt.expected_alive == {"layers.0.mlp_in": 100, "layers.1.mlp_in": 100, "layers.*.mlp_out": 50}
    assert set(gt.ci_patterns) == {"layers.0.mlp_in", "layers.1.mlp_in", "layers.*.mlp_out"}
    perfect = torch.eye(100)[:, torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    assert identity_ci_error(perfect) == 0
    half = perfect.clone()
    half[50:] = 0.0  # features 50-99 left to the other layer: not this toy's ground truth
    assert identity_ci_error(half) == 50
    assert dense_ci_error(torch.ones(100, 50), 50) == 0

    class Probe:  # mechanism_labels only reads probe CIs
        pass

    ci = {"layers.0.mlp_in": perfect, "layers.1.mlp_in": torch.eye(100), "layers.0.mlp_out": torch.ones(100, 25),
          "layers.1.mlp_out": torch.ones(100, 25)}  # fmt: skip
    labels = mechanism_labels(Probe(), gt, ci)
    feature_7 = [n for n, ls in labels.items() for lab in ls if lab == "feature 7"]
    assert feature_7 == ["layers.0.mlp_in", "layers.1.mlp_in"]  # one piece per layer, the same label
    assert set(labels["layers.0.mlp_out"] + labels["layers.1.mlp_out"]) == {"W_out"}


def test_cross_layer_read_by_hand():
    """benchmarks/resid_mlp_cross_layer.py: a layer-1 W_in orthogonal to the mean layer-0 output loses nothing
    when that direction is projected out; one that reads only it loses all of layer 1's output."""
    xl = runpy.run_path(str(ROOT / "benchmarks" / "resid_mlp_cross_layer.py"))
    model = init_resid_mlp(2, seed=0, d_embed=64, n_features=12, d_mlp=4)
    x = torch.eye(12) * 0.75
    _, entering = residual_entering(model, x)
    m = xl["mean_output_directions"](x @ model.W_E, entering)[1]
    w = model.layers[1].mlp_in.weight
    with torch.no_grad():
        w.copy_(w - torch.outer(w @ m, m))
    row = xl["target_read"](model)["layer 1"]
    assert row["remove_mean_dir_rel_output_err_median"] == 0.0
    assert row["features_whose_own_output_changes_over_5pct"] == 0
    with torch.no_grad():
        w.copy_(torch.outer(torch.ones(4), m))
        y, _ = residual_entering(model, x)
        y0, _ = residual_entering(model, x, {1: torch.zeros_like(w)})
    row = xl["target_read"](model)["layer 1"]
    rel = ((y0 - y).pow(2).sum(1) / y.pow(2).sum(1)).median().item()
    assert row["remove_mean_dir_rel_output_err_median"] == pytest.approx(rel, abs=1e-4)
    assert rel > 0


def test_resid_mlp_ground_truth_pieces_reproduce_each_matrix_where_they_should():
    """Dual reads take exactly x_i off an embedding (no overlap with other features), embedding reads do not; with
    the earlier-layer pieces the W_in^l pieces equal W_in^l on the whole residual stream entering layer l; the
    W_out pieces sum to W_out; every W_in piece of feature i writes W_in^l W_E[i]."""
    model = init_resid_mlp(3, seed=0, d_embed=64, n_features=12, d_mlp=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=g) * (torch.rand(32, 12, generator=g) < 0.3)
    _, entering = residual_entering(model, x)
    embed = x @ model.W_E
    dual = ground_truth_pieces(model, "dual")
    V, U = dual["layers.0.mlp_in"]
    assert torch.allclose(embed @ V, x, atol=1e-5)
    V_e, U_e = ground_truth_pieces(model, "embedding")["layers.0.mlp_in"]
    assert (embed @ V_e - x).abs().max() > 0.05  # the embeddings of 12 features in 64 dims overlap
    assert torch.allclose(U, U_e) and torch.allclose(U, model.W_E @ model.layers[0].mlp_in.weight.T)
    full = ground_truth_pieces(model, "dual", earlier_reads=True)
    for i, layer in enumerate(model.layers):
        V, U = full[f"layers.{i}.mlp_in"]
        assert V.shape[1] == 12 + 4 * i  # the features, then the earlier layers' neurons
        assert torch.allclose(entering[i] @ V @ U, entering[i] @ layer.mlp_in.weight.T, atol=1e-4)
        if i > 0:  # without the earlier-layer pieces, what layer i reads from earlier outputs is missing
            V, U = dual[f"layers.{i}.mlp_in"]
            assert not torch.allclose(entering[i] @ V @ U, entering[i] @ layer.mlp_in.weight.T, atol=1e-3)
        V, U = full[f"layers.{i}.mlp_out"]
        assert torch.allclose(V @ U, layer.mlp_out.weight.T)


def test_resid_mlp_gt_start_plants_exact_pieces_and_writes_a_start(tmp_path, monkeypatch):
    """benchmarks/resid_mlp_gt_start.py on a tiny 2-layer run: the objective of the run and of the planted
    variants is reported, and the planted dual+earlier start reproduces the target with every subcomponent on
    whatever the delta component's mask (the delta is zero on the residual stream); train.init_from takes it."""
    from spd import io
    from spd.run import decompose, load_run

    small = ["target.kwargs.d_embed=100", "target.kwargs.n_features=12", "target.kwargs.d_mlp=4",
             "target.kwargs.train_steps=50", "decomposition.modules.0.C=16", "decomposition.modules.1.C=16",
             "train.batch_size=64", "train.steps=5", "train.faithfulness_warmup.steps=2", "train.compile=false",
             "eval.n_batches=1", "eval.batch_size=64"]  # fmt: skip
    cfg = load_config(TOYS["resid_mlp2"].config_path, small)
    decompose(cfg, tmp_path / "run", progress=False)
    out, start = tmp_path / "gt.json", tmp_path / "start"
    argv = ["resid_mlp_gt_start.py", str(tmp_path / "run"), "--compare", str(tmp_path / "run"), "--variant",
            "dual+earlier", "embedding", "--fit-steps", "3", "--eval-batches", "1", "--eval-batch-size", "64",
            "--write-start", str(start), "--json-out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "benchmarks" / "resid_mlp_gt_start.py"), run_name="__main__")
    res = json.loads(out.read_text())
    assert set(res["planted"]) == {"dual+earlier", "embedding"} and len(res["learned"]) == 1
    assert all(r["objective"]["total"] > 0 for r in res["planted"].values())
    (learned,) = res["learned"].values()
    assert set(learned["pieces"]) == {"layers.0.mlp_in", "layers.1.mlp_in"}
    run = load_run(tmp_path / "run")
    io.load_model_state(run.model, io.load_tensors(start / io.MODEL), start / io.MODEL)
    x = run.task.sample_batch(64, torch.Generator().manual_seed(0))
    ones = {n: torch.ones(64, 16) for n in run.model.module_names}
    deltas = {n: torch.rand(64, generator=torch.Generator().manual_seed(1)) for n in run.model.module_names}
    with torch.no_grad():
        assert torch.allclose(run.model(x, ones, deltas), run.task.target(x), atol=1e-5)
    cfg2 = load_config(TOYS["resid_mlp2"].config_path, [*small, f"train.init_from={start}"])
    decompose(cfg2, None, progress=False)
    with pytest.raises(SystemExit, match="exists"):  # never writes over an earlier start
        runpy.run_path(str(ROOT / "benchmarks" / "resid_mlp_gt_start.py"), run_name="__main__")


class _FixedCI:
    """What `score` reads of a decomposition: module names, read directions V, and fixed probe CIs."""

    def __init__(self, V: dict[str, torch.Tensor], ci: dict[str, torch.Tensor]):
        self.module_names, self._V, self._ci = list(ci), V, ci

    def comp(self, name: str) -> Any:
        return SimpleNamespace(V=self._V[name])

    def parameters(self) -> Any:
        return iter([torch.zeros(1)])

    def probe_importances(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._ci


def test_resid_mlp_shared_read_is_an_extra_mechanism_by_hand():
    """A layer-1 W_in piece important on every probe that reads only the layer-0 output (its V orthogonal to
    the embeddings) is the "shared read 1" extra: the strict verdict fails on it, with_extras passes, and it is
    labelled as its own mechanism. The same piece reading the embeddings instead is no extra."""
    from spd.ground_truth import score
    from toy_models.resid_mlp import ground_truth

    nf, d = 12, 64
    target = init_resid_mlp(2, seed=0, d_embed=d, n_features=nf, d_mlp=4)
    x = torch.eye(nf) * 0.75
    with torch.no_grad():
        earlier = residual_entering(target, x)[1][1] - x @ target.W_E  # [nf, d] layer 0's output per probe
        q_embed = torch.linalg.qr(target.W_E.T).Q  # [d, nf]
        q_earlier = torch.linalg.qr(earlier.T).Q
        m = earlier.mean(0) - q_embed @ (q_embed.T @ earlier.mean(0))  # reads no embedding
        per_feature = target.W_E.T - q_earlier @ (q_earlier.T @ target.W_E.T)  # read no earlier output
    V1 = torch.cat([per_feature, m[:, None], target.W_E[:1].T], 1)  # [d, nf + 2]
    share = earlier_output_share(target, V1, 1)
    assert share[:, :nf].max() < 1e-4 and share[:, nf].min() > 0.999
    ci1 = torch.cat([torch.eye(nf), torch.ones(nf, 1), torch.zeros(nf, 1)], 1)
    ci = {"layers.0.mlp_in": torch.eye(nf), "layers.1.mlp_in": ci1, "layers.0.mlp_out": torch.ones(nf, 4),
          "layers.1.mlp_out": torch.ones(nf, 4)}  # fmt: skip
    gt = dataclasses.replace(ground_truth(target), checks=[])  # neuron contributions need full components
    model = _FixedCI({"layers.1.mlp_in": V1}, ci)
    res = score(model, gt, [ci])
    assert res["identity_ci_error/layers.1.mlp_in"] == nf and res["alive/layers.1.mlp_in"] == nf + 1
    assert not res["passed"]
    assert res["extras/shared read 1"] == 1
    assert res["with_extras/identity_ci_error/layers.1.mlp_in"] == 0
    assert res["with_extras/alive/layers.1.mlp_in"] == nf
    assert res["with_extras/passed"] and res["with_extras/failures"] == []
    labels_ = mechanism_labels(model, gt, ci)["layers.1.mlp_in"]
    assert labels_[nf] == "shared read 1" and labels_[:nf] == [f"feature {i}" for i in range(nf)]
    # the broad piece reading the embeddings instead: not the shared read, both verdicts fail
    V1[:, nf] = per_feature.sum(1)
    res = score(_FixedCI({"layers.1.mlp_in": V1}, ci), gt, [ci])
    assert res["extras/shared read 1"] == 0 and not res["with_extras/passed"]


def test_induction_ablation_scorer_runs():
    res = _short("induction", "target.kwargs.train_steps=400", "target.kwargs.min_accuracy=0.0", "train.batch_size=32")
    assert 0.0 <= res["gt/previous_token/accuracy_ablated"] <= 1.0
    assert res["gt/induction/n_subcomponents"] <= 4 * 32
    assert "gt/accuracy/target" in res


def test_piece_ci_vs_use_matches_like_the_with_extras_scorer():
    """benchmarks/resid_mlp_cross_layer.py `piece_ci_vs_use`: the extra piece is left out before matching (so a
    broad piece cannot stand in for a feature's own weak piece), each matched CI under 0.9 is listed with its
    feature's layer-use rank, and off-diagonal entries are counted."""
    xl = runpy.run_path(str(ROOT / "benchmarks" / "resid_mlp_cross_layer.py"))
    model = init_resid_mlp(2, seed=0, d_embed=64, n_features=12, d_mlp=4)
    use = xl["layer_use"](model)
    ci0 = torch.eye(12)
    ci0[5, 5] = 0.85  # layer 0: feature 5's own piece just under the bar
    ci1 = torch.cat([torch.ones(12, 1), torch.eye(12)], dim=1)  # layer 1: a broad extra piece (column 0) ...
    ci1[3, 4] = 0.6  # ... feature 3's own piece (column 4) weak: the broad piece must not be matched instead
    ci1[7, 2] = 0.3  # and one off-diagonal entry
    from spd.ground_truth import ExtraMechanism
    from toy_models.resid_mlp import ground_truth

    extra = ExtraMechanism("shared read 1", lambda m, c: [("layers.1.mlp_in", 0)])
    gt = dataclasses.replace(ground_truth(model), extras=[extra])
    run = SimpleNamespace(
        task=SimpleNamespace(target=model, ground_truth=gt),
        model=None, path="fake", config=SimpleNamespace(seed=0),
    )  # fmt: skip
    out = xl["piece_ci_vs_use"](run, {"layers.0.mlp_in": ci0, "layers.1.mlp_in": ci1})
    rank = use.argsort(dim=1).argsort(dim=1)
    assert out["layers.0.mlp_in"]["features_under_0.9"] == [
        {"feature": 5, "ci": 0.85, "use": round(use[0, 5].item(), 4), "use_rank": int(rank[0, 5])}
    ]
    assert out["layers.0.mlp_in"]["off_diagonal_over_0.1"] == 0
    l1 = out["layers.1.mlp_in"]
    assert l1["extras_left_out"] == [0]
    assert [(f["feature"], f["ci"]) for f in l1["features_under_0.9"]] == [(3, 0.6)]
    assert l1["off_diagonal_over_0.1"] == 1
