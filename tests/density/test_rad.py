"""RAD layer and flow: normalisation, exact sampling, exact inverse, finite gradients."""

import math

import pytest
import torch

from pyro_mogflow.density.rad import RADCoupling, RADFlow, build_rad_layers


def _perturbed(dim, num_layers, num_pieces, scale=0.3, dtype=torch.float64):
    torch.manual_seed(1)
    layers = build_rad_layers(dim, num_layers, num_pieces, (8,)).to(dtype)
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(scale * torch.randn_like(p))
    return RADFlow(layers, dim)


@pytest.mark.parametrize("num_pieces", [3, 5, 7])
def test_log_density_integrates_to_one_1d(num_pieces):
    d = _perturbed(1, 2, num_pieces)
    x = torch.linspace(-30, 30, 120001, dtype=torch.float64).unsqueeze(-1)
    total = torch.trapezoid(d.log_prob(x).exp(), x[:, 0]).item()
    # mass beyond the grid, from 20000 exact draws (its standard error bounds the tail term)
    s = d.sample((20000,))
    outside = (s.abs() > 30).double().mean().item()
    se = math.sqrt(max(outside, 1 / 20000) / 20000)
    # the density jumps at the piece boundaries: trapezoid error <= jumps * h * max p
    assert abs(total + outside - 1) < 4 * se + 5e-3


def test_log_density_integrates_to_one_2d():
    d = _perturbed(2, 2, 3, scale=0.2)
    g = torch.linspace(-12, 12, 601, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    h = (g[1] - g[0]).item()
    total = d.log_prob(pts).exp().sum().item() * h * h
    s = d.sample((20000,))
    outside = (s.abs() > 12).any(-1).double().mean().item()
    se = math.sqrt(max(outside, 1 / 20000) / 20000)
    assert abs(total + outside - 1) < 4 * se + 0.01


def test_samples_match_density_chi_square():
    """Two-sample check: sample counts on a 1-D grid of bins against the density's bin masses."""
    d = _perturbed(1, 2, 3, scale=0.5)
    fine = torch.linspace(-6, 6, 24 * 400 + 1, dtype=torch.float64)
    dens = d.log_prob(fine.unsqueeze(-1)).exp()
    cum = torch.cat([torch.zeros(1, dtype=dens.dtype), torch.cumulative_trapezoid(dens, fine)])
    mass = cum[::400].diff()  # mass in each of 24 bins
    n = 20000
    torch.manual_seed(3)
    s = d.sample((n,))[:, 0]
    counts = torch.histc(s, bins=24, min=-6, max=6)
    keep = mass * n > 5
    expected = mass[keep] * n
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    dof = int(keep.sum()) - 1
    # chi-square 99.99% quantile ~ dof + 4.3 sqrt(2 dof) (normal approximation), plus quadrature;
    # a RAD flow with an unmasked gate scores chi2 ~ 5000 here
    assert chi2 < dof + 4.3 * math.sqrt(2 * dof) + 5


def test_decode_inverts_encode():
    torch.manual_seed(0)
    layer = RADCoupling(3, num_pieces=5, hidden_dims=(8,)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = 3 * torch.randn(500, 3, dtype=torch.float64)
    z, k, log_det, log_gate = layer.encode(x)
    assert torch.allclose(layer.decode(z, k), x, atol=1e-9)
    assert torch.isfinite(log_gate).all() and (log_gate <= 1e-12).all()
    assert log_det.shape == (500,)


def test_gate_is_zero_on_pieces_that_cannot_produce_z():
    layer = RADCoupling(1, num_pieces=3, gate_bias=0.0).double()
    z = torch.tensor([[-5.0], [0.0], [5.0]], dtype=torch.float64)
    probs = layer.gate_probs(z)[:, 0]  # (3, K)
    assert torch.allclose(probs[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(probs[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert probs[0, 1:].eq(0).all() and probs[2, :2].eq(0).all()
    assert torch.allclose(probs[1], torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite(dtype):
    d = _perturbed(2, 2, 5, dtype=dtype)
    x = 3 * torch.randn(256, 2, dtype=dtype)
    loss = -d.log_prob(x).mean()
    loss.backward()
    params = [p for layer in d.layers for p in getattr(layer, "parameters", list)()]
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_pieces"):
        RADCoupling(2, num_pieces=1)
    with pytest.raises(TypeError, match="dim"):
        RADCoupling(2.5)
    with pytest.raises(TypeError, match="layers"):
        RADFlow([torch.nn.Linear(2, 2)], 2)
