"""The plain ``SVI(..., Trace_ELBO())`` loop on the Bayesian mixture: the ELBO along the way
(200 draws every ``--every`` steps) and the mean training loss of the last ``--last`` steps, for
AutoNormal and AutoMixtureFlow with 64 and with 1 component, each from its default start
(where AutoNormal starts, zero in the unconstrained space, found without a random draw) and
from the prior mean (the default before the fifth session), and one component with
AutoNormal's own ``init_to_feasible`` (the same start and, with ``--every`` above
``--steps``, the same random draws as AutoNormal)::

    python -m benchmarks.plain_saddle --seed 0 --steps 3000 --every 100000 --last 500
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_feasible
from pyro.optim import Adam

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.guides.initialization import init_to_prior_mean

from .real_targets import build_real_target

__all__ = ["main"]

GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMixtureFlow": AutoMixtureFlow,
    "AutoMixtureFlow(init_loc_fn=init_to_prior_mean)": partial(
        AutoMixtureFlow, init_loc_fn=init_to_prior_mean
    ),
    "AutoMixtureFlow(num_components=1)": partial(AutoMixtureFlow, num_components=1),
    "AutoMixtureFlow(num_components=1, init_loc_fn=init_to_prior_mean)": partial(
        AutoMixtureFlow, num_components=1, init_loc_fn=init_to_prior_mean
    ),
    # AutoNormal's own init strategy: the same start and the same random draws as AutoNormal
    "AutoMixtureFlow(num_components=1, init_loc_fn=init_to_feasible)": partial(
        AutoMixtureFlow, num_components=1, init_loc_fn=init_to_feasible
    ),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--last", type=int, default=500)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    t = build_real_target("bgmm").target
    report = {}
    for name, make in GUIDES.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(opts.seed)
        guide = make(t.model)
        svi = SVI(t.model, guide, Adam({"lr": 0.005}), Trace_ELBO())
        trace, losses = [], []
        for step in range(1, opts.steps + 1):
            losses.append(svi.step(*t.args, **t.kwargs))
            if step % opts.every == 0:
                with torch.no_grad():
                    loss = Trace_ELBO(num_particles=200).loss(t.model, guide, *t.args, **t.kwargs)
                trace.append((step, round(-float(loss), 2)))
        tail = losses[-opts.last :]
        report[name] = {"elbo": trace, "mean_loss_last": round(sum(tail) / len(tail), 2)}
        print(json.dumps({name: report[name]}), flush=True)
    return report


if __name__ == "__main__":
    main()
