r"""A memory budget for vectorized evaluations: measure what one item costs, then chunk.

An evaluation over many items (the :math:`K` components of a stratified ELBO, each with its
:math:`n` draws; the draws of an export) allocates tensors whose size grows with the items
times the data: a model with :math:`N` data points evaluated at :math:`K n` draws at once holds
:math:`K n N` log-densities, and a likelihood written ``(X * w).sum(-1)`` a transient
:math:`K n N D` product. :class:`ChunkPlanner` runs such an evaluation in consecutive chunks
of items, sized from a measurement rather than a guess: the first call runs one item, then two,
and records the peak bytes of the tensors each run allocates (:func:`measure_peak`), so that

.. math::
    \text{per item} = P_2 - P_1, \qquad \text{fixed} = P_1 - \text{per item}, \qquad
    \text{chunk} = \max\Big(1, \Big\lfloor \frac{\text{budget} - \text{fixed}}
        {\text{per item}} \Big\rfloor\Big).

When one item does not fit, :meth:`ChunkPlanner.split` cuts it into parts: a component's
:math:`n` draws are independent, so they are evaluated in pieces (probed at one and two draws)
and joined along :math:`n`. The same budget (``memory_budget=``, default
:data:`DEFAULT_MEMORY_BUDGET`) bounds every vectorized evaluation of the package: the training
steps and :func:`~pyro_mogflow.infer.balance_weights` (chunks of components or of draws), and
the export and diagnostics (:func:`~pyro_mogflow.to_inference_data` and
:func:`~pyro_mogflow.vi_diagnostics` in batches of draws, :func:`~pyro_mogflow.vi_loo` in
blocks of observations measured by :func:`measure_traced_peak`). What it bounds is working
memory: results that are themselves ``draws x N`` (an export's ``log_likelihood``) are not.

The measurement counts the storage of every tensor created while it runs, freed or not
(a ``TorchDispatchMode`` that follows each storage until it is released, so transients such as
the ``K n N D`` product count), and on CUDA also ``torch.cuda.max_memory_allocated``, which sees
the backward pass run by autograd's device threads. Memory held before the evaluation (data,
parameters, the optimiser's state) is not counted: the budget is for the evaluation's own
working memory.
"""

from __future__ import annotations

import numbers
import tracemalloc
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ChunkPlanner",
    "check_memory_budget",
    "measure_peak",
    "measure_traced_peak",
]

#: The default working-memory budget of one vectorized evaluation, in bytes (1 GiB).
DEFAULT_MEMORY_BUDGET = 2**30


