"""Ground truth as data, and permutation-invariant scores of a decomposition against it.

A toy model describes what a correct decomposition looks like (which rank-1 pieces exist, which CI
pattern one-hot probes should produce, how many subcomponents should be alive); `score` measures a
ComponentModel against that description and says which acceptance criteria pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

TOL = 0.1


@dataclass(frozen=True)
class FeatureDirections:
    """Ground-truth rank-1 pieces of one module: feature f owns row/column f of the target weight.

    axis "in": feature f is input dimension f (the piece is W[:, f] e_f^T in nn.Linear orientation);
    axis "out": feature f is output dimension f (the piece is e_f W[f, :]).
    """

    module: str
    axis: Literal["in", "out"]
    features: list[int]  # the features the target actually represents


@dataclass(frozen=True)
class IdentityCI:
    """Each probe (one per feature) makes exactly one subcomponent important, a different one each.

    The subcomponent matched to probe f belongs to mechanism f"{label} {f}" (tied or cross-layer pieces of
    the same feature share that label, which is what a grouping of subcomponents is scored against).
    """

    probes: list[int]  # which rows of GroundTruth.probe_inputs to use
    label: str = "feature"
    modules: str | None = None  # glob over decomposed modules; default: the pattern's key in ci_patterns


@dataclass(frozen=True)
class DenseCI:
    """k subcomponents carry the module on the probes (each fully important on some), all others on none.

    The k together form one rank-k mechanism named `mechanism`. `probes` (default: all) picks the rows of
    GroundTruth.probe_inputs on which the pattern is checked.
    """

    k: int
    mechanism: str = "dense"
    probes: list[int] | None = None
    modules: str | None = None  # glob over decomposed modules; default: the pattern's key in ci_patterns


Check = Callable[[Any], tuple[dict[str, Any], list[str]]]  # model -> (metrics, failure messages)
Piece = tuple[str, int]  # (decomposed module, subcomponent index)


@dataclass(frozen=True)
class ExtraMechanism:
    """A mechanism the target really has beyond what `ci_patterns` describe (the published ground truth),
    recognised in a decomposition by what its pieces compute, not by their CI pattern.

    `find(model, probe_ci)` returns its pieces. `score` keeps the strict verdict (`passed`) and reports beside it
    the verdict with these pieces taken out of the CI patterns and alive counts they would otherwise break
    (`with_extras/...`); `mechanism_labels` labels them `name`.
    """

    name: str
    find: Callable[[Any, dict[str, Tensor]], list[Piece]]


@dataclass(frozen=True)
class Criteria:
    mmcs_min: float = 0.999
    ml2r_range: tuple[float, float] = (0.97, 1.03)
    ci_error_max: int = 0


@dataclass
class GroundTruth:
    """What a correct decomposition of a target looks like.

    Keys of `ci_patterns` (unless the pattern names its own `modules`) and of `expected_alive` are glob patterns
    over decomposed module names; a pattern that matches several modules is checked on all of them at once (CIs
    concatenated along the subcomponent axis, alive counts summed), which is how cross-layer mechanisms are
    described.
    `checks` are extra target-specific scorers (e.g. ResidMLP neuron contributions) run by `score`.
    """

    probe_inputs: Any
    directions: list[FeatureDirections] = field(default_factory=list)
    ci_patterns: dict[str, IdentityCI | DenseCI] = field(default_factory=dict)
    expected_alive: dict[str, int] = field(default_factory=dict)
    criteria: Criteria = field(default_factory=Criteria)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. n_features, n_represented
    checks: list[Check] = field(default_factory=list)
    extras: list[ExtraMechanism] = field(default_factory=list)


# ---- pure scoring functions --------------------------------------------------------------------------
def feature_pieces(
    V: Float[Tensor, "d_in C"], U: Float[Tensor, "C d_out"], W: Float[Tensor, "d_in d_out"],
    axis: Literal["in", "out"], features: list[int], rank: int = 1,
) -> tuple[Float[Tensor, "F n d"], Float[Tensor, "F d"]]:  # fmt: skip
    """Every subcomponent's (rank r > 1: every component's) piece of each feature's row ("in") or column ("out")
    of W, beside that row or column of W: ((F, C / rank, d), (F, d))."""
    if axis == "in":
        pieces = V[features, :, None] * U[None]  # (F, C, d_out)
        gt = W[features]  # (F, d_out)
    else:
        pieces = U.T[features, :, None] * V.T[None]  # (F, C, d_in)
        gt = W[:, features].T  # (F, d_in)
    if rank > 1:
        pieces = pieces.unflatten(1, (-1, rank)).sum(2)
    return pieces, gt


def orphaned_features(
    V: Float[Tensor, "d_in C"], U: Float[Tensor, "C d_out"], W: Float[Tensor, "d_in d_out"],
    axis: Literal["in", "out"], features: list[int], rank: int = 1, min_ratio: float = 0.2,
) -> list[int]:  # fmt: skip
    """Features no (sub)component carries: every piece of the feature is under `min_ratio` of its norm in W, so
    faithfulness has left it spread thinly over pieces that each do little (APD's failure on TMS 40-10)."""
    if not features:
        return []
    pieces, gt = feature_pieces(V, U, W, axis, features, rank)
    ratio = pieces.norm(dim=-1).amax(-1) / gt.norm(dim=-1).clamp_min(1e-12)  # (F,)
    return [f for f, r in zip(features, ratio.tolist(), strict=True) if r < min_ratio]


def mmcs_ml2r(
    V: Float[Tensor, "d_in C"], U: Float[Tensor, "C d_out"], W: Float[Tensor, "d_in d_out"],
    axis: Literal["in", "out"], features: list[int], rank: int = 1,
) -> tuple[float, float]:  # fmt: skip
    """Mean max cosine similarity and mean L2 ratio between subcomponents and ground-truth pieces.

    All matrices in x @ W orientation (W = V @ U). For feature f on axis "in", subcomponent c's piece is
    V[f, c] U[c, :] and the ground truth is W[f, :]; on axis "out" they are U[c, f] V[:, c] and W[:, f].
    With rank r > 1 (APD components) a component's piece is the sum of its r rank-1 pieces.
    """
    if not features:
        return float("nan"), float("nan")
    pieces, gt = feature_pieces(V, U, W, axis, features, rank)
    cos = torch.nn.functional.cosine_similarity(pieces, gt[:, None, :], dim=-1, eps=1e-12)  # (F, C)
    best = cos.argmax(-1)
    norms = pieces[torch.arange(len(features)), best].norm(dim=-1) / gt.norm(dim=-1).clamp_min(1e-12)
    return cos.max(-1).values.mean().item(), norms.mean().item()


def permute_to_diagonal(ci: Float[Tensor, "n C"]) -> Float[Tensor, "n C"]:
    """Reorder columns so that the first n (n <= C) maximise the diagonal (Hungarian), rest after."""
    n, C = ci.shape
    if n > C:
        raise ValueError(f"identity pattern needs at least as many subcomponents ({C}) as probes ({n})")
    rows, cols = linear_sum_assignment(-ci.detach().cpu().numpy())
    order = np.concatenate([cols[np.argsort(rows)], np.setdiff1d(np.arange(C), cols)])
    return ci[:, torch.as_tensor(order)]


def identity_ci_error(ci: Float[Tensor, "n C"], tol: float = TOL) -> int:
    """#(diagonal < 1 - tol) + #(off-diagonal > tol) after the best column permutation."""
    p = permute_to_diagonal(ci)
    n = p.shape[0]
    diag = p[torch.arange(n), torch.arange(n)]
    off = p.clone()
    off[torch.arange(n), torch.arange(n)] = 0.0
    return int((diag < 1 - tol).sum()) + int((off > tol).sum())


def dense_ci_error(ci: Float[Tensor, "n C"], k: int, tol: float = TOL) -> int:
    """The reference DenseCIPattern error. Columns sorted by CI mass: each of the first k that never reaches
    1 - tol on any probe counts 1, and every entry > tol in the other columns counts 1."""
    p = ci[:, ci.sum(0).argsort(descending=True)]
    never_on = int((~(p[:, :k] >= 1 - tol).any(0)).sum())
    return never_on + int((p[:, k:] > tol).sum())


def dense_ci_entries_below(ci: Float[Tensor, "n C"], k: int, tol: float = TOL) -> int:
    """Stricter, informational: #(probe, top-k column) entries below 1 - tol. Need not be 0: a probe whose
    hidden activation is nearly orthogonal to a read direction legitimately leaves that subcomponent unimportant."""
    p = ci[:, ci.sum(0).argsort(descending=True)]
    return int((p[:, :k] < 1 - tol).sum())


def own_component_count(ci: Float[Tensor, "n C"], on: float = 0.5) -> int:
    """Probes (features) whose most important subcomponent is important (> `on`) and is no other probe's most
    important one: "one component per feature" (the APD paper's ResidMLP criterion), however many others fire."""
    best = ci.argmax(-1)
    shared = torch.bincount(best, minlength=ci.shape[-1])[best] > 1
    strong = ci.max(-1).values > on
    return int((strong & ~shared).sum())


def _top_k_sum_error(comp: Any, ci: Tensor, k: int) -> float:
    """||sum of the k subcomponents with the most probe CI mass - W||_F / ||W||_F (they should sum to W)."""
    top = ci.sum(0).argsort(descending=True)[:k].to(comp.V.device)
    with torch.no_grad():
        w = comp.target_weight()
        return ((comp.weight_of(top) - w).norm() / w.norm()).item()


def firing_density(ci_batches: list[dict[str, Tensor]], threshold: float) -> dict[str, Tensor]:
    """Per module, the fraction of inputs (positions, for sequences) on which each subcomponent's CI exceeds
    `threshold` ([C])."""
    hits: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for ci in ci_batches:
        for n, g in ci.items():
            flat = g.flatten(0, -2)
            h = (flat > threshold).sum(0).double()
            hits[n] = h if n not in hits else hits[n] + h
            counts[n] = counts.get(n, 0) + flat.shape[0]
    return {n: (h / counts[n]).float() for n, h in hits.items()}


def alive_counts(
    ci_batches: list[dict[str, Tensor]], threshold: float, min_density: float = 0.0,
    exclude: frozenset[Piece] = frozenset(),
) -> dict[str, int]:  # fmt: skip
    """Subcomponents whose CI exceeds `threshold`, per module: on at least one input when `min_density` is 0,
    otherwise on more than that fraction of the inputs (the reference's activation-density notion of alive:
    a subcomponent that fires on 2 of 16k inputs at CI 0.2 is not a mechanism). `exclude`: pieces not counted."""
    dens = firing_density(ci_batches, threshold)
    for n, c in exclude:
        dens[n][c] = 0.0
    return {n: int((d > min_density).sum()) for n, d in dens.items()}


def matches_any(names: list[str], pattern: str) -> bool:
    """Whether the glob `pattern` names at least one of `names` (a ground-truth criterion applies)."""
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def matching(names: list[str], pattern: str) -> list[str]:
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise ValueError(f"ground-truth pattern {pattern!r} matches no decomposed module (they are: {names})")
    return hits


def concat_ci(ci: dict[str, Tensor], names: list[str]) -> tuple[Tensor, list[Piece]]:
    """CIs of several modules side by side ([n, sum C]) and the (module, index) of every column."""
    cols = [(n, c) for n in names for c in range(ci[n].shape[-1])]
    return torch.cat([ci[n].flatten(0, -2) for n in names], dim=-1), cols


def pattern_rows(
    probe_ci: dict[str, Tensor], key: str, truth: IdentityCI | DenseCI, exclude: frozenset[Piece] = frozenset()
) -> tuple[Tensor, list[Piece], list[str]]:
    """The probe-CI rows a pattern is checked on ([probes, sum C] over its modules, without the `exclude`
    columns), each column's (module, index), and the modules."""
    names = matching(list(probe_ci), truth.modules or key)
    ci, cols = concat_ci(probe_ci, names)
    if exclude:
        keep = [j for j, col in enumerate(cols) if col not in exclude]
        ci, cols = ci[:, keep], [cols[j] for j in keep]
    return (ci if truth.probes is None else ci[truth.probes]), cols, names


def probe_cis(model: Any, gt: GroundTruth) -> dict[str, Tensor]:
    """Lower CIs on the ground truth's probe inputs, on the CPU; for sequence inputs, the last position."""
    device = next(model.parameters()).device
    x = gt.probe_inputs
    x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
    out = {}
    for n, v in model.probe_importances(x).items():
        out[n] = (v[:, -1] if v.dim() == 3 else v).cpu()
    return out


def mechanism_labels(
    model: Any, gt: GroundTruth, probe_ci: dict[str, Tensor] | None = None
) -> dict[str, list[str | None]]:
    """The true mechanism each learned subcomponent belongs to, by its CI pattern on the probes.

    Identity patterns: a subcomponent whose CI exceeds 0.5 on some probe gets f"{label} {f}" for the probe f
    where its CI is largest, so every piece of a feature gets the feature's label (one per layer for a
    cross-layer feature, or both halves of a feature split in two). Dense patterns: the k subcomponents with
    the most probe CI mass get the pattern's mechanism name. Pieces of an ExtraMechanism get its name (and are
    left out of the patterns). Everything else is None (dead or unexplained). Used to score groupings with the
    adjusted Rand index.
    """
    probe_ci = probe_cis(model, gt) if probe_ci is None else probe_ci
    labels: dict[str, list[str | None]] = {n: [None] * v.shape[-1] for n, v in probe_ci.items()}
    found = {extra.name: extra.find(model, probe_ci) for extra in gt.extras}
    for name, pieces in found.items():
        for n, k in pieces:
            labels[n][k] = name
    exclude = frozenset(p for pieces in found.values() for p in pieces)
    for key, truth in gt.ci_patterns.items():
        if not matches_any(list(probe_ci), truth.modules or key):
            continue  # a matrix that was not decomposed (score() lists it under not_scored)
        rows, cols, _ = pattern_rows(probe_ci, key, truth, exclude)
        if isinstance(truth, IdentityCI):
            top, which = rows.max(0)
            for j in (top > 0.5).nonzero().flatten().tolist():
                n, k = cols[j]
                labels[n][k] = f"{truth.label} {truth.probes[int(which[j])]}"
        else:
            for j in rows.sum(0).argsort(descending=True)[: truth.k].tolist():
                n, k = cols[j]
                labels[n][k] = truth.mechanism
    return labels


# ---- scoring a model ---------------------------------------------------------------------------------
def _pattern_scores(
    model: Any, gt: GroundTruth, probe_ci: dict[str, Tensor], exclude: frozenset[Piece] = frozenset()
) -> tuple[dict[str, Any], list[str]]:
    """Every CI pattern's error (and its informational companions) on the decomposed modules it covers."""
    out: dict[str, Any] = {}
    failures: list[str] = []
    decomposed = list(model.module_names)
    for name, pattern in gt.ci_patterns.items():
        if not matches_any(decomposed, pattern.modules or name):
            continue
        rows, _, names = pattern_rows(probe_ci, name, pattern, exclude)
        err: Callable[[float], int]
        if isinstance(pattern, IdentityCI):
            err, label = (lambda t, rows=rows: identity_ci_error(rows, t)), "identity_ci_error"
            out[f"own_component/{name}"] = own_component_count(rows)
        else:
            err, label = (lambda t, ci=rows, k=pattern.k: dense_ci_error(ci, k, t)), "dense_ci_error"
            out[f"dense_ci_entries_below/{name}"] = dense_ci_entries_below(rows, pattern.k)
            if len(names) == 1 and pattern.probes is None and not exclude:  # the k should sum to the whole matrix
                out[f"dense_sum_rel_error/{name}"] = _top_k_sum_error(model.comp(names[0]), rows, pattern.k)
        e1, e2 = err(TOL), err(0.2)
        out[f"{label}/{name}"], out[f"{label}_0p2/{name}"] = e1, e2
        if e1 > gt.criteria.ci_error_max:
            failures.append(f"{label}/{name} = {e1} > {gt.criteria.ci_error_max} (tolerance {TOL})")
    return out, failures


def _alive_scores(
    model: Any, gt: GroundTruth, data_ci: list[dict[str, Tensor]], threshold: float, min_density: float,
    exclude: frozenset[Piece] = frozenset(),
) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Alive subcomponents (other than `exclude`) against `expected_alive`, on the decomposed modules."""
    out: dict[str, Any] = {}
    failures: list[str] = []
    alive = alive_counts(data_ci, threshold, min_density, exclude)
    ever = alive_counts(data_ci, threshold, 0.0, exclude) if min_density > 0 else alive
    for name, expected in gt.expected_alive.items():
        if not matches_any(list(model.module_names), name):
            continue
        names = matching(list(alive), name)
        n_alive = sum(alive[n] for n in names)
        out[f"alive/{name}"] = n_alive
        if min_density > 0:  # what the density cut removed is reported, not hidden
            out[f"alive_ever/{name}"] = sum(ever[n] for n in names)
        if n_alive != expected:
            rule = f"CI > {threshold} on > {min_density:g} of inputs" if min_density > 0 else f"CI > {threshold}"
            failures.append(f"alive/{name} = {n_alive} ({rule}), expected exactly {expected}")
    return out, failures


def score(
    model: Any,
    gt: GroundTruth,
    data_ci: list[dict[str, Tensor]],
    threshold: float = TOL,
    min_density: float = 0.0,
) -> dict[str, Any]:
    """Score a ComponentModel against ground truth. `data_ci`: lower CIs on batches of the data.

    Returns flat metrics plus `passed` (bool) and `failures` (what missed which criterion). Criteria on
    matrices that were not decomposed are skipped and listed under `not_scored`; a decomposition that no
    criterion applies to fails. With `gt.extras`, `extras/NAME` counts each extra mechanism's pieces and
    `with_extras/...` repeats the CI-pattern and alive scores without them, with its own `passed` and `failures`
    (the other criteria as in the strict verdict).
    """
    out: dict[str, Any] = dict(gt.info)
    failures: list[str] = []
    crit = gt.criteria
    decomposed = list(model.module_names)

    def covered(pattern: str) -> bool:
        return matches_any(decomposed, pattern)

    wanted = [d.module for d in gt.directions] + [p.modules or k for k, p in gt.ci_patterns.items()]
    wanted += list(gt.expected_alive)
    if not_scored := sorted({w for w in wanted if not covered(w)}):
        # a decomposition of some of the target's matrices is scored on those, and says which it was not
        out["not_scored"] = not_scored
        if not any(covered(w) for w in wanted):
            failures.append(f"no ground-truth criterion applies: {not_scored} match no decomposed module "
                            f"(decomposed: {decomposed})")  # fmt: skip
    for d in (d for d in gt.directions if covered(d.module)):
        c = model.comp(d.module)
        with torch.no_grad():
            args = (c.V.cpu(), c.U.cpu(), c.target_weight().cpu(), d.axis, d.features, c.rank)
            mm, ml = mmcs_ml2r(*args)
            out[f"orphaned/{d.module}"] = len(orphaned_features(*args))
        out[f"mmcs/{d.module}"], out[f"ml2r/{d.module}"] = mm, ml
        if not mm >= crit.mmcs_min:
            failures.append(f"mmcs/{d.module} = {mm:.4f} < {crit.mmcs_min}")
        lo, hi = crit.ml2r_range
        if not lo <= ml <= hi:
            failures.append(f"ml2r/{d.module} = {ml:.4f} outside [{lo}, {hi}]")
    probe_ci = probe_cis(model, gt) if gt.ci_patterns or gt.extras else {}
    pattern_out, pattern_fails = _pattern_scores(model, gt, probe_ci)
    alive_out, alive_fails = _alive_scores(model, gt, data_ci, threshold, min_density)
    out |= pattern_out | alive_out
    check_fails: list[str] = []
    for check in gt.checks:
        metrics, fails = check(model)
        out |= metrics
        check_fails += fails
    if gt.extras:
        found = {extra.name: extra.find(model, probe_ci) for extra in gt.extras}
        out |= {f"extras/{name}": len(pieces) for name, pieces in found.items()}
        exclude = frozenset(p for pieces in found.values() for p in pieces)
        p_out, p_fails = _pattern_scores(model, gt, probe_ci, exclude)
        a_out, a_fails = _alive_scores(model, gt, data_ci, threshold, min_density, exclude)
        shown = ("identity_ci_error/", "dense_ci_error/", "alive/")
        out |= {f"with_extras/{k}": v for k, v in (p_out | a_out).items() if k.startswith(shown)}
        out["with_extras/failures"] = failures + p_fails + a_fails + check_fails
        out["with_extras/passed"] = not out["with_extras/failures"]
    failures += pattern_fails + alive_fails + check_fails
    out["passed"] = not failures
    out["failures"] = failures
    return out
