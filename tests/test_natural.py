"""Natural degradation (spd.natural): SGLD through devinterp, the temperature search, the LLC estimate."""

import math

import pytest
import torch
from torch import nn

from spd.natural import NaturalConfig, NaturalDegradation, degrade, top_hessian_eigenvalue
from spd.scale import ComputeCurve, CurvePoint
from spd.task import Task

pytest.importorskip("devinterp")

D_IN, D_OUT, N_DATA = 10, 5, 2000


def regression_task(seed: int = 0) -> tuple[Task, torch.Tensor, torch.Tensor]:
    """Linear regression with label noise, fitted exactly (least squares): L0 > 0 and the loss is quadratic."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_DATA, D_IN, generator=g)
    y = x @ torch.randn(D_IN, D_OUT, generator=g) + 0.3 * torch.randn(N_DATA, D_OUT, generator=g)
    model = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)

    def full_batch(n: int, gen: torch.Generator) -> torch.Tensor:  # the whole data set, whatever is asked
        return torch.arange(N_DATA)

    def metrics(idx: torch.Tensor, out: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (out - y[idx]).pow(2).mean(-1)}

    class Indexed(nn.Module):  # inputs are row indices, so the samplers can hand out the fixed data set
        def __init__(self) -> None:
            super().__init__()
            self.lin = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.lin(x[idx])

    return Task(Indexed(), full_batch, metrics=metrics), x, y


def test_zero_noise_zero_localisation_is_plain_gradient_descent():
    task, x, y = regression_task()
    with torch.no_grad():
        task.target.lin.weight.add_(0.5)  # start away from the optimum, so the steps move
    cfg = NaturalConfig(lr=0.05, noise_level=0.0, localization=0.0, n_steps=10, burnin=9, draw_every=1, n_eval=N_DATA)
    nd = NaturalDegradation(task.target, lambda m, i: task.metrics(i, m(i))["loss"].mean(), task.sample_batch, cfg)
    chain = nd.chain(nbeta=37.0, aim=0.0)  # the only draw is the last step
    ref = nn.Linear(D_IN, D_OUT, bias=False)
    ref.load_state_dict(task.target.lin.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        (ref(x) - y).pow(2).mean().backward()
        opt.step()
    torch.testing.assert_close(chain.best["lin.weight"], ref.weight.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ref.weight, task.target.lin.weight)  # the target itself is untouched


def test_top_hessian_eigenvalue_matches_the_closed_form():
    _, x, _ = regression_task()
    w = torch.zeros(D_OUT, D_IN, requires_grad=True)
    # L = mean over N x D_OUT of (x w^T - y)^2: Hessian = 2/(N D_OUT) (I_out ⊗ x^T x), top eigenvalue from x^T x
    expected = 2 * torch.linalg.eigvalsh(x.T @ x).max().item() / (N_DATA * D_OUT)
    got = top_hessian_eigenvalue(lambda: (x @ w.T).pow(2).mean(), [w], iters=100)
    assert got == pytest.approx(expected, rel=1e-3)  # power iteration: close eigenvalues converge slowly


def test_llc_of_a_regular_quadratic_model_is_half_its_dimension():
    # a quadratic loss with a positive-definite Hessian: at temperature 1/nbeta the tempered posterior is
    # Gaussian and E[L] - L0 = d / (2 nbeta) (equipartition), so the LLC estimate is d / 2 = 25
    task, _, _ = regression_task()
    cfg = NaturalConfig(step=0.1, localization=0.0, n_steps=3000, burnin=500, draw_every=5, n_eval=N_DATA)
    nd = NaturalDegradation(task.target, lambda m, i: task.metrics(i, m(i))["loss"].mean(), task.sample_batch, cfg)
    chain = nd.chain(nbeta=1e4)
    assert chain.llc == pytest.approx(D_IN * D_OUT / 2, rel=0.15)


@pytest.mark.parametrize("factor", [1.05, 1.3, 2.0])
def test_search_hits_the_requested_loss(factor):
    task, _, _ = regression_task()
    cfg = NaturalConfig(step=0.1, n_steps=600, burnin=200, draw_every=10, n_eval=N_DATA, rtol=0.02)
    nd = NaturalDegradation(task.target, lambda m, i: task.metrics(i, m(i))["loss"].mean(), task.sample_batch, cfg)
    want = nd.target_loss * factor
    d = nd.search(want)
    assert d.converged
    assert abs(d.chain.mean_loss - want) <= 0.02 * (want - nd.target_loss) + 1e-12
    assert abs(d.achieved_loss - want) / want < 0.05  # the returned draw, measured on the held-out set
    # the returned state is the target's own state dict with the sampled weights
    assert set(d.state) == set(task.target.state_dict())
    again = type(task.target)()
    again.load_state_dict(d.state)
    assert nd.eval_loss(again) == pytest.approx(d.achieved_loss)
    assert d.summary()["llc"] > 0


def test_search_refuses_a_loss_below_the_target_and_bad_settings():
    task, _, _ = regression_task()
    loss_fn = lambda m, i: task.metrics(i, m(i))["loss"].mean()  # noqa: E731
    nd = NaturalDegradation(task.target, loss_fn, task.sample_batch, NaturalConfig(n_eval=N_DATA, n_steps=20,
                            burnin=10))  # fmt: skip
    with pytest.raises(ValueError, match="not above the target's own loss"):
        nd.search(nd.target_loss * 0.9)
    with pytest.raises(ValueError, match="burnin"):
        NaturalDegradation(task.target, loss_fn, task.sample_batch, NaturalConfig(n_steps=10, burnin=10))
    with pytest.raises(ValueError, match="match no parameter.*lin.weight"):
        NaturalDegradation(task.target, loss_fn, task.sample_batch, NaturalConfig(params=["nope*"]))


def test_degrade_by_compute_fraction_reads_the_loss_off_the_curve():
    task, _, _ = regression_task()
    cfg = NaturalConfig(step=0.1, n_steps=400, burnin=150, draw_every=10, n_eval=N_DATA, rtol=0.05)
    # a curve whose frontier is 0.05 above the target's loss at half the target's compute
    L0 = 0.3**2 * (1 - D_IN / N_DATA)  # least-squares residual of the noise
    pts = [CurvePoint(1, L0 + 0.1), CurvePoint(50, L0 + 0.05), CurvePoint(100, L0)]
    scale = ComputeCurve(pts, 100, L0, target_rtol=0.0)
    result, request = degrade(task, cfg, compute_fraction=0.5, curve=scale)
    assert request["curve_loss"] == pytest.approx(L0 + 0.05)
    assert request["loss"] == pytest.approx(request["target_loss"] + 0.05)
    assert result.converged and abs(result.chain.mean_loss - request["loss"]) <= 0.05 * 0.05
    with pytest.raises(ValueError, match="exactly one"):
        degrade(task, cfg)
    with pytest.raises(ValueError, match="no loss -> compute curve"):
        degrade(task, cfg, compute_fraction=0.5)
    assert math.isfinite(result.summary()["gap_error_rel"])
