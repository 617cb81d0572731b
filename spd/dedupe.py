"""Merge duplicate subcomponents: pieces of one matrix that read the same thing and so carry one mechanism.

A decomposition can end with one mechanism split over two rank-1 subcomponents a and b of one matrix whose
reads agree on the data (b's inner activation h_b = x . V_b is a multiple of a's where either is important)
and that share its write. Both are then important on the same inputs, and the importance-minimality loss
hardly moves them, since shifting the write from one to the other changes neither the output nor (at CI 1 on
both) the penalty. On ResidMLP 3 such pairs survive thousands of steps. Folding b into a removes them:

    V_a U_a + V_b U_b  =  V_a (U_a + s U_b) + (V_b - s V_a) U_b,     s fitted so that h_b = s h_a where b fires,

so a takes b's write and b keeps only the part of its read that is not a's: the matrix is unchanged, and b,
with a CI that is 0 everywhere from now on (`CIFunction.silence`), is a spare. Where b was important, a now
does what both did (up to the fit of s). Use it on a finished run and train a short tail from the result
(`train.init_from`): see `benchmarks/merge_duplicates.py`.

Reads are compared on the data, not as vectors: two reads that differ only in directions no input has (on
ResidMLP, the 900 of 1000 residual dimensions outside the feature span) are the same read. `max_cos` bounds the
cosine of the two inner-activation columns over the inputs where b fires and, separately, where a fires; the
two gains may differ, not their signs (the spare's remainder restores the difference where a fires, when it
is unmasked). On inputs with one feature active any two reads are proportional, so each piece must also see the
other's inputs with at least `min_gain` of its own rms activation: a read that merely leaks onto another
feature does not make a duplicate.

Two such pieces may also split one read by input region instead (on ResidMLP, one piece for a feature's
positive values and one for its negative values: the CI penalty is the same for one piece firing on both and
for two firing on half each; in the later layers the two halves see the feature with different gains, since
the earlier layers' ReLU outputs respond to one sign only). `min_overlap=0` merges those too.

A piece b may also repeat several pieces at once, each on its own inputs (on ResidMLP 3, a layer-0 piece firing
on features 9 and 58, with h_b = -0.88 h_a1 on one's inputs and 1.04 h_a2 on the other's, R^2 0.99999 where
b fires, beside each feature's own piece). No pair passes the test above (a2 is silent on a1's inputs), so
after the pairs every remaining b is regressed on the pieces it repeats (|cos| > `max_cos` and gain on each
one's inputs, b firing on at least `min_overlap` of them): h_b = sum_a s_a h_a where b fires, with R^2 >
`max_cos`^2, is folded into all of them at once, U_a += s_a U_b and V_b -= sum_a s_a V_a, again exact.

The kept piece must then be important wherever either was. The CI function is refitted for that (`fit_steps`):
a short supervised fit of its logits to max(z_a, z_b) for each kept a (the same as max of the two CIs, the
sigmoids being monotone; after a fold into several pieces, each a takes b's logit only on the inputs where
s_a h_a is at least half of b's read) and to themselves for every other subcomponent, on the inputs given.
Without it the tail has to teach a's CI the other half, and it hardly does: a CI at 0 gets only the sigmoid's
leak as gradient (on ResidMLP 3 a kept half still fired on one sign only 2000 steps after the merge).

During training, `train.merge` (spd.config.MergeConfig) calls this at set steps on fresh inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from spd.model import ComponentModel


@torch.no_grad()
def merge_duplicates(
    model: ComponentModel,
    x: Any,
    max_cos: float = 0.9,
    min_overlap: float = 0.5,
    threshold: float = 0.1,
    min_density: float = 0.0,
    min_gain: float = 0.3,
    fit_steps: int = 300,
    seed: int = 0,
) -> dict[str, list[tuple[int, int]]]:
    """Fold every alive subcomponent b into a larger alive one a of the same matrix when their inner
    activations (x @ V) have |cosine| > `max_cos` over the inputs of `x` where b fires and over those where a
    fires, each seeing the other's inputs with at least `min_gain` of the rms inner activation it has on its
    own, and the less often firing of the two fires together with the other on at least `min_overlap` of its
    inputs (firing: CI > `threshold`; alive: firing on more than `min_density` of `x`, as in the run's eval
    config). Larger means larger |V||U| (a's mechanism carries more of the write). The matrix is unchanged; the
    CI function is then refitted for `fit_steps` Adam steps (module docstring; 0: not refitted). A piece that
    repeats several pieces at once, each on its own inputs, is folded into all of them (module docstring). Returns
    {module: [(a, b): b folded into a]} (a fold into several pieces: one pair per a, same b); tied modules (and
    their sources) are left alone."""
    if not 0 < max_cos < 1 or not 0 <= min_overlap <= 1 or not min_gain > 0:
        raise ValueError(
            "merge_duplicates needs 0 < max_cos < 1, 0 <= min_overlap <= 1 and min_gain > 0, got "
            f"{max_cos}, {min_overlap}, {min_gain}"
        )
    if model.ci_fn is None:
        raise ValueError("merge_duplicates needs the model's CI function (to decide which pieces fire together)")
    clean = model.clean_pass(x)
    inner = model.inner_acts(clean.acts)  # before any fold: each module's own is read before it changes
    logits = model.ci_fn(clean.acts, inner)
    ci = {n: model.lower_sigmoid(z) for n, z in logits.items()}
    skip = set(model.tied) | set(model.tied.values())
    merged: dict[str, list[tuple[int, int]]] = {}
    scales: dict[tuple[str, int, int], float] = {}  # (module, a, b): the s of b's fold into a
    for name in model.module_names:
        if name in skip:
            continue
        comp = model.comp(name)
        if comp.rank != 1:
            raise ValueError(f"merge_duplicates: {name!r} has rank {comp.rank}; it is for rank-1 (method spd)")
        V, U = comp.V, comp.U  # (d_in, C), (C, d_out)
        fire = (ci[name].flatten(0, -2) > threshold).float()
        count = fire.sum(0)
        idx = (count > max(min_density * fire.shape[0], 0.5)).nonzero().flatten()  # the alive ones
        h = inner[name].flatten(0, -2)[:, idx].double()  # (N, alive): x . V_c
        f = fire[:, idx].double()
        # [a, b]: sums over the inputs where b fires (rows a, columns b: the other region is the transpose)
        h2 = h * h
        cross = h.T @ (h * f)  # sum h_a h_b
        sq_a, own = h2.T @ f, (h2 * f).sum(0)  # sum h_a^2; sum h_b^2 (each piece where it fires itself)
        cos = cross / (sq_a * own[None, :]).sqrt().clamp_min(1e-30)  # cos(h_a, h_b) where b fires
        same = (cos.abs() > max_cos) & (cos.T.abs() > max_cos) & (cos * cos.T > 0)  # ... and where a fires
        # on one feature's inputs any two reads are proportional: a must also see b's inputs about as strongly
        # as its own (and b a's), or a read that merely leaks onto b's feature would pass
        n = f.sum(0).clamp_min(1)
        gain = (sq_a / n[None, :]) / (own / n)[:, None].clamp_min(1e-30)  # [a, b]: rms ratio^2
        same &= torch.minimum(gain, gain.T) > min_gain**2
        both = f.T @ f
        overlap = both / torch.minimum(count[idx][:, None], count[idx][None, :]).double().clamp_min(1)
        size = U.norm(dim=1) * V.norm(dim=0)
        alive = torch.ones(len(idx), dtype=torch.bool)
        pairs: list[tuple[int, int]] = []
        for i in size[idx].argsort(descending=True).tolist():
            a = int(idx[i])
            if not alive[i]:
                continue
            for j in (same[i] & alive & (overlap[i] >= min_overlap)).nonzero().flatten().tolist():
                b = int(idx[j])
                if j == i or size[b] > size[a]:
                    continue
                s = (cross[i, j] / sq_a[i, j].clamp_min(1e-30)).to(V.dtype)  # h_b = s h_a where b fires
                U[a] += s * U[b]
                V[:, b] -= s * V[:, a]
                model.ci_fn.silence(name, b)
                alive[j] = False
                pairs.append((a, b))
                scales[(name, a, b)] = float(s)
        # b repeating several pieces at once, each on its own inputs (module docstring): where b fires,
        # h_b = sum_a s_a h_a; on each a's inputs, b fires and reads what a reads
        into = {a for a, _ in pairs}
        kept = {i for i in range(len(idx)) if int(idx[i]) in into}
        # [a, b]: b fires on a's inputs (on at least min_overlap of them: 0 admits sign splits, as for pairs)
        covers = (both > 0) & (both / count[idx][:, None].double().clamp_min(1) >= min_overlap)
        seen = gain.T  # [a, b]: b's rms on a's inputs / b's own, squared
        on_a = (cos.T.abs() > max_cos) & (seen > min_gain**2) & covers  # [a, b]: b reads as a does, where a fires
        for j in size[idx].argsort().tolist():
            group = [i for i in (on_a[:, j] & alive).nonzero().flatten().tolist() if i != j]
            if j in kept or not alive[j] or len(group) < 2:
                continue
            rows = f[:, j] > 0
            H, y = h[rows][:, group], h[rows, j]
            coef = torch.linalg.lstsq(H, y[:, None]).solution.flatten()
            if 1 - (y - H @ coef).square().sum() / y.square().sum().clamp_min(1e-30) < max_cos**2:
                continue
            b = int(idx[j])
            for i, c in zip(group, coef.to(V.dtype).tolist(), strict=True):
                a = int(idx[i])
                U[a] += c * U[b]
                V[:, b] -= c * V[:, a]
                pairs.append((a, b))
                scales[(name, a, b)] = c
                kept.add(i)
            model.ci_fn.silence(name, b)
            alive[j] = False
        merged[name] = pairs
    if fit_steps and any(merged.values()):
        _refit_ci(model, clean.acts, logits, merged, scales, fit_steps, seed)
    return merged


def _refit_ci(
    model: ComponentModel,
    acts: dict[str, torch.Tensor],
    logits: dict[str, torch.Tensor],
    merged: dict[str, list[tuple[int, int]]],
    scales: dict[tuple[str, int, int], float],
    steps: int,
    seed: int,
    lr: float = 1e-2,
    batch_size: int = 512,
) -> None:
    """Fit the CI function's logits to the pre-merge ones, with max(z_a, z_b) for each kept a (see the module
    docstring) and the spares left out; the spares are silenced again at the end (a shared net may have moved
    them). Errors count only inside the sigmoid's working range: a logit beyond it on the same side as its
    target is exact (0 to 1 for the clamped sigmoids; -6 to 6 for the logistic one)."""
    assert model.ci_fn is not None
    lo, hi = (-6.0, 6.0) if model.lower_sigmoid is torch.sigmoid else (0.0, 1.0)
    flat = {name: a.flatten(0, -2) if a.is_floating_point() else a.flatten() for name, a in acts.items()}
    inner = {name: h.flatten(0, -2) for name, h in model.inner_acts(flat).items()}  # V is fixed from here
    targets, weights = {}, {}
    for name, z in logits.items():
        t, w = z.flatten(0, -2).clone(), torch.ones(z.shape[-1], device=z.device)
        pairs = merged.get(name, [])
        # each a takes b's importance where it carries most of b's read (all of it when b had one a)
        part = {(a, b): (scales[(name, a, b)] * inner[name][:, a]).abs() for a, b in pairs}
        whole = {b: sum(part[(a, bb)] for a, bb in pairs if bb == b) for _, b in pairs}
        for a, b in pairs:
            mine = part[(a, b)] >= 0.5 * whole[b]
            t[:, a] = torch.where(mine, torch.maximum(t[:, a], z.flatten(0, -2)[:, b]), t[:, a])
            w[b] = 0.0
        targets[name], weights[name] = t, w
    n = next(iter(targets.values())).shape[0]
    # half of each batch from the inputs where a merged pair is important (what changes), half from all
    focus = torch.zeros(n, dtype=torch.bool, device=next(iter(targets.values())).device)
    for name, pairs in merged.items():
        for a, _ in pairs:
            focus |= targets[name][:, a] > lo
    focus_rows = focus.nonzero().flatten().cpu()
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.ci_fn.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(n, (batch_size // 2,), generator=generator)
            if len(focus_rows):
                pick = torch.randint(len(focus_rows), (batch_size // 2,), generator=generator)
                rows = torch.cat([rows, focus_rows[pick]])
            rows = rows.to(focus.device)
            z = model.ci_fn({k: a[rows] for k, a in flat.items()}, {k: h[rows] for k, h in inner.items()})
            loss = torch.zeros((), device=focus.device)
            for name, t in targets.items():
                zt, tt = z[name].flatten(0, -2), t[rows]
                beyond = ((tt >= hi) & (zt >= hi)) | ((tt <= lo) & (zt <= lo))
                err = torch.where(beyond, 0.0, zt - tt.clamp(lo, hi)) * weights[name]
                loss = loss + err.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for name, pairs in merged.items():
        for _, b in pairs:
            model.ci_fn.silence(name, b)
