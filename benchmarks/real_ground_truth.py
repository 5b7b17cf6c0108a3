r"""Ground truth of the real-models benchmark: long multi-chain NUTS, combined through symmetry.

For a target whose posterior has no exact sampler (``RealTarget.truth == "nuts"``),
:func:`run_nuts` runs ``num_chains`` independent NUTS chains (``pyro.infer.MCMC``), chain ``c``
started at the image ``group[c % len(group)]`` of the target's reference point (so the chains
start in different modes). Every draw is then relabelled canonically
(:attr:`RealTarget.canonical`) and the canonical draws are stored in
``benchmarks/ground_truth/<name>.npz`` with a JSON sidecar saying how they were made (chains,
steps, starting points, R-hat of the key statistics across chains, divergences, time, versions).

:func:`load_ground_truth` spreads the stored draws over every element of the symmetry group
(:meth:`RealTarget.symmetrize`), so each symmetric mode holds exactly ``1 / |group|`` of them,
whichever modes the chains visited.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from .real_targets import RealTarget

__all__ = ["GROUND_TRUTH_DIR", "NUTS_SETTINGS", "load_ground_truth", "run_nuts", "split_rhat"]

#: Where the stored draws live (committed).
GROUND_TRUTH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ground_truth")
#: name -> (chains, warmup steps, kept draws per chain, thinning).
NUTS_SETTINGS: dict[str, tuple[int, int, int, int]] = {
    "bgmm": (4, 300, 750, 1),
    "bnn": (4, 250, 400, 1),
    "factor": (4, 300, 750, 1),
}


def split_rhat(chains: np.ndarray) -> float:
    """Split-:math:`\\hat R` (Gelman et al. 2013) of draws shaped ``(chains, draws)``."""
    c, n = chains.shape
    half = n // 2
    parts = np.concatenate([chains[:, :half], chains[:, half : 2 * half]])
    m = parts.mean(1)
    w = parts.var(1, ddof=1).mean()
    b = half * m.var(ddof=1)
    var = (half - 1) / half * w + b / half
    return float(np.sqrt(var / w))


def run_nuts(bench: RealTarget, seed: int = 0) -> dict:
    """Run the NUTS chains for ``bench`` and write ``<name>.npz`` and ``<name>.json``.

    :return: the sidecar document.
    """
    chains, warmup, keep, thin = NUTS_SETTINGS[bench.name]
    target = bench.target
    torch.set_num_threads(1)
    per_chain, info, start = [], [], time.perf_counter()
    for c in range(chains):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed + c)
        element = bench.group[c % len(bench.group)]
        init = element({k: v.unsqueeze(0) for k, v in bench.init.items()})
        init = {k: v.squeeze(0) for k, v in init.items()}
        kernel = NUTS(
            target.model,
            init_strategy=init_to_value(values=init),
            jit_compile=True,
            ignore_jit_warnings=True,
        )
        mcmc = MCMC(kernel, num_samples=keep * thin, warmup_steps=warmup, disable_progbar=True)
        t0 = time.perf_counter()
        mcmc.run(*target.args, **target.kwargs)
        draws = {k: v[::thin].detach().float() for k, v in mcmc.get_samples().items()}
        diverging = int(mcmc.diagnostics()["divergences"]["chain 0"].__len__())
        per_chain.append(draws)
        info.append(
            {
                "chain": c,
                "start": {k: v.tolist() for k, v in init.items()},
                "seconds": round(time.perf_counter() - t0, 1),
                "divergences": diverging,
            }
        )
        print(f"{bench.name}: chain {c} done in {info[-1]['seconds']} s", flush=True)
    canon = [bench.canonical(d) for d in per_chain]
    stats = [bench.stats(d) for d in canon]
    rhat = {
        k: round(split_rhat(np.stack([s[k].double().numpy() for s in stats])), 4) for k in stats[0]
    }
    merged = {k: torch.cat([d[k] for d in canon]) for k in canon[0]}
    os.makedirs(GROUND_TRUTH_DIR, exist_ok=True)
    np.savez_compressed(
        os.path.join(GROUND_TRUTH_DIR, f"{bench.name}.npz"),
        **{k: v.numpy().astype(np.float32) for k, v in merged.items()},
    )
    doc = {
        "target": bench.name,
        "description": bench.description,
        "method": "pyro.infer.MCMC with NUTS (jit), one chain per run; chain c started at the "
        "image group[c % |group|] of the reference point 'init'; every draw relabelled to the "
        "canonical labelling (RealTarget.canonical) and stored; the loader spreads the draws "
        "over all |group| symmetric images (RealTarget.symmetrize), so every symmetric mode "
        "holds exactly 1/|group| of them",
        "chains": chains,
        "warmup_steps": warmup,
        "draws_per_chain": keep,
        "thinning": thin,
        "stored_draws": int(next(iter(merged.values())).shape[0]),
        "group_size": len(bench.group),
        "seed": seed,
        "split_rhat_canonical_stats": rhat,
        "chains_info": info,
        "total_seconds": round(time.perf_counter() - start, 1),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
        "command": "python -m benchmarks.real_models --ground-truth",
    }
    with open(os.path.join(GROUND_TRUTH_DIR, f"{bench.name}.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    return doc


def load_ground_truth(bench: RealTarget) -> dict[str, torch.Tensor]:
    """The stored NUTS draws of ``bench``, spread over its symmetry group.

    :raises FileNotFoundError: with the command that makes them, if they are missing.
    """
    path = os.path.join(GROUND_TRUTH_DIR, f"{bench.name}.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no ground truth for {bench.name!r} at {path}; run "
            "`python -m benchmarks.real_models --ground-truth`"
        )
    with np.load(path) as data:
        draws = {k: torch.from_numpy(data[k]) for k in data.files}
    return bench.symmetrize(draws)
