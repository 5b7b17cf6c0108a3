r"""The ``torch.distributed`` steps behind data- and component-parallel SVI.

Which share of the data plate or of the mixture's components a rank evaluates
(:func:`rank_subsample`, :func:`rank_components`), copying rank 0's parameters and buffers to
every rank (:func:`broadcast_parameters`) and summing weighted gradients over ranks
(:func:`all_reduce_grads`). Plain collectives of ``torch.distributed`` (gloo on CPU, NCCL on
GPU); without a process group every function acts as for one rank.
:class:`~pyro_mogflow.infer.distributed.DistributedSVI` puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
import torch.distributed as dist
from torch import nn

from .._validation import check_int

__all__ = [
    "all_reduce_grads",
    "broadcast_parameters",
    "rank_and_world_size",
    "rank_components",
    "rank_subsample",
]


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the number of processes; ``(0, 1)`` without a process group.

    :param group: a ``torch.distributed`` process group (default: the whole world).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def rank_subsample(
    size: int,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor:
    """The indices of a data plate of ``size`` points that this rank evaluates.

    Without ``batch_size`` the ranks split ``range(size)`` into contiguous shares whose sizes
    differ by at most one, so together they cover the data once. With ``batch_size`` each call
    draws a random permutation from ``generator`` and gives rank ``r`` its entries
    ``[r * batch_size, (r + 1) * batch_size)``: disjoint minibatches of ``batch_size`` points
    per rank, provided every rank seeds ``generator`` identically (it advances the same way on
    each rank).

    :param int size: the plate's size ``N``.
    :param int batch_size: points per rank and call; ``world_size * batch_size <= size``.
    :param torch.Generator generator: the shared generator (required with ``batch_size``).
    :param int rank: default: this process's rank (0 without a process group).
    :param int world_size: default: the number of processes (1 without a process group).
    :return: a ``torch.long`` tensor of shape ``(b_r,)``.
    """
    size = check_int("size", size, 1)
    default_rank, default_world = rank_and_world_size()
    world_size = check_int("world_size", default_world if world_size is None else world_size, 1)
    rank = check_int("rank", default_rank if rank is None else rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    if batch_size is None:
        if size < world_size:
            raise ValueError(
                f"size={size} is smaller than world_size={world_size}: every rank needs a point"
            )
        return torch.tensor_split(torch.arange(size), world_size)[rank]
    batch_size = check_int("batch_size", batch_size, 1)
    if batch_size * world_size > size:
        raise ValueError(
            f"batch_size * world_size = {batch_size} * {world_size} exceeds size={size}"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator seeded identically on every rank when "
            f"batch_size is given, got {type(generator).__name__}"
        )
    permutation = torch.randperm(size, generator=generator)
    return permutation[rank * batch_size : (rank + 1) * batch_size]


def rank_components(
    num_components: int, *, rank: int | None = None, world_size: int | None = None
) -> torch.Tensor:
    """This rank's share of ``num_components`` components: contiguous, sizes within one.

    :param int num_components: ``K >= world_size``.
    :param int rank: default: this process's rank (0 without a process group).
    :param int world_size: default: the number of processes (1 without a process group).
    :return: a ``torch.long`` tensor of component indices, shape ``(m_r,)``.
    """
    num_components = check_int("num_components", num_components, 1)
    default_rank, default_world = rank_and_world_size()
    world_size = check_int("world_size", default_world if world_size is None else world_size, 1)
    rank = check_int("rank", default_rank if rank is None else rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    if num_components < world_size:
        raise ValueError(
            f"num_components={num_components} is smaller than world_size={world_size}: every "
            "rank needs a component"
        )
    return torch.tensor_split(torch.arange(num_components), world_size)[rank]


def _tensors_to_share(
    modules: Sequence[nn.Module], param_store: bool
) -> list[tuple[str, torch.Tensor]]:
    """Named tensors in an order every rank agrees on: store entries, then module state."""
    named: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    if param_store:
        for name, value in sorted(pyro.get_param_store().named_parameters()):
            named.append((f"param store: {name}", value))
            seen.add(id(value))
    for i, module in enumerate(modules):
        state = list(module.named_parameters()) + list(module.named_buffers())
        for name, value in state:
            if id(value) not in seen:
                named.append((f"module {i}: {name}", value))
                seen.add(id(value))
    return named


def _check_same_everywhere(layout: list, what: str, group) -> None:
    """Raise ValueError on every rank if the ranks' ``layout`` lists differ."""
    _, world = rank_and_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, layout, group=group)
    for rank, other in enumerate(gathered):
        if other != gathered[0]:
            first = next((a, b) for a, b in zip(gathered[0] + [None], other + [None]) if a != b)
            raise ValueError(
                f"the ranks hold different {what}: rank 0 has {first[0]}, rank {rank} has "
                f"{first[1]}. Build the model and guide the same way on every rank (same "
                "arguments and data shapes) and run DistributedSVI.setup before training."
            )


