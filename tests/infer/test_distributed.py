"""Tests for pyro_mogflow.infer.distributed: data-parallel SVI on torch.distributed.

Two gloo processes on CPU (``torch.multiprocessing.spawn``, a free port) train a guide with
:class:`DistributedSVI`; the parent checks, against plain single-process Pyro SVI, that the
gradients of one step are the full-data gradients (float64, float tolerance) and that the
ranks' checkpoints are identical after some steps although each rank started from its own
random initialization and drew its own noise.
"""

from __future__ import annotations

import os
import socket
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from pyro.infer import SVI, Trace_ELBO

from pyro_mogflow import AmortizedMixtureFlow, AutoMixtureFlow, DistributedSVI, StratifiedELBO
from pyro_mogflow.infer import all_reduce_grads, broadcast_parameters

N = 7  # not divisible by the world size: shares of 4 and 3 points
WORLD = 2
DTYPE = torch.float64


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g, dtype=DTYPE)
    y = x @ torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=DTYPE) + 0.3 * torch.randn(
        N, generator=g, dtype=DTYPE
    )
    return x, y


def regression(x, y, subsample=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(4, dtype=x.dtype), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("data", len(x), subsample=subsample) as idx:
        pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), sigma), obs=y[idx])


def _amf(rank_seed, num_components=3):
    torch.manual_seed(rank_seed)  # each rank its own init and flow permutations
    return AutoMixtureFlow(
        regression,
        num_components=num_components,
        flow="affine_autoregressive",
        num_flows=2,
        init_scale=0.3,
    )


def _tensors(state):
    return {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}


def _encoder(rank_seed):
    torch.manual_seed(rank_seed)
    return AmortizedMixtureFlow(
        4, 4, num_components=2, num_flows=2, hidden_dims=(8,), estimator="stratified"
    ).to(DTYPE)


def local_model(x, y, subsample=None):
    scale = pyro.param(
        "scale", torch.tensor(0.5, dtype=x.dtype), constraint=dist.constraints.positive
    )
    with pyro.plate("data", len(x), subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(4, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("y", dist.Normal((x[idx] * z).sum(-1), scale), obs=y[idx])


def _local_guide(encoder):
    def guide(x, y, subsample=None):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x), subsample=subsample) as idx:
            pyro.sample("z", encoder(x[idx]))

    return guide


def _scale():
    return pyro.get_param_store().get_param("scale").unconstrained()


def _grads(named):
    return {name: p.grad.detach().clone() for name, p in named if p.grad is not None}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        result = {}
        # --- AutoMixtureFlow + StratifiedELBO
        pyro.clear_param_store()
        guide = _amf(100 + rank)
        svi = DistributedSVI(
            regression,
            guide,
            pyro.optim.Adam({"lr": 0.05}),
            StratifiedELBO(2),
            plate="data",
            size=N,
        )
        svi.setup(x, y)
        result["amf_init"] = _tensors(guide.state_dict())
        pyro.set_rng_seed(0)  # the same draws on both ranks: the step equals one full-data step
        loss, _ = svi.loss_and_reduced_grads(x, y)
        result["amf_loss"] = loss
        result["amf_grads"] = _grads(guide.named_parameters())
        for p in guide.parameters():
            p.grad = None
        pyro.set_rng_seed(10 + rank)  # from here each rank draws its own noise
        for _ in range(3):
            svi.step(x, y)
        result["amf_final"] = guide.state_dict()
        # --- AmortizedMixtureFlow in a guide function
        pyro.clear_param_store()
        encoder = _encoder(200 + rank)
        svi = DistributedSVI(
            local_model,
            _local_guide(encoder),
            pyro.optim.Adam({"lr": 0.05}),
            StratifiedELBO(),
            plate="data",
            size=N,
            modules=[encoder],
        )
        svi.setup(x, y)
        result["enc_init"] = {
            k: v.clone() for k, v in encoder.state_dict().items() if torch.is_tensor(v)
        }
        result["scale_init"] = pyro.param("scale").detach().clone()
        pyro.set_rng_seed(20)
        loss, _ = svi.loss_and_reduced_grads(x, y)
        result["enc_loss"] = loss
        result["enc_grads"] = _grads(encoder.named_parameters())
        result["enc_grads"]["scale"] = _scale().grad.clone()
        # --- component-parallel StratifiedELBO: K = 5 components over 2 ranks (3 + 2)
        pyro.clear_param_store()
        guide = _amf(300 + rank, num_components=5)
        svi = DistributedSVI(
            regression, guide, pyro.optim.Adam({"lr": 0.05}), StratifiedELBO(2),
            parallel="components",
        )  # fmt: skip
        svi.setup(x, y)
        result["comp_init"] = _tensors(guide.state_dict())
        result["comp_share"] = svi.components
        pyro.set_rng_seed(30 + rank)  # independent noise per share
        result["comp_loss"], _ = svi.loss_and_reduced_grads(x, y)
        result["comp_grads"] = _grads(guide.named_parameters())
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    # fork starts in a fraction of spawn's time; each worker goes to one thread before any
    # torch work (as DataLoader workers do), so no OpenMP pool crosses the fork
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(
        _worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method=method
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=k)


