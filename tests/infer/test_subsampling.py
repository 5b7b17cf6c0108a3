"""A likelihood plate with ``subsample_size``: the stratified ELBO is unbiased for the full-data
one, fit() finds the full-data posterior, and the steps that need the full data refuse."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO, fit
from pyro_mogflow.infer import balance_weights
from pyro_mogflow.infer.subsampling import subsampled_plates

N, B = 200, 50
TRUE_W = (1.0, -2.0)


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def model(x, y, subsample_size=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 2.0).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), 1.0), obs=y[idx])


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(N, generator=g, dtype=torch.float64)
    return x, (x * torch.tensor(TRUE_W, dtype=torch.float64)).sum(-1) + noise


def _zero_noise(monkeypatch):
    real = torch.randn

    def randn(*shape, **kwargs):
        return torch.zeros_like(real(*shape, **kwargs))

    monkeypatch.setattr(torch, "randn", randn)


def _loss_and_grad(elbo, guide, *args):
    guide.zero_grad()
    loss = elbo.loss_and_grads(model, guide, *args)
    return torch.cat([torch.tensor([loss], dtype=torch.float64), guide.locs.grad.reshape(-1)])


def test_the_subsampled_elbo_and_its_gradient_are_unbiased(monkeypatch):
    x, y = _data()
    torch.manual_seed(0)
    guide = AutoMixtureFlow(model, num_components=3, init_scale=0.5).setup(x, y)
    _zero_noise(monkeypatch)  # the draws are fixed: only the subsample is random
    elbo = StratifiedELBO()
    full = _loss_and_grad(elbo, guide, x, y)
    torch.manual_seed(1)
    reps = torch.stack([_loss_and_grad(elbo, guide, x, y, B) for _ in range(200)])
    mean, se = reps.mean(0), reps.std(0) / 200**0.5
    assert (se > 0).all()  # the subsample does vary
    assert ((mean - full).abs() < 4 * se).all(), (mean - full) / se


def _posterior(x, y):
    """The exact Gaussian posterior of w: precision I/4 + X'X, unit noise."""
    precision = torch.eye(2, dtype=x.dtype) / 4 + x.T @ x
    cov = torch.linalg.inv(precision)
    return cov @ (x.T @ y), cov.diagonal().sqrt()


def test_fit_on_a_subsampled_model_finds_the_full_data_posterior():
    x, y = _data()
    mean, sd = _posterior(x, y)
    means = []
    for size in (None, B):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="subsamples") if size else _nothing():
            guide = fit(
                model,
                x,
                y,
                size,
                num_steps=500,
                progress=False,
                guide=AutoMixtureFlow(model, num_components=2),
            ).guide
        with torch.no_grad():
            w = torch.stack([guide(x, y)["w"] for _ in range(1000)])
        # 500 SVI steps leave the mean within a posterior standard deviation of the exact
        # one, full data or not, and the spread within a factor 2 of the exact one
        assert ((w.mean(0) - mean).abs() < sd).all(), (size, w.mean(0), mean, sd)
        ratio = w.std(0) / sd
        assert ((ratio > 0.5) & (ratio < 2.0)).all(), (size, ratio)
        means.append(w.mean(0))
    assert ((means[0] - means[1]).abs() < sd).all(), (means, sd)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_balance_weights_refuses_a_subsampled_model():
    x, y = _data()
    guide = AutoMixtureFlow(model, num_components=2).setup(x, y, B)
    assert subsampled_plates(model, guide, (x, y, B), {}) == ["data"]
    assert subsampled_plates(model, guide, (x, y), {}) == []
    with pytest.raises(ValueError, match=r"subsamples plate\(s\) \['data'\]"):
        balance_weights(model, guide, x, y, B)
    assert balance_weights(model, guide, x, y, num_particles=4).shape == (2,)
