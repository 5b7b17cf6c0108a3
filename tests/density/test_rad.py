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


def _perturbed_layer(num_pieces, dim=2, seed=0, scale=0.5):
    torch.manual_seed(seed)
    layer = RADCoupling(dim, num_pieces=num_pieces, hidden_dims=(8,)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("num_pieces", [3, 5])
def test_map_is_continuous_and_zig_zags(num_pieces):
    """Neighbouring pieces meet at the boundaries (reflections), slopes alternate +, -, +, ..."""
    layer = _perturbed_layer(num_pieces)
    x_a = torch.randn(50, 1, dtype=torch.float64)
    bounds, _, _, slopes, *_ = layer._pieces(x_a)
    eps = 1e-7
    for j in range(num_pieces - 1):
        b = bounds[:, 0, j : j + 1]
        z_left, k_left, *_ = layer.encode(torch.cat([x_a, b - eps], -1))
        z_right, k_right, *_ = layer.encode(torch.cat([x_a, b + eps], -1))
        assert (k_left[:, 0] == j).all() and (k_right[:, 0] == j + 1).all()
        assert torch.allclose(z_left[:, 1], z_right[:, 1], atol=1e-5)
    signs = torch.sign(slopes[:, 0])
    expected = torch.tensor([1.0 if j % 2 == 0 else -1.0 for j in range(num_pieces)])
    assert (signs == expected.to(signs)).all()


def test_every_core_point_has_one_preimage_per_piece():
    layer = _perturbed_layer(5, seed=2)
    x_a = torch.randn(200, 1, dtype=torch.float64)
    *_, low, up = layer._pieces(x_a)
    z_b = low + (up - low) * torch.rand_like(low)
    z = torch.cat([x_a, z_b], -1)
    for k in range(5):
        kk = torch.full((200, 1), k, dtype=torch.long)
        x = layer.decode(z, kk)
        z_back, k_back, _, log_gate = layer.encode(x)
        assert (k_back == kk).all()
        assert torch.allclose(z_back, z, atol=1e-9)
        assert torch.isfinite(log_gate).all()


def test_even_num_pieces_rejected():
    with pytest.raises(ValueError, match="odd"):
        RADCoupling(2, num_pieces=4)
    with pytest.raises(ValueError, match="odd"):
        build_rad_layers(2, 2, num_pieces=6)


def test_initial_layer_is_close_to_a_standard_normal():
    """At initialisation a RAD flow starts where Real NVP starts: within 0.15 nat (KL) of N(0, 1)
    per transformed coordinate (0.12 with the default span), whatever its conditioner input."""
    x = torch.linspace(-10, 10, 40001, dtype=torch.float64).unsqueeze(-1)
    log_n = -0.5 * x[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
    layer = RADCoupling(1, num_pieces=3).double()
    with torch.no_grad():
        lp = RADFlow([layer], 1).log_prob(x)
    kl = torch.trapezoid(log_n.exp() * (log_n - lp), x[:, 0]).item()
    assert 0 <= kl < 0.15
    wide = RADCoupling(1, num_pieces=3, span=2.0).double()
    with torch.no_grad():
        lp_wide = RADFlow([wide], 1).log_prob(x)
    assert torch.trapezoid(log_n.exp() * (log_n - lp_wide), x[:, 0]).item() > 5 * kl


def test_rad_density_trains_rad_layers_at_a_higher_rate():
    from pyro_mogflow.density.builders import RADDensity

    module = RADDensity(torch.zeros(2), torch.ones(2), 2, num_layers=2)
    groups = module.param_groups(1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    assert all(g["lr"] == pytest.approx(RADDensity.lr_scale * 1e-3) for g in groups)
    assert RADDensity.lr_scale > 1


def test_points_on_the_boundaries_have_a_finite_density():
    """x exactly on a boundary maps to a turning point U or L of the core; the closed core and
    the producing piece's validity keep its gate probability (and density) positive."""
    layer = RADCoupling(1, num_pieces=5, span=2.0).double()
    bounds, *_ = layer._pieces(torch.zeros(1, 0, dtype=torch.float64))
    x = torch.cat([bounds[0, 0], bounds[0, 0] + 1e-12, bounds[0, 0] - 1e-12]).unsqueeze(-1)
    _, _, log_det, log_gate = layer.encode(x)
    assert torch.isfinite(log_gate).all() and torch.isfinite(log_det).all()
