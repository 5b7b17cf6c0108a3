"""Helpers shared by the tests of pyro_mogflow.infer."""

import pyro
import pyro.distributions as dist
import torch

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


def regression(x, y):
    """A vectorized 2-weight regression with a noise scale: the model of the chunking tests."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 2.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(torch.zeros((), dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), s), obs=y)


def regression_data(dtype=torch.float64, n=30):
    """``n`` points of :func:`regression`'s data, seeded."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    return x, (x * torch.tensor([1.0, -2.0], dtype=dtype)).sum(-1).abs()


def zero_noise(monkeypatch):
    """Make ``torch.randn`` return zeros: every stratified draw sits at its component's mean."""
    real = torch.randn

    def randn(*shape, **kwargs):
        return torch.zeros_like(real(*shape, **kwargs))

    monkeypatch.setattr(torch, "randn", randn)


def grads_of(guide):
    """The guide's parameter gradients, cloned, by name."""
    return {name: p.grad.clone() for name, p in guide.named_parameters() if p.grad is not None}