def check_memory_budget(value) -> int | None:
    """``value`` as a number of bytes (an int ``> 0``), or ``None`` for no budget (no chunking).

    :raises TypeError: if it is not an int, a float or None.
    :raises ValueError: if it is not positive or not finite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"memory_budget must be a number of bytes (int) or None, got {type(value).__name__}"
        )
    if not value == value or value in (float("inf"), float("-inf")) or value < 1:
        raise ValueError(f"memory_budget must be a finite number of bytes >= 1, got {value!r}")
    return int(value)


class _PeakTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operators create, and their peak while alive."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def _release(self, key) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
                continue
            nbytes = storage.nbytes()
            key = (str(storage.device), storage.data_ptr())
            if nbytes == 0 or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def measure_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` and measure the peak bytes of the tensors it allocates.

    :return: ``(peak bytes, fn's result)``. On CUDA (when initialised) the peak is the larger of
        the tensor count and the rise of ``torch.cuda.max_memory_allocated`` over what was
        allocated before.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        device = torch.cuda.current_device()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakTensorBytes() as mode:
        result = fn()
    peak = mode.peak
    if cuda:
        torch.cuda.synchronize(device)
        peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
    return int(peak), result


def measure_traced_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` and measure the peak bytes it allocates on the host through Python's
    allocators (NumPy arrays included), with ``tracemalloc``.

    :return: ``(peak bytes above what was allocated before, fn's result)``. If tracemalloc was
        already tracing, it keeps tracing afterwards (its peak is reset).
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
    return int(max(peak, 0)), result


class ChunkPlanner:
    """Runs evaluations over ``total`` items in chunks that fit a memory budget.

    The chunk size of each kind of evaluation (a hashable ``key``: which model, which guide,
    the data's shapes, with or without gradients) is measured on its first call and reused.

    :param budget: bytes of working memory per chunk, or ``None`` for one chunk of every item.
    :param str what: what an item is, for messages (e.g. ``"component"``).
    """

    def __init__(self, budget: int | None, what: str = "item"):
        self.budget = check_memory_budget(budget)
        self.what = what
        self.sizes: dict = {}

    def _decide(self, key, per_item: int, fixed: int, total: int) -> int:
        budget = self.budget
        if fixed + per_item > budget:
            warnings.warn(
                f"one {self.what} needs about {fixed + per_item:,} bytes of working memory, "
                f"over the memory budget of {budget:,} bytes; evaluating one {self.what} at a "
                "time (raise memory_budget, or lower num_particles or the data per step, e.g. "
                "with a subsampled plate)",
                ResourceWarning,
                stacklevel=4,
            )
            size = 1
        else:
            size = (budget - fixed) // max(per_item, 1)
        size = int(max(1, min(total, size)))
        self.sizes[key] = size
        return size

    def run(self, key, total: int, evaluate: Callable[[int, int], Any]) -> list:
        """``[evaluate(start, stop) for each chunk]``, chunks covering ``range(total)`` in order.

        On the first call for ``key`` the first chunks hold one item, then two, measured with
        :func:`measure_peak`; they are real work, part of the result.
        """
        size = total if self.budget is None else self.sizes.get(key)
        results: list = []
        start = 0
        if size is None:
            if total == 1:
                size = self.sizes[key] = 1
            else:
                one, first = measure_peak(lambda: evaluate(0, 1))
                results.append(first)
                start = 1
                per_item, fixed = one, 0
                if total >= 3:
                    two, second = measure_peak(lambda: evaluate(1, 3))
                    results.append(second)
                    start = 3
                    per_item = max(two - one, 1)
                    fixed = max(one - per_item, 0)
                size = self._decide(key, per_item, fixed, total)
        while start < total:
            stop = min(total, start + size)
            results.append(evaluate(start, stop))
            start = stop
        return results

    def split(self, key, total: int, parts: int, probe: Callable[[int], Any]) -> tuple[int, int]:
        """``(items, parts)`` per chunk for ``total`` items of ``parts`` parts each (a component
        of ``n`` draws), measured on first use by ``probe(m)``: ``m`` = 1, 2 parts of one item
        (results discarded).

        Chunks hold whole items while one item fits the budget; otherwise one item at a time,
        split into pieces of as many parts as fit (the draws of a component are independent,
        so they can be evaluated piece by piece). A single part over the budget warns and runs
        one part at a time.
        """
        if self.budget is None:
            return total, parts
        plan = self.sizes.get(key)
        if plan is not None:
            return plan
        if total == 1 and parts == 1:
            plan = self.sizes[key] = (1, 1)
            return plan
        one = measure_peak(lambda: probe(1))[0]
        two = measure_peak(lambda: probe(2))[0]
        per_part = max(two - one, 1)
        fixed = max(one - per_part, 0)
        fit = (self.budget - fixed) // per_part
        if fit < 1:
            warnings.warn(
                f"one draw of one {self.what} needs about {fixed + per_part:,} bytes of working "
                f"memory, over the memory budget of {self.budget:,} bytes; evaluating one draw "
                "at a time (raise memory_budget, or lower the data per step, e.g. with a "
                "subsampled plate)",
                ResourceWarning,
                stacklevel=4,
            )
            plan = (1, 1)
        elif fit < parts:
            plan = (1, int(fit))
        else:
            plan = (int(min(total, fit // parts)), parts)
        self.sizes[key] = plan
        return plan

    def size(self, key, total: int, probe: Callable[[int], Any]) -> int:
        """The chunk size for ``key``, measured on first use by ``probe(m)`` (``m`` = 1, 2 items,
        results discarded)."""
        if self.budget is None:
            return total
        size = self.sizes.get(key)
        if size is not None:
            return size
        if total == 1:
            self.sizes[key] = 1
            return 1
        one = measure_peak(lambda: probe(1))[0]
        two = measure_peak(lambda: probe(2))[0]
        per_item = max(two - one, 1)
        return self._decide(key, per_item, max(one - per_item, 0), total)


def shapes_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes, dtypes and devices of the tensors among a model's arguments (a cache key)."""
    return tuple(
        (tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else type(v)
        for v in (*args, *kwargs.values())
    )
