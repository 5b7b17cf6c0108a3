"""``fit()`` on one target of the real-models benchmark, one seed, with options: the rounds it
ran, its reductions and the scores of :func:`benchmarks.real_models.evaluate`::

    python -m benchmarks.fit_one gmm40_50d --seed 0 --options '{"rounds": 8}'
"""

from __future__ import annotations

import argparse
import json

import torch

from .real_models import NUM_EVAL, _truth, evaluate
from .runner import seeded_fit

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="fit() options, as JSON")
    opts = parser.parse_args(argv)
    options = json.loads(opts.options)
    torch.set_num_threads(1)
    bench, truth, bins = _truth(opts.target)
    t = bench.target
    result, seconds = seeded_fit(t.model, t.args, t.kwargs, opts.seed, options)
    scores = evaluate(result.guide, bench, truth, bins, NUM_EVAL)
    report = {
        "target": opts.target,
        "seed": opts.seed,
        "options": options,
        "seconds": round(seconds, 1),
        "steps": result.next_step,
        "reason": result.reason,
        "K": result.guide.num_components,
        "rounds": result.rounds,
        "scores": {k: round(v, 4) for k, v in scores.items()},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
