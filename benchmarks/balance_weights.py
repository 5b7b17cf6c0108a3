"""How long does fit()'s final weight balancing take? ``python -m benchmarks.balance_weights``

Times :func:`pyro_mogflow.balance_weights` as :func:`pyro_mogflow.fit` calls it (the default
K = 64 guide after 50 fit steps, 256 draws per component), best of 3, on one thread.
"""

from __future__ import annotations

import time

import pyro
import torch

from pyro_mogflow import AutoMixtureFlow, balance_weights, fit
from pyro_mogflow.examples import gaussian_mixture_target, sign_regression


def main() -> None:
    torch.set_num_threads(1)
    targets = {
        "2-mode 1-D": gaussian_mixture_target([[-3.0], [3.0]], scales=0.5),
        "demo sign_regression": sign_regression(seed=0),
    }
    for name, target in targets.items():
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        guide = AutoMixtureFlow(target.model)
        fit(
            target.model,
            *target.args,
            guide=guide,
            num_steps=50,
            progress=False,
            balance=None,
            model_kwargs=target.kwargs,
        )
        for objective in ("forward", "elbo"):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                balance_weights(
                    target.model,
                    guide,
                    *target.args,
                    num_particles=256,
                    objective=objective,
                    **target.kwargs,
                )
                times.append(time.perf_counter() - start)
            print(f"{name:22s} {objective:8s} best of 3: {min(times):.3f} s")


if __name__ == "__main__":
    main()
