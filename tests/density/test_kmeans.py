"""k-means++ seeding puts a component on every well-separated cluster."""

import torch

from pyro_mogflow.density.kmeans import kmeans_init, kmeans_pp_centres


def test_every_cluster_gets_a_component():
    torch.manual_seed(0)
    centres = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0], [0.0, -10.0]])
    # unequal clusters: 1000, 100, 20, 5 points
    x = torch.cat([c + 0.3 * torch.randn(n, 2) for c, n in zip(centres, [1000, 100, 20, 5])])
    g = torch.Generator().manual_seed(1)
    logits, locs, scales = kmeans_init(x, 4, generator=g)
    dist = torch.cdist(centres, locs)
    assert (dist.min(-1).values < 0.5).all()
    sizes = torch.tensor([1000.0, 100, 20, 5])
    # a sample standard deviation of n points has standard error ~ sigma / sqrt(2 (n - 1))
    tol = 4 * 0.3 / (2 * (sizes - 1)).sqrt()
    assert ((scales[dist.argmin(-1)] - 0.3).abs() < tol.unsqueeze(-1)).all()
    w = torch.softmax(logits, -1)[dist.argmin(-1)]
    assert torch.allclose(w, torch.tensor([1000, 100, 20, 5.0]) / 1125, atol=0.01)


def test_seeds_are_data_rows_and_dtype_kept():
    x = torch.randn(50, 3, dtype=torch.float64)
    c = kmeans_pp_centres(x, 5, torch.Generator().manual_seed(0))
    assert c.dtype == torch.float64
    assert (torch.cdist(c, x).min(-1).values < 1e-6).all()
