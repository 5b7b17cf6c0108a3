"""Helpers shared by the tests of pyro_mogflow.infer."""

from pyro_mogflow import fit


def fit_target(target, guide, **options):
    """``fit`` on a built-in target (its model, data and keyword data), quietly."""
    return fit(
        target.model,
        *target.args,
        guide=guide,
        progress=False,
        model_kwargs=target.kwargs,
        **options,
    )