def test_one_step_of_two_ranks_has_the_full_data_gradient(ranks):
    """Shares of 4 and 3 points, weighted 4/7 and 3/7: exactly one process on all 7 points."""
    x, y = _data()
    guide = _amf(0)
    guide.setup(x, y)
    guide.load_state_dict(ranks[0]["amf_init"], strict=False)
    pyro.set_rng_seed(0)
    elbo = StratifiedELBO(2)
    svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    loss = elbo.loss_and_grads(regression, guide, x, y)
    assert ranks[0]["amf_loss"] == pytest.approx(loss, rel=1e-12)
    assert ranks[1]["amf_loss"] == ranks[0]["amf_loss"]
    expected = _grads(guide.named_parameters())
    assert expected and all(g.abs().sum() > 0 for g in expected.values())
    _assert_close(ranks[0]["amf_grads"], expected)
    _assert_close(ranks[1]["amf_grads"], expected)
    del svi


def test_ranks_start_from_rank_zero_and_stay_identical(ranks):
    """Each rank built its guide from its own seed (other permutations, other init) and drew its
    own noise for three steps; broadcast and all-reduce keep the checkpoints equal."""
    x, y = _data()
    own = _amf(101)
    own.setup(x, y)
    differs = [
        k
        for k, v in own.state_dict().items()
        if torch.is_tensor(v) and not torch.equal(v, ranks[1]["amf_init"][k])
    ]
    assert any("permutation" in k for k in differs)  # the broadcast replaced rank 1's buffers
    for key in ("amf_init", "amf_final", "enc_init"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.equal(a[k], b[k]), (key, k)
            else:
                assert a[k] == b[k], (key, k)
    # the reduced-gradient call + 3 steps, plus the memory planner's probe runs of the guide
    assert ranks[0]["amf_final"]["_extra_state"]["step"] >= 4
    assert not torch.equal(
        ranks[0]["amf_final"]["locs_unconstrained"], ranks[0]["amf_init"]["locs_unconstrained"]
    )


def test_amortized_guide_gradients_are_the_weighted_sum_of_the_shares(ranks):
    """The reference: plain Pyro SVI on each share (Pyro's own ``subsample=``) with the draws
    the ranks took, summed with weights b_r / N."""
    x, y = _data()
    encoder = _encoder(0)
    encoder.load_state_dict(ranks[0]["enc_init"], strict=False)  # tensors; step is 0 anyway
    pyro.param("scale", ranks[0]["scale_init"].clone(), constraint=dist.constraints.positive)
    guide = _local_guide(encoder)
    total, expected = 0.0, {}
    for share in torch.tensor_split(torch.arange(N), WORLD):
        pyro.set_rng_seed(20)
        elbo = StratifiedELBO()
        loss = elbo.loss_and_grads(local_model, guide, x, y, subsample=share)
        weight = len(share) / N
        total += weight * loss
        grads = _grads(encoder.named_parameters())
        grads["scale"] = _scale().grad.clone()
        for k, g in grads.items():
            expected[k] = expected.get(k, 0) + weight * g
        for p in list(encoder.parameters()) + [_scale()]:
            p.grad = None
    assert ranks[0]["enc_loss"] == pytest.approx(total, rel=1e-12)
    _assert_close(ranks[0]["enc_grads"], expected)
    _assert_close(ranks[1]["enc_grads"], expected)


# ----------------------------------------------------------------------- one process
def test_without_a_process_group_it_is_plain_svi():
    x, y = _data()
    runs = []
    for cls_kwargs in ({"plate": "data", "size": N}, None):
        pyro.clear_param_store()
        guide = _amf(3)
        guide.setup(x, y)
        pyro.set_rng_seed(1)
        if cls_kwargs is None:
            svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.05}), StratifiedELBO())
        else:
            svi = DistributedSVI(
                regression, guide, pyro.optim.Adam({"lr": 0.05}), StratifiedELBO(), **cls_kwargs
            )
        losses = [svi.step(x, y) for _ in range(3)]
        runs.append((losses, guide.locs_unconstrained.detach().clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1])
    assert broadcast_parameters(guide) == 0  # one process: nothing to share
    p = torch.ones(2, requires_grad=True)
    all_reduce_grads([p])  # no gradient counts as zero
    assert torch.equal(p.grad, torch.zeros(2))


