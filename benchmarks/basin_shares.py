"""Which GMM-40 modes prior-draw starts reach, and how rounds of starts cover them.

A start runs to the mode whose basin it lies in; with the nearest mean as a stand-in for the
basin, this counts each mode's share of ``--draws`` draws of the prior N(0, 25^2) per
coordinate, and of the draws spread ``c`` times wider (the later rounds' overdispersed starts,
:data:`pyro_mogflow.infer.rounds.OVERDISPERSION`), then simulates rounds of 64 starts on those
shares under two rules: the fourth session's (all rounds from the prior, stop after one round
that adds no mode, at most 4 rounds) and today's (the later rounds overdispersed, stop after
:data:`~pyro_mogflow.infer.rounds.PATIENCE` rounds in a row add none, at most
:data:`~pyro_mogflow.infer.rounds.MAX_ROUNDS`)::

    python -m benchmarks.basin_shares --draws 200000 --trials 2000
"""

from __future__ import annotations

import argparse
import json

import torch

from pyro_mogflow.infer.rounds import MAX_ROUNDS, OVERDISPERSION, PATIENCE

from .real_targets import gmm40_50d

__all__ = ["main"]

PRIOR_SCALE, STARTS = 25.0, 64


def shares(modes: torch.Tensor, scale: float, draws: int, gen: torch.Generator) -> torch.Tensor:
    """Each mode's share of ``draws`` draws of N(0, scale^2 I) (nearest mean), shape ``(M,)``."""
    counts = torch.zeros(len(modes), dtype=torch.float64)
    for start in range(0, draws, 20_000):
        x = torch.randn(min(20_000, draws - start), modes.shape[1], generator=gen)
        x = x.double() * scale
        counts += torch.bincount(torch.cdist(x, modes).argmin(1), minlength=len(modes))
    return counts / draws


def simulate(
    first, later, patience: int, max_rounds: int, trials: int, gen: torch.Generator
) -> dict:
    """Rounds of :data:`STARTS` starts (Good-Turing trigger after the first): modes found."""
    found, rounds = [], []
    for _ in range(trials):
        seen = torch.bincount(
            torch.multinomial(first, STARTS, True, generator=gen), minlength=len(first)
        )
        r, empty = 1, 0
        if int((seen == 1).sum()) >= 1:
            while r < max_rounds:
                new = torch.bincount(
                    torch.multinomial(later, STARTS, True, generator=gen), minlength=len(later)
                )
                added = int(((seen == 0) & (new > 0)).sum())
                seen, r = seen + new, r + 1
                empty = empty + 1 if added == 0 else 0
                if empty >= patience:
                    break
        found.append(int((seen > 0).sum()))
        rounds.append(r)
    f = torch.tensor(found, dtype=torch.float64)
    return {
        "mean_modes": round(float(f.mean()), 2),
        "p_all": round(float((f == len(first)).double().mean()), 3),
        "mean_rounds": round(sum(rounds) / trials, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200_000)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(opts.seed)
    modes = gmm40_50d().target.modes.double()
    prior = shares(modes, PRIOR_SCALE, opts.draws, gen)
    wide = shares(modes, PRIOR_SCALE * OVERDISPERSION, opts.draws, gen)
    report = {
        "prior_shares": [round(float(prior.min()), 4), round(float(prior.max()), 4)],
        "overdispersed_shares": [round(float(wide.min()), 4), round(float(wide.max()), 4)],
        "fourth_session_prior_rounds_stop_after_1_empty_at_most_4": simulate(
            prior, prior, 1, 4, opts.trials, gen
        ),
        f"overdispersed_rounds_stop_after_{PATIENCE}_empty": simulate(
            prior, wide, PATIENCE, MAX_ROUNDS, opts.trials, gen
        ),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
