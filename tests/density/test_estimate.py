"""fit_density: fits, errors before any work, dtypes, history and early stopping."""

import math

import numpy as np
import pytest
import torch

from pyro_mogflow import fit_density
from pyro_mogflow.density import FittedDensity

_MODES = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])
_FAST = dict(progress=False, max_epochs=40, patience=10, hidden_dims=(16,), batch_size=200)


def _four_modes(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = _MODES[torch.randint(4, (n,), generator=g)] + 0.5 * torch.randn(n, 2, generator=g)
    return x.to(dtype)


def _true_log_prob(x):
    comp = torch.distributions.Normal(_MODES.to(x), 0.5).log_prob(x.unsqueeze(-2)).sum(-1)
    return torch.logsumexp(comp, -1) - math.log(4)


def test_mixture_flow_fits_close_to_truth():
    """Held-out log-likelihood within a few standard errors (plus a fit slack) of the truth."""
    x, test = _four_modes(1600), _four_modes(2000, seed=1)
    q = fit_density(x, num_components=4, seed=0, **_FAST)
    assert isinstance(q, FittedDensity)
    lp, true = q.log_prob_chunked(test), _true_log_prob(test)
    diff = (true - lp).double()
    se = diff.std().item() / math.sqrt(len(diff))
    assert diff.mean().item() < 3 * se + 0.1  # KL(p || q) estimate, >= 0 up to noise
    # every mode gets its share of samples: binomial SE of 1/4 with 4000 draws
    s = q.sample((4000,))
    frac = (torch.cdist(s, _MODES).argmin(-1)[:, None] == torch.arange(4)).float().mean(0)
    assert (frac - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / 4000) + 0.03


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_flow_starts_at_the_identity_so_components_sit_on_the_data(dim):
    x = torch.randn(400, dim) * torch.arange(1.0, dim + 1)
    q = fit_density(x, seed=0, **{**_FAST, "max_epochs": 1, "learning_rate": 1e-12})
    u = torch.randn(200, dim)
    # Pyro's zeroed spline maps each knot to itself (slope softplus(0) there, not 1), so the
    # stack is the identity up to small bends, and no coordinate is permuted
    moved = (q.module.flow(u) - u).abs().max().item()
    assert moved < 0.3
    assert (q.module.flow(u) - u.flip(-1)).abs().max().item() > 1.0


def test_history_and_best_epoch_restored():
    x = _four_modes(600)
    q = fit_density(x, num_components=4, seed=0, **_FAST)
    h = q.history
    assert len(h["train"]) == len(h["held_out"]) == len(h["time"]) >= 1
    assert q.best_epoch == int(np.argmax(h["held_out"]))


@pytest.mark.parametrize("model", ["mixture_flow", "gmm", "realnvp", "nsf", "rad"])
def test_every_model_runs_and_samples(model):
    x = _four_modes(300)
    q = fit_density(x, model=model, seed=0, **{**_FAST, "max_epochs": 3})
    s = q.sample((7,))
    assert s.shape == (7, 2)
    lp = q.log_prob(s)
    assert lp.shape == (7,) and torch.isfinite(lp).all()
    comps = q.components()
    assert comps["locs"].shape[-1] == 2
    assert torch.isclose(comps["weights"].sum(), torch.tensor(1.0), atol=1e-5)


def test_rsample_carries_gradients_and_rad_has_none():
    x = _four_modes(300)
    q = fit_density(x, seed=0, estimator="implicit", **{**_FAST, "max_epochs": 2})
    z = q.rsample((5,))
    z.sum().backward()
    assert q.module.locs.grad is not None and torch.isfinite(q.module.locs.grad).all()
    rad = fit_density(x, model="rad", seed=0, **{**_FAST, "max_epochs": 1})
    assert not rad.has_rsample
    with pytest.raises(NotImplementedError):
        rad.rsample((2,))


def test_float64_and_numpy_input():
    x = _four_modes(300, dtype=torch.float64).numpy()
    q = fit_density(x, seed=0, **{**_FAST, "max_epochs": 2})
    assert q.sample((3,)).dtype == torch.float64
    assert q.log_prob(torch.zeros(2, 2, dtype=torch.float64)).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in q.module.parameters())


def test_same_seed_same_fit():
    x = _four_modes(300)
    a = fit_density(x, seed=3, **{**_FAST, "max_epochs": 2})
    b = fit_density(x, seed=3, **{**_FAST, "max_epochs": 2})
    assert a.history["held_out"] == b.history["held_out"]


def test_chunked_evaluation_matches_and_is_bounded():
    x = _four_modes(300)
    q = fit_density(x, seed=0, **{**_FAST, "max_epochs": 1})
    test = _four_modes(200, seed=2)
    full = q.log_prob(test).detach()
    tiny = q.log_prob_chunked(test, memory_budget=1)  # one row per chunk
    assert torch.allclose(full, tiny, atol=1e-4, rtol=1e-5)  # float32 batch-size rounding


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        (torch.randn(100), {}, ValueError, r"shape \(N, D\)"),
        (torch.randn(10, 2, 2), {}, ValueError, r"shape \(N, D\)"),
        ([[1.0, 2.0]], {}, TypeError, "data"),
        (np.array([["a", "b"]]), {}, TypeError, "data"),
        (torch.randn(5, 2), {}, ValueError, "too few points"),
        (torch.randn(100, 2), {"num_components": 0}, ValueError, "num_components"),
        (torch.randn(100, 2), {"num_components": 2.5}, TypeError, "num_components"),
        (torch.randn(100, 2), {"model": "maf"}, ValueError, "model"),
        (torch.randn(100, 2), {"flow": "nope"}, ValueError, "flow"),
        (torch.randn(100, 2), {"flow": "planar"}, ValueError, "forward-only"),
        (torch.randn(100, 2), {"estimator": "reinforce"}, ValueError, "estimator"),
        (torch.randn(100, 2), {"validation_fraction": 1.0}, ValueError, "validation_fraction"),
        (torch.randn(100, 2), {"learning_rate": -1.0}, ValueError, "learning_rate"),
        (torch.randn(100, 2), {"progress": "yes"}, TypeError, "progress"),
        (torch.randn(100, 2), {"hidden_dims": 32}, TypeError, "hidden_dims"),
        (torch.randn(100, 1), {}, ValueError, "spline_autoregressive"),
    ],
)
def test_bad_input_raises_before_work(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_density(data, progress=False, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rows_named(bad):
    x = torch.randn(100, 2)
    x[7, 1] = bad
    with pytest.raises(ValueError, match=r"1 rows with NaN or inf.*\[7\]"):
        fit_density(x, progress=False)


def test_constant_column_raises():
    x = torch.randn(100, 2)
    x[:, 1] = 3.0
    with pytest.raises(ValueError, match="constant columns"):
        fit_density(x, progress=False)


def test_one_dimensional_data_with_autoregressive_flow_and_rad():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 1, generator=g) - 3, torch.randn(200, 1, generator=g) + 3])
    for kw in ({"flow": "spline_autoregressive"}, {"model": "rad"}, {"model": "gmm"}):
        q = fit_density(x, seed=0, **{**_FAST, "max_epochs": 2}, **kw)
        assert q.sample((4,)).shape == (4, 1)
