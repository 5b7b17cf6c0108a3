"""Data-parallel SVI on torch.distributed, one process per share of the data.

Launch (2 processes on CPU, gloo)::

    torchrun --nproc_per_node 2 -m benchmarks.distributed_svi --num-data 20000 --steps 300
    torchrun --nproc_per_node 2 -m benchmarks.distributed_svi --guide amortized
    torchrun --nproc_per_node 2 -m benchmarks.distributed_svi --parallel components
    python -m benchmarks.distributed_svi        # one process: the same code, no process group

On GPUs ``--device cuda`` uses NCCL with one GPU per process (``LOCAL_RANK``). Each rank
evaluates its share of the ``data`` plate (``--parallel components``: its share of the K
components, on all the data); :class:`pyro_mogflow.DistributedSVI` sums the gradients over
ranks, so every rank takes the same step. At the end rank 0 prints the loss, the
time per step and whether the ranks' parameters are bit-identical.

Models: ``auto``: logistic regression with ``D`` weights, ``AutoMixtureFlow`` (K components, an
autoregressive flow) and ``StratifiedELBO``; ``amortized``: a linear latent-factor model with
one 2-D latent per data point, its posterior an ``AmortizedMixtureFlow`` in a guide function.
"""

from __future__ import annotations

import argparse
import os
import time

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist

from pyro_mogflow import AmortizedMixtureFlow, AutoMixtureFlow, DistributedSVI, StratifiedELBO
from pyro_mogflow.infer import rank_and_world_size


def logistic(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1], dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(x)) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(x[idx] * w).sum(-1)), obs=y[idx])


def factors(x, loadings):
    """x_i ~ N(W z_i, 0.5^2), z_i ~ N(0, I_2): a local latent per data point."""
    with pyro.plate("data", len(x)) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        mean = (z.unsqueeze(-2) * loadings).sum(-1)
        pyro.sample("x", dist.Normal(mean, 0.5).to_event(1), obs=x[idx])


def _data(args, device):
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    if args.guide == "auto":
        x = torch.randn(args.num_data, args.dim, generator=g)
        w = torch.randn(args.dim, generator=g)
        y = torch.bernoulli(torch.sigmoid(x @ w), generator=g)
        return x.to(device), y.to(device)
    loadings = torch.randn(args.dim, 2, generator=g)
    z = torch.randn(args.num_data, 2, generator=g)
    x = z @ loadings.T + 0.5 * torch.randn(args.num_data, args.dim, generator=g)
    return x.to(device), loadings.to(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guide", choices=["auto", "amortized"], default="auto")
    parser.add_argument("--num-data", type=int, default=20000, help="data points")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None, help="points per rank and step")
    parser.add_argument(
        "--parallel",
        choices=["data", "components"],
        default="data",
        help="split the data plate (default) or the K components over the ranks",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = rank_and_world_size()
    torch.set_num_threads(1)
    pyro.set_rng_seed(rank)  # own initial values per rank: setup() gives all rank 0's
    data = _data(args, device)
    optim = pyro.optim.Adam({"lr": 1e-2})
    if args.guide == "auto":
        model = logistic
        guide = AutoMixtureFlow(model, num_components=args.components, flow="affine_autoregressive")
        modules = ()
    else:
        model = factors
        encoder = AmortizedMixtureFlow(
            args.dim, 2, num_components=args.components, hidden_dims=(32,), estimator="stratified"
        ).to(device)

        def guide(x, loadings):
            pyro.module("encoder", encoder)
            with pyro.plate("data", len(x)) as idx:
                pyro.sample("z", encoder(x[idx]))

        modules = (encoder,)
    if args.parallel == "data":
        split = {"plate": "data", "size": args.num_data, "batch_size": args.batch_size}
    else:
        split = {"parallel": "components"}
    svi = DistributedSVI(model, guide, optim, StratifiedELBO(), modules=modules, **split)
    svi.setup(*data)
    start = time.perf_counter()
    losses = [svi.step(*data) for _ in range(args.steps)]
    seconds = time.perf_counter() - start
    state = torch.cat([p.detach().reshape(-1) for p in pyro.get_param_store().values()])
    same = True
    if world > 1:
        gathered = [torch.zeros_like(state) for _ in range(world)]
        torch_dist.all_gather(gathered, state)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        print(
            f"{args.guide}, {args.parallel}-parallel: {world} process(es), N={args.num_data}, "
            f"K={args.components}, {args.steps} steps: loss "
            f"{losses[0]:.1f} -> {sum(losses[-10:]) / min(10, len(losses)):.1f}, "
            f"{1000 * seconds / args.steps:.1f} ms/step, ranks identical: {same}"
        )
    if world > 1:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
