r"""Data-parallel SVI on ``torch.distributed``: each process fits its share of the data.

Launched with ``torchrun --nproc_per_node W script.py`` (gloo on CPU, NCCL on GPU), every
process (rank :math:`r` of :math:`W`) holds a copy of the model, the guide and the optimizer,
evaluates the ELBO on its share :math:`S_r` of a data plate of size :math:`N`, and the
gradients are summed across ranks before the optimizer step. Pyro's plate scales the terms of
a subsample of size :math:`b_r` by :math:`N / b_r`, so rank :math:`r`'s loss

.. math::
    L_r = G + \frac{N}{b_r} \sum_{i \in S_r} \ell_i

is an unbiased estimate of the full-data loss :math:`G + \sum_{i=1}^N \ell_i` (:math:`G`: the
terms outside the plate, e.g. prior and entropy of global latents). Weighting rank :math:`r`
by :math:`b_r / B`, :math:`B = \sum_r b_r`, before summing,

.. math::
    \sum_{r=1}^W \frac{b_r}{B} L_r = G + \frac{N}{B} \sum_{i \in S_1 \cup \dots \cup S_W} \ell_i,

gives exactly the loss (and gradient) of one process on the union of the shares; when the
shares cover the data (the default) that is the full-data loss, also when :math:`W` does not
divide :math:`N`. With the same random seed on every rank the draws of the global latents agree
and one step equals a single-process full-data step; with a different seed per rank the
Monte-Carlo noise of :math:`G` is averaged over the ranks as well.

No process group of our own and no wrapping in ``DistributedDataParallel`` (Pyro keeps its
parameters in a param store, created on the first call): :class:`DistributedSVI` creates every
parameter and buffer first (:meth:`DistributedSVI.setup`), copies rank 0's values to all ranks
(:func:`broadcast_parameters`) and all-reduces the gradients of each step
(:func:`all_reduce_grads`) with ``torch.distributed`` collectives.

Reference: S. Li et al., *PyTorch Distributed: Experiences on Accelerating Data Parallel
Training*, VLDB 2020 (gradient all-reduce; parameters must exist before the first reduction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pyro
import pyro.poutine as poutine
import torch
import torch.distributed as dist
from pyro.infer import SVI
from pyro.infer.util import zero_grads
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from .._validation import check_int, check_seed

__all__ = [
    "DistributedSVI",
    "all_reduce_grads",
    "broadcast_parameters",
    "rank_and_world_size",
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


class _Shard:
    """This step's indices for the plate ``name`` (size ``size``), and whether it was met."""

    def __init__(self, name: str, size: int, indices: torch.Tensor):
        self.name, self.size, self.indices = name, size, indices
        self.seen = False


class _ShardPlate(Messenger):
    """Give the subsample site of the shard's plate the shard's fixed indices."""

    def __init__(self, shard: _Shard):
        super().__init__()
        self.shard = shard

    def _pyro_sample(self, msg) -> None:
        fn, shard = msg["fn"], self.shard
        if msg["name"] != shard.name or not site_is_subsample(msg):
            return
        if int(fn.size) != shard.size:
            raise ValueError(
                f"pyro.plate({shard.name!r}) has size {fn.size}, but DistributedSVI was given "
                f"size={shard.size}"
            )
        if fn.subsample_size is not None and fn.subsample_size not in (
            fn.size,
            len(shard.indices),
        ):
            raise ValueError(
                f"pyro.plate({shard.name!r}) asks for subsample_size={fn.subsample_size}; "
                "under DistributedSVI the rank's share is the subsample: write "
                f"pyro.plate({shard.name!r}, N) and index the data with the plate's indices"
            )
        device = getattr(fn, "device", None)
        msg["value"] = shard.indices if device is None else shard.indices.to(device)
        shard.seen = True


