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

Component-parallel (``parallel="components"``, :class:`~pyro_mogflow.StratifiedELBO` only): each
rank evaluates the stratified ELBO of its share :math:`C_r` of the :math:`K` components (all
the data), :math:`\widehat{\mathcal{L}}_{C_r}` (:meth:`StratifiedELBO.only_components
<pyro_mogflow.StratifiedELBO.only_components>`); the shares of a partition add up to the
ELBO, so the gradients are summed over ranks with weight 1. It divides the :math:`K n` model
evaluations of a step by :math:`W`, where the cost of a mixture-flow guide lies.

No process group of our own and no wrapping in ``DistributedDataParallel`` (Pyro keeps its
parameters in a param store, created on the first call): :class:`DistributedSVI` creates every
parameter and buffer first (:meth:`DistributedSVI.setup`), copies rank 0's values to all ranks
(:func:`broadcast_parameters`) and all-reduces the gradients of each step
(:func:`all_reduce_grads`) with ``torch.distributed`` collectives.

Reference: S. Li et al., *PyTorch Distributed: Experiences on Accelerating Data Parallel
Training*, VLDB 2020 (gradient all-reduce; parameters must exist before the first reduction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

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
from .collectives import (
    _all_reduce_weighted,
    _check_same_everywhere,
    broadcast_parameters,
    rank_and_world_size,
    rank_components,
    rank_subsample,
)

__all__ = ["DistributedSVI"]

#: The ways :class:`DistributedSVI` splits a step over ranks.
PARALLEL = ("data", "components")


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
    r"""SVI split over the ranks of a process group: shares of a data plate or of the components.

    A subclass of Pyro's :class:`~pyro.infer.SVI`.

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

    With ``parallel="components"`` and a :class:`~pyro_mogflow.StratifiedELBO`, each rank
    instead evaluates its share of the mixture's components (:func:`rank_components`) on all
    the data, and the shares' gradients and losses are summed: one step is then an unbiased
    estimate of the full stratified step (equal to it when the ranks' noise is), at
    :math:`1/W` of the model evaluations per rank. Seed the ranks differently
    (``pyro.set_rng_seed(seed + rank)``) so the components' noise is independent.

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
    :param str parallel: ``"data"`` (default: split the plate ``plate``) or ``"components"``
        (split the components of a ``StratifiedELBO``; no ``plate``).
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
        parallel: str = "data",
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
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
        if parallel == "components":
            if not callable(getattr(loss, "only_components", None)):
                raise TypeError(
                    "parallel='components' splits the components of a StratifiedELBO; got loss "
                    f"{type(loss).__name__}"
                )
            if plate is not None:
                raise ValueError("plate splits the data (parallel='data'), not the components")
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
        self.parallel = parallel
        self.elbo = loss  # (SVI keeps only the ELBO's bound methods)
        self.plate, self.size, self.batch_size = plate, size, batch_size
        #: This rank's components (``parallel="components"``; set by :meth:`setup`).
        self.components: torch.Tensor | None = None
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
        if self.parallel == "components":
            return 1.0  # the shares of the components add up to the ELBO
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
        if self.parallel == "components":
            # K from the ELBO's own probe of the stratified site (no guide class needed)
            _, k = self.elbo._probe(self._sharded_model, self._sharded_guide, args, kwargs)
            self.components = rank_components(k, rank=self.rank, world_size=self.world_size)
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
        share = (
            self.elbo.only_components(self.components)
            if self.parallel == "components"
            else contextlib.nullcontext()
        )
        with share, poutine.trace(param_only=True) as capture:
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
