"""``fit(num_steps="auto")`` on the multimodal benchmark's targets, with options to compare.

The quick suite (``python -m benchmarks.multimodal --suite quick``) runs a fixed number of steps,
so it does not see the automatic budget (adaptive anneal, pruning, plateau stop). This runs
``fit`` with every default (plus ``--options``) on one target and seed and prints the steps,
the reason it stopped, the components left, the wall time and the scores of
:func:`benchmarks.metrics.evaluate` (reverse KL with its SE, importance-sampling |Δlog Z|,
modes covered, mass TV)::

    python -m benchmarks.auto_budget grid9 --seed 0 --options '{"anneal": "fixed"}'
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import torch

from .metrics import evaluate
from .multimodal import _truth
from .runner import seeded_fit

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a target of benchmarks.targets, e.g. grid9, signreg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="fit options as JSON")
    opts = parser.parse_args(argv)
    options = json.loads(opts.options)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pyro").setLevel(logging.WARNING)
    bench, true_samples, bins = _truth(opts.target)
    model, args, kwargs = bench.target.model, bench.target.args, bench.target.kwargs
    result, seconds = seeded_fit(model, args, kwargs, opts.seed, options)
    metrics = evaluate(result.guide, bench, true_samples, bins)
    row = {
        "target": opts.target,
        "seed": opts.seed,
        "options": options,
        "seconds": round(seconds, 1),
        "steps": result.next_step,
        "reason": result.reason,
        "K": result.guide.num_components,
        **{k: round(float(metrics[k]), 4) for k in ("reverse_kl", "reverse_kl_se")},
        "abs_log_z_error": round(abs(float(metrics["log_z_error"])), 4),
    }
    if "mass_tv" in metrics:  # multimodal targets
        row["mass_tv"] = round(float(metrics["mass_tv"]), 4)
        row["modes"] = f"{metrics['modes_covered']}/{metrics['num_modes']}"
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
