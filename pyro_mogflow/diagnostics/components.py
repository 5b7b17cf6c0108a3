"""The components of a mixture guide in a diagnostics report: masses, grouped by mode."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

__all__: list = []

#: Components below this share of the mass (under q and after PSIS) are summed, not listed.
_SHOWN_MASS = 0.01
#: At most this many groups (modes) are listed per run.
_SHOWN_GROUPS = 8


def _component_summary(run: int, mass: np.ndarray, mass_psis: np.ndarray, groups) -> list:
    """Lines for one run's component masses: the modes, and the components that matter."""
    k = len(mass)
    matter = int(((mass >= _SHOWN_MASS) | (mass_psis >= _SHOWN_MASS)).sum())
    if groups is None:  # no positions to group by: one group per component
        groups = [
            {"components": [i], "mass": float(mass[i]), "mass_psis": float(mass_psis[i])}
            for i in np.argsort(-mass_psis)
        ]
    big = [g for g in groups if max(g["mass"], g["mass_psis"]) >= _SHOWN_MASS]
    lines = [
        f"  run {run}: {k} components, {matter} with at least {_SHOWN_MASS:.0%} of the mass, "
        f"on {len(big)} mode(s)  [mass under q -> after PSIS]"
    ]
    for i, g in enumerate(big[:_SHOWN_GROUPS]):
        members = [c for c in g["components"] if max(mass[c], mass_psis[c]) >= _SHOWN_MASS]
        listed = ", ".join(f"#{c} {mass[c]:.2f}->{mass_psis[c]:.2f}" for c in members[:6])
        rest = len(g["components"]) - min(len(members), 6)
        if rest:
            listed += f", +{rest} smaller"
        text = (
            f"mode {i + 1}: {g['mass']:.2f} -> {g['mass_psis']:.2f} "
            f"({len(g['components'])} component(s): {listed})"
        )
        lines.extend(
            textwrap.wrap(text, width=96, initial_indent="    ", subsequent_indent="      ")
        )
    rest = groups[len(big[:_SHOWN_GROUPS]) :]
    if rest:
        q = sum(g["mass"] for g in rest)
        p = sum(g["mass_psis"] for g in rest)
        n = sum(len(g["components"]) for g in rest)
        lines.append(f"    other {n} component(s): {q:.2f} -> {p:.2f}")
    return lines


def _component_groups(posterior, component, mass, mass_psis) -> tuple | None:
    """Per run, components grouped by where their draws lie (see ``component_groups``)."""
    from ..guides.summaries import group_components

    if posterior is None or not len(posterior.data_vars):
        return None
    runs, draws = component.shape
    parts = []
    for name in posterior.data_vars:
        v = posterior[name]
        v = v.transpose("chain", "draw", *[d for d in v.dims if d not in ("chain", "draw")])
        parts.append(np.asarray(v.values, dtype=np.float64).reshape(runs, draws, -1))
    values = np.concatenate(parts, axis=-1)  # (R, S, P)
    out = []
    for r in range(runs):
        used = np.unique(component[r])
        means = np.stack([values[r, component[r] == c].mean(0) for c in used])
        spread = np.stack([values[r, component[r] == c].std(0) for c in used])
        spread = np.maximum(spread, 1e-9 * (1 + np.abs(means)))
        groups = []
        for g in group_components(means, spread, mass_psis[r, used]):
            members = [int(used[i]) for i in g["components"]]
            members.sort(key=lambda c: -mass_psis[r, c])
            groups.append(
                {
                    "components": members,
                    "mass": float(mass[r, members].sum()),
                    "mass_psis": float(mass_psis[r, members].sum()),
                }
            )
        unused = [c for c in range(mass.shape[1]) if c not in set(used.tolist())]
        if unused:
            groups.append({"components": unused, "mass": 0.0, "mass_psis": 0.0})
        groups.sort(key=lambda g: -max(g["mass_psis"], g["mass"]))
        out.append(tuple(groups))
    return tuple(out)


def _component_masses(
    component: np.ndarray, log_w_smoothed: np.ndarray, num_components: int
) -> tuple[np.ndarray, np.ndarray]:
    runs, draws = component.shape
    before = np.zeros((runs, num_components))
    after = np.zeros((runs, num_components))
    for r in range(runs):
        before[r] = np.bincount(component[r], minlength=num_components)[:num_components] / draws
        weights = np.exp(log_w_smoothed[r])
        after[r] = np.bincount(component[r], weights=weights, minlength=num_components)[
            :num_components
        ]
    return before, after


# ------------------------------------------------------------------------ entry point