@torch.no_grad()
def broadcast_parameters(
    *modules: nn.Module,
    src: int = 0,
    param_store: bool = True,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Copy rank ``src``'s parameters and buffers to every rank, in place.

    Shares every entry of Pyro's param store (sorted by name) and every parameter and buffer of
    ``modules`` (e.g. a guide's flow permutations, which live in buffers, not in the param
    store). Call it once every parameter exists (after one run of the guide): a parameter made
    later would start from a different value on each rank. First checks that every rank holds
    the same names, shapes and dtypes, so a mismatch raises instead of hanging.

    :param modules: ``nn.Module`` s whose parameters and buffers to share.
    :param int src: the rank whose values are copied (default 0).
    :param bool param_store: also share Pyro's param store (default True).
    :param group: the process group (default: the whole world).
    :return: the number of tensors shared (0 without a process group).
    :raises ValueError: if the ranks hold different tensors.
    """
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"modules must be torch.nn.Modules, got {type(module).__name__}")
    src = check_int("src", src, 0)
    if not isinstance(param_store, bool):
        raise TypeError(f"param_store must be a bool, got {type(param_store).__name__}")
    _, world = rank_and_world_size(group)
    if src >= world:
        raise ValueError(f"src must be < world_size={world}, got {src}")
    named = _tensors_to_share(modules, param_store)
    if world == 1:
        return 0
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in named]
    _check_same_everywhere(layout, "parameters and buffers", group)
    for _, tensor in named:
        dist.broadcast(tensor.data, src=src, group=group)
    return len(named)


def _all_reduce_weighted(
    tensors: Sequence[torch.Tensor], weight: float, group
) -> list[torch.Tensor]:
    """``sum_r weight_r * tensors_r`` over ranks, one collective per (device, dtype)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for (_device, _dtype), indices in buckets.items():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]) * weight
        if rank_and_world_size(group)[1] > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


@torch.no_grad()
def all_reduce_grads(
    params: Sequence[torch.Tensor],
    *,
    weight: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    r"""Replace each ``param.grad`` by :math:`\sum_r w_r\, \nabla_r` over the ranks, in place.

    With the default weight :math:`w_r = 1/W` this is the average gradient; a rank's weight
    :math:`b_r / B` (its share of the data evaluated this step) makes the sum the gradient of
    one process on all the ranks' data (module docstring). A parameter without a gradient
    counts as zero. Every rank must pass the same parameters in the same order.

    :param params: the parameters (leaf tensors), same order on every rank.
    :param float weight: this rank's weight (default ``1 / world_size``).
    :param group: the process group (default: the whole world).
    """
    params = list(params)
    _, world = rank_and_world_size(group)
    weight = 1.0 / world if weight is None else float(weight)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p, g in zip(params, _all_reduce_weighted(grads, weight, group)):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
