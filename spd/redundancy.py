"""Firing-pattern redundancy: do the subcomponents that fire together on some inputs do more than one's work?

A ground-truth-free density check. Inputs are grouped by their firing pattern in one module (the set of
subcomponents with CI above the threshold). Inside a group every input is served by the same |S| pieces, so
those pieces only need to span the inputs' own subspace: if the group's inputs to the matrix span rank r < |S|,
then r pieces, each firing on exactly this group, could replace |S|. Averaged over the inputs in repeated
patterns, redundancy = mean |S| / mean r. A sparse, correct decomposition scores 1 (ResidMLP 1 at the paper's
coefficient: one W_in piece per input, inputs of one feature span rank 1); one whose features are each spread
over many shared pieces scores far above it (ResidMLP 1 at 1/30 of the coefficient: 15 pieces per input on
inputs of rank 1). A dense layer every input needs whole scores about 1 too (an identity: all pieces on every
input, inputs spanning its full rank), which is what the L0-vs-rank rule cannot tell apart.

Only patterns seen at least `min_factor` x |S| + 2 times are judged (fewer inputs cannot show a rank of |S|),
so `coverage` (share of inputs judged) says how much of the data the number speaks for; in a language model,
where patterns rarely repeat, coverage is near 0 and the check stays silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

ENERGY = 0.99  # effective rank: the fewest singular directions holding this share of the squared norm


def effective_rank(rows: Float[Tensor, "n d"], energy: float = ENERGY) -> int:
    """Fewest singular directions holding `energy` of the rows' squared norm (uncentred: the pieces act
    linearly on the rows, so their span is what matters); 0 for all-zero rows."""
    s2 = torch.linalg.svdvals(rows.double()) ** 2
    total = s2.sum()
    if total <= 0:
        return 0
    return int((s2.cumsum(0) < energy * total).sum().item()) + 1


@dataclass
class _Module:
    rows: dict[bytes, list[Tensor]] = field(default_factory=dict)  # pattern -> stored input rows (capped)
    counts: dict[bytes, int] = field(default_factory=dict)  # pattern -> inputs seen (repeated patterns only)
    sizes: dict[bytes, int] = field(default_factory=dict)  # pattern -> |S|
    n_inputs: int = 0


@dataclass
class PatternTally:
    """Accumulates firing patterns and the matching matrix inputs over evaluation batches.

    A pattern is kept once it repeats inside one batch (or was kept before); per pattern at most
    `min_factor` x 2 x |S| + 8 rows are stored, enough to show any rank up to |S|, so memory stays bounded by the
    repeated patterns, not by the data.
    """

    threshold: float
    min_factor: float = 2.0
    modules: dict[str, _Module] = field(default_factory=dict)

    def add(self, acts: dict[str, Tensor], ci: dict[str, Tensor]) -> None:
        """acts: each module's input (..., d_in); ci: its importances (..., C) on the same inputs."""
        for n, g in ci.items():
            fire = g.reshape(-1, g.shape[-1]) > self.threshold
            a = acts[n].reshape(-1, acts[n].shape[-1]).detach()
            if a.shape[0] != fire.shape[0]:  # a module called more than once per input: no 1:1 pairing
                continue
            m = self.modules.setdefault(n, _Module())
            m.n_inputs += fire.shape[0]
            # grouped on the inputs' device; only the few rows kept per repeated pattern come to the CPU
            pats, inverse, counts = torch.unique(fire, dim=0, return_inverse=True, return_counts=True)
            counts_l = counts.tolist()
            groups = torch.split(a[torch.argsort(inverse, stable=True)], counts_l)  # rows per pattern
            pats = pats.cpu()
            sizes = pats.sum(-1).tolist()
            for p, row in enumerate(pats.numpy()):
                if sizes[p] == 0:
                    continue
                key = row.tobytes()
                if counts_l[p] < 2 and key not in m.counts:
                    continue
                m.counts[key] = m.counts.get(key, 0) + counts_l[p]
                m.sizes[key] = sizes[p]
                stored = m.rows.setdefault(key, [])
                room = int(2 * self.min_factor * sizes[p] + 8) - sum(r.shape[0] for r in stored)
                if room > 0:  # a copy, so the batch's activations are not kept alive through a view
                    stored.append(groups[p][:room].float().cpu().clone())

    def summary(self, max_patterns: int = 256) -> dict[str, dict[str, float]]:
        """Per module: redundancy (mean |S| / mean effective rank over judged inputs; 0 when none judged),
        coverage (judged inputs / all inputs), l0 and rank (those two means), patterns (how many were judged;
        the `max_patterns` most frequent at most)."""
        out = {}
        for n, m in self.modules.items():
            judged = sorted(
                (k for k, c in m.counts.items() if c >= self.min_factor * m.sizes[k] + 2),
                key=lambda k: -m.counts[k],
            )[:max_patterns]
            w = l0 = rank = 0.0
            used = 0
            for k in judged:
                r = effective_rank(torch.cat(m.rows[k]))
                if r == 0:  # the inputs are all zero here: nothing to span
                    continue
                c = m.counts[k]
                w, l0, rank, used = w + c, l0 + c * m.sizes[k], rank + c * r, used + 1
            out[n] = {
                "redundancy": l0 / rank if rank else 0.0,
                "coverage": w / m.n_inputs if m.n_inputs else 0.0,
                "l0": l0 / w if w else 0.0,
                "rank": rank / w if w else 0.0,
                "patterns": float(used),
            }
        return out