class DistributedSVI(SVI):
    r"""Data-parallel :class:`~pyro.infer.SVI`: each rank evaluates its share of a data plate.

    Works for any guide whose parameters live in Pyro's param store or in modules:
    :class:`~pyro_mogflow.AutoMixtureFlow` with :class:`~pyro_mogflow.StratifiedELBO`, or a
    guide function sampling a local site from an :class:`~pyro_mogflow.AmortizedMixtureFlow`.
    With ``plate`` and ``size``, the named plate's indices are this rank's share
    (:func:`rank_subsample`); the model and guide must index their data with the plate's
    indices, ``with pyro.plate("data", N) as idx: ... obs=y[idx]``, as in any subsampled Pyro
    model. Each step, gradients (and the loss) are summed over ranks with weights
    :math:`b_r / B` (module docstring), so a step equals a single-process step on the union of
    the shares (with equal random draws), then every rank applies the same optimizer step: the
    ranks stay identical. Without ``plate``, the ranks' gradients are averaged (each rank
    brings its own data or its own draws).

    Usage (``torchrun --nproc_per_node 2 script.py``)::

        torch.distributed.init_process_group("gloo")      # "nccl" with one GPU per rank
        guide = AutoMixtureFlow(model, num_components=8)
        svi = DistributedSVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), StratifiedELBO(),
                             plate="data", size=len(y))
        svi.setup(x, y)                                    # every parameter, rank 0's values
        for step in range(1000):
            loss = svi.step(x, y)                          # the same on every rank

    :param model: the Pyro model.
    :param guide: the guide (an ``nn.Module`` guide's buffers are shared by :meth:`setup`).
    :param optim: a Pyro optimizer.
    :param loss: a Pyro ELBO, e.g. :class:`~pyro_mogflow.StratifiedELBO`.
    :param str plate: name of the data plate to split over ranks (default: none).
    :param int size: the plate's full size ``N`` (required with ``plate``).
    :param int batch_size: points per rank and step; default: the rank's whole share, every
        step. With it each step draws disjoint random minibatches from a generator seeded
        with ``seed`` (identical on every rank).
    :param int seed: seed of the minibatch generator (default 0).
    :param modules: further ``nn.Module`` s whose parameters and buffers :meth:`setup` shares
        (e.g. an :class:`~pyro_mogflow.AmortizedMixtureFlow` used inside a guide function).
    :param group: the ``torch.distributed`` process group (default: the whole world).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: pyro.optim.PyroOptim,
        loss: pyro.infer.ELBO,
        *,
        plate: str | None = None,
        size: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        modules: Iterable[nn.Module] = (),
        group: dist.ProcessGroup | None = None,
    ):
        if not callable(model) or not callable(guide):
            raise TypeError("model and guide must be callables")
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise TypeError(f"optim must be a Pyro optimizer, got {type(optim).__name__}")
        if not isinstance(loss, pyro.infer.ELBO):
            raise TypeError(f"loss must be a Pyro ELBO, got {type(loss).__name__}")
        if plate is not None and (not isinstance(plate, str) or not plate):
            raise TypeError(f"plate must be a plate's name (str) or None, got {plate!r}")
        if plate is None and (size is not None or batch_size is not None):
            raise ValueError("size and batch_size need plate, the name of the data plate")
        self.rank, self.world_size = rank_and_world_size(group)
        if plate is not None:
            if size is None:
                raise ValueError(f"size (the full size of plate {plate!r}) is required")
            size = check_int("size", size, self.world_size)
            batch_size = check_int("batch_size", batch_size, 1, allow_none=True)
            if batch_size is not None and batch_size * self.world_size > size:
                raise ValueError(
                    f"batch_size * world_size = {batch_size} * {self.world_size} exceeds "
                    f"size={size}"
                )
        seed = check_seed("seed", seed)
        modules = tuple(modules)
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"modules must be torch.nn.Modules, got {type(module).__name__}")
        super().__init__(model, guide, optim, loss)
        self.plate, self.size, self.batch_size = plate, size, batch_size
        self.group = group
        self.modules = tuple(m for m in (model, guide) if isinstance(m, nn.Module)) + modules
        self._generator = torch.Generator().manual_seed(seed)
        self._shard: _Shard | None = None
        # model and guide run with this step's share of the plate, inside the ELBO's handlers
        self._sharded_model = self._sharded(model)
        self._sharded_guide = self._sharded(guide)
        self._is_set_up = False
        self._param_names: tuple | None = None

    # ---------------------------------------------------------------------- shares
    def _indices(self) -> torch.Tensor | None:
        if self.plate is None:
            return None
        return rank_subsample(
            self.size,
            batch_size=self.batch_size,
            generator=self._generator,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _weight(self, indices: torch.Tensor | None) -> float:
        if indices is None:
            return 1.0 / self.world_size
        total = self.size if self.batch_size is None else self.batch_size * self.world_size
        return len(indices) / total

    def _sharded(self, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            if self._shard is None:
                return fn(*args, **kwargs)
            with _ShardPlate(self._shard):
                return fn(*args, **kwargs)

        return run

    def _start_shard(self, indices: torch.Tensor | None) -> _Shard | None:
        self._shard = None if indices is None else _Shard(self.plate, self.size, indices)
        return self._shard

    # ----------------------------------------------------------------------- set-up
    def setup(self, *args, **kwargs) -> DistributedSVI:
        """Create every parameter and buffer, then give all ranks rank 0's values.

        Runs the guide's ``setup`` if it has one, then the guide and the model once (no
        gradients, torch's random stream left as it was), on this rank's share; then
        :func:`broadcast_parameters` over the param store and the modules. Called by the first
        :meth:`step` if not before; call it yourself before loading a checkpoint.

        :return: self.
        """
        if self._is_set_up:
            return self
        indices = None
        if self.plate is not None:
            indices = rank_subsample(self.size, rank=self.rank, world_size=self.world_size)
            indices = indices[: self.batch_size] if self.batch_size else indices
        shard = self._start_shard(indices)
        setup = getattr(self.guide, "setup", None)
        if callable(setup):
            self._sharded(setup)(*args, **kwargs)
        with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(self._sharded_guide).get_trace(*args, **kwargs)
            poutine.trace(poutine.replay(self._sharded_model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        self._check_plate_seen(shard)
        broadcast_parameters(*self.modules, group=self.group)
        self._is_set_up = True
        return self

    def _check_plate_seen(self, shard: _Shard | None) -> None:
        if shard is not None and not shard.seen:
            raise ValueError(
                f"the model and guide have no pyro.plate named {self.plate!r} with a size; "
                "pass plate=<the data plate's name>"
            )

    # ------------------------------------------------------------------------ steps
    def loss_and_reduced_grads(self, *args, **kwargs) -> tuple[float, list[torch.Tensor]]:
        """This rank's share of the loss and gradients, summed over ranks into ``.grad``.

        :return: ``(loss, params)``: the loss summed over ranks (the same on every rank) and
            the unconstrained parameters (sorted by param-store name) whose ``.grad`` now
            holds the reduced gradient.
        :raises RuntimeError: if the reduced loss or a gradient is not finite (the gradients
            are then zeroed; no parameter changed).
        """
        self.setup(*args, **kwargs)
        indices = self._indices()
        shard = self._start_shard(indices)
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self._sharded_model, self._sharded_guide, *args, **kwargs)
        nodes = capture.trace.nodes
        names = tuple(sorted(nodes))
        params = [nodes[name]["value"].unconstrained() for name in names]
        try:
            self._check_plate_seen(shard)
        except ValueError:
            zero_grads(set(params))
            raise
        if names != self._param_names and self.world_size > 1:
            _check_same_everywhere(list(names), "parameter names", self.group)
        self._param_names = names
        weight = self._weight(indices)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        anchor = params[0] if params else torch.zeros(())
        value = torch.as_tensor(float(loss), dtype=anchor.dtype, device=anchor.device)
        reduced = _all_reduce_weighted(grads + [value.reshape(1)], weight, self.group)
        finite = all(bool(torch.isfinite(r).all()) for r in reduced)
        with torch.no_grad():
            for p, g in zip(params, reduced[:-1]):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        total = float(reduced[-1])
        if not finite:
            zero_grads(set(params))
            raise RuntimeError(
                f"the loss summed over ranks is {total} or a gradient is not finite; no "
                "parameter was changed. Lower the learning rate or check the model."
            )
        return total, params

    def step(self, *args, **kwargs) -> float:
        """One optimizer step on the gradients summed over ranks.

        :return: the loss summed over ranks (the full-data loss estimate; the same on every
            rank).
        """
        loss, params = self.loss_and_reduced_grads(*args, **kwargs)
        self.optim(set(params))
        zero_grads(set(params))
        return loss
