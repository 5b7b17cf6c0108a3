"""Deprecated location, kept for one release; import from pyro_mogflow.examples.

The demo moved to :mod:`pyro_mogflow.examples.demo`; this module re-exports its public names,
and keeps the old names ``fit`` (now :func:`~pyro_mogflow.examples.demo.fit_guide`) and
``evaluate`` (now :func:`~pyro_mogflow.examples.demo.evaluate_guide`) as aliases. Importing it
issues a :class:`DeprecationWarning`.
"""

import warnings

from .examples.demo import (
    DEFAULT_OUT,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    LEARNING_RATE,
    MODE_THRESHOLD,
    NUM_EVAL_SAMPLES,
    DemoResult,
    GuideReport,
    demo_target,
    evaluate_guide,
    fit_guide,
    format_table,
    make_guides,
    plot_posteriors,
    run_demo,
)

#: Deprecated alias of :func:`pyro_mogflow.examples.demo.fit_guide`.
fit = fit_guide
#: Deprecated alias of :func:`pyro_mogflow.examples.demo.evaluate_guide`.
evaluate = evaluate_guide

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_SEED",
    "DEFAULT_OUT",
    "LEARNING_RATE",
    "MODE_THRESHOLD",
    "NUM_EVAL_SAMPLES",
    "GuideReport",
    "DemoResult",
    "demo_target",
    "make_guides",
    "fit_guide",
    "evaluate_guide",
    "fit",
    "evaluate",
    "format_table",
    "plot_posteriors",
    "run_demo",
]

warnings.warn(
    "pyro_mogflow.demo is deprecated and will be removed in the next release; import from "
    "pyro_mogflow.examples.demo instead",
    DeprecationWarning,
    stacklevel=2,
)