def test_component_parallel_gradients_are_the_sum_of_the_component_shares(ranks):
    """Rank r evaluated components C_r with seed 30 + r; the reduced gradient is the sum of
    the shares' gradients, each computed here by StratifiedELBO.only_components."""
    x, y = _data()
    shares = [ranks[r]["comp_share"] for r in range(WORLD)]
    assert [s.tolist() for s in shares] == [[0, 1, 2], [3, 4]]
    guide = _amf(0, num_components=5)
    guide.setup(x, y)
    guide.load_state_dict(ranks[0]["comp_init"], strict=False)
    total, expected = 0.0, {}
    for rank, share in enumerate(shares):
        pyro.set_rng_seed(30 + rank)
        elbo = StratifiedELBO(2)
        with elbo.only_components(share):
            total += elbo.loss_and_grads(regression, guide, x, y)
        for k, g in _grads(guide.named_parameters()).items():
            expected[k] = expected.get(k, 0) + g
        for p in guide.parameters():
            p.grad = None
    assert ranks[0]["comp_loss"] == pytest.approx(total, rel=1e-12)
    assert ranks[1]["comp_loss"] == ranks[0]["comp_loss"]
    _assert_close(ranks[0]["comp_grads"], expected)
    _assert_close(ranks[1]["comp_grads"], expected)


def test_bad_arguments_and_a_wrong_plate_name_raise():
    x, y = _data()
    guide = _amf(0)
    optim, elbo = pyro.optim.Adam({"lr": 0.01}), StratifiedELBO()
    with pytest.raises(ValueError, match="size"):
        DistributedSVI(regression, guide, optim, elbo, plate="data")
    with pytest.raises(ValueError, match="plate"):
        DistributedSVI(regression, guide, optim, elbo, size=N)
    with pytest.raises(TypeError, match="optim"):
        DistributedSVI(regression, guide, torch.optim.Adam, elbo)
    with pytest.raises(TypeError, match="modules"):
        DistributedSVI(regression, guide, optim, elbo, modules=[3])
    with pytest.raises(ValueError, match="parallel"):
        DistributedSVI(regression, guide, optim, elbo, parallel="model")
    with pytest.raises(TypeError, match="StratifiedELBO"):
        DistributedSVI(regression, guide, optim, Trace_ELBO(), parallel="components")
    with pytest.raises(ValueError, match="not the components"):
        DistributedSVI(regression, guide, optim, elbo, parallel="components", plate="data", size=N)
    svi = DistributedSVI(regression, guide, optim, elbo, plate="obs", size=N)
    with pytest.raises(ValueError, match="no pyro.plate named 'obs'"):
        svi.setup(x, y)
    svi = DistributedSVI(regression, guide, optim, elbo, plate="data", size=N + 1)
    with pytest.raises(ValueError, match="has size 7"):
        svi.setup(x, y)


@pytest.mark.filterwarnings("ignore:Encountered")
def test_a_non_finite_step_changes_nothing():
    x, y = _data()

    def broken(x, y):
        regression(x, y)
        pyro.factor("infinite", torch.tensor(float("inf"), dtype=x.dtype))

    guide = _amf(0)
    svi = DistributedSVI(
        broken, guide, pyro.optim.Adam({"lr": 0.05}), StratifiedELBO(), plate="data", size=N
    )
    svi.setup(x, y)
    before = {k: v.clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match="not finite"):
        svi.step(x, y)
    for k, v in guide.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k
    assert all(p.grad is None or not p.grad.any() for p in guide.parameters())
