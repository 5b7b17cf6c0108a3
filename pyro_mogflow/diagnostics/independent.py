r"""Independent variational fits, the one check that can reveal a missed mode.

A guide's own draws cannot show what it never visited: Pareto :math:`\hat k` of one fit is
blind to a missing mode. Fitting the same guide :math:`R` times from different seeds and
comparing the fits (as chains: :math:`\hat R` across runs, and the spread of the runs' evidence
estimates) exposes fits that settled in different parts of the posterior.
:func:`fit_independent` runs those fits and returns them ready for
:func:`~pyro_mogflow.to_inference_data` and :func:`~pyro_mogflow.vi_diagnostics`.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule

from .._param_store import first_free_prefix
from .._validation import check_int, check_seed
from ..guides import AutoMixtureFlow
from .export import _check_model_args, to_inference_data
from .vi import VIDiagnostics, _RunsWithTheirModel, vi_diagnostics

__all__ = ["IndependentFits", "fit_independent"]

if TYPE_CHECKING:
    from arviz import InferenceData
    from xarray import DataTree


@dataclasses.dataclass(frozen=True, eq=False)
class IndependentFits(Sequence, _RunsWithTheirModel):
    """``R`` guides fitted independently to one model, with their seeds and loss curves.

    It is a sequence of the fitted guides (``fits[r]``, ``len(fits)``, iteration), so it can be
    passed wherever a list of guides is accepted.

    :ivar model: the Pyro model.
    :ivar tuple guides: the fitted guides, one per run.
    :ivar tuple seeds: the seed of each run.
    :ivar numpy.ndarray losses: shape ``(R, num_steps)``, the loss of every SVI step.
    :ivar tuple model_args: the model's positional arguments used for fitting.
    :ivar dict model_kwargs: the model's keyword arguments used for fitting.
    """

    model: Callable
    guides: tuple
    seeds: tuple
    losses: np.ndarray
    model_args: tuple = ()
    model_kwargs: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.guides)

    def __getitem__(self, index: int | slice) -> Any:
        return self.guides[index]

    @property
    def final_losses(self) -> np.ndarray:
        """Mean loss over the last tenth of the steps of each run, shape ``(R,)``."""
        tail = max(1, self.losses.shape[1] // 10)
        return self.losses[:, -tail:].mean(axis=1)

    @property
    def best(self) -> PyroModule:
        """The guide with the lowest :attr:`final_losses` (the highest ELBO)."""
        return self.guides[int(np.argmin(self.final_losses))]

    def to_inference_data(self, **kwargs: Any) -> InferenceData | DataTree:
        """:func:`~pyro_mogflow.to_inference_data` with one chain per run.

        :param kwargs: keyword arguments of :func:`~pyro_mogflow.to_inference_data` other than
            the guides, model and model arguments, which come from this object.
        """
        for key in ("guide", "guides", "model", "model_args", "model_kwargs"):
            if key in kwargs:
                raise TypeError(f"{key} comes from the IndependentFits; do not pass it")
        return to_inference_data(
            None,
            self.model,
            guides=list(self.guides),
            model_args=self.model_args,
            model_kwargs=self.model_kwargs,
            **kwargs,
        )

    def vi_diagnostics(self, **kwargs: Any) -> VIDiagnostics:
        """:func:`~pyro_mogflow.vi_diagnostics` of the runs (drawing ``num_samples`` each).

        :param kwargs: keyword arguments of :func:`~pyro_mogflow.vi_diagnostics`.
        """
        return vi_diagnostics(self, **kwargs)


def _claim_free_name(guide: PyroModule) -> None:
    """Give a fresh guide a param-store prefix no parameter uses yet.

    Pyro's AutoGuides are all named after their class, so two fits of one class would read and
    write the same entries of the global param store and silently become one fit. A guide that
    manages its own names (AutoMixtureFlow) is left alone.
    """
    if isinstance(guide, AutoMixtureFlow):
        return
    prefix = first_free_prefix(guide._pyro_name or type(guide).__name__)
    if prefix != guide._pyro_name:
        # Pyro's own hook for naming a module tree: renames the guide and its sub-modules.
        guide._pyro_set_supermodule(prefix, guide._pyro_context)


def _new_guide(model: Callable, make_guide: Callable, previous: Sequence) -> PyroModule:
    """``make_guide(model)``, checked, with a param-store prefix of its own."""
    guide = make_guide(model)
    if not isinstance(guide, PyroModule):
        raise TypeError(
            "make_guide must return a PyroModule guide (e.g. any AutoGuide or "
            f"AutoMixtureFlow) so each run keeps its own parameters; got {type(guide).__name__}"
        )
    if any(guide is g for g in previous):
        raise ValueError("make_guide returned the same guide twice; build a new one")
    if isinstance(guide, AutoGuide) and guide.prototype_trace is not None:
        raise ValueError(
            "make_guide returned a guide that has already been run; return a new "
            "guide on every call, e.g. make_guide=lambda m: AutoNormal(m)"
        )
    _claim_free_name(guide)
    return guide


def _train(svi: SVI, num_steps: int, args: tuple, kwargs: dict, r: int, run_seed: int, bar):
    """``num_steps`` SVI steps; the losses, shape ``(num_steps,)``."""
    losses = np.zeros(num_steps)
    for step in range(num_steps):
        value = float(svi.step(*args, **kwargs))
        if not np.isfinite(value):
            raise RuntimeError(
                f"run {r} (seed {run_seed}): the loss became {value} at step {step}; "
                "lower the learning rate or check the model"
            )
        losses[step] = value
        if bar is not None:
            bar.update(1)
    return losses


def _devices() -> list:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@dataclasses.dataclass(frozen=True)
class _Task:
    """Everything one run needs in a worker process (sent by pickle)."""

    model: Callable
    make_guide: Callable
    run: int
    seed: int
    num_steps: int
    args: tuple
    kwargs: dict
    optim: pyro.optim.PyroOptim
    loss: pyro.infer.ELBO
    parent_pid: int
    default_dtype: torch.dtype
    validation: bool


def _run_in_worker(task: _Task) -> tuple[dict, np.ndarray]:
    """One run in a worker process: ``(guide state_dict on the CPU, losses)``."""
    if os.getpid() == task.parent_pid:
        raise RuntimeError(
            "the executor ran a fit in the calling process; Pyro's param store is global to a "
            "process, so pass executor=None for runs in this process, or a process pool"
        )
    torch.set_default_dtype(task.default_dtype)
    pyro.enable_validation(task.validation)
    pyro.clear_param_store()  # this worker's store: the fit starts from nothing left behind
    with torch.random.fork_rng(devices=_devices()):
        torch.manual_seed(task.seed)
        guide = _new_guide(task.model, task.make_guide, ())
        svi = SVI(task.model, guide, task.optim, task.loss)
        losses = _train(svi, task.num_steps, task.args, task.kwargs, task.run, task.seed, None)
    state = {
        k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in guide.state_dict().items()
    }
    pyro.clear_param_store()
    return state, losses


def _executor_kind(executor: Any) -> str | None:
    """``None`` (sequential), ``"ray"`` or ``"futures"``; TypeError for anything else."""
    if executor is None:
        return None
    if (isinstance(executor, str) and executor == "ray") or (
        executor is sys.modules.get("ray") and executor is not None
    ):
        return "ray"
    if isinstance(executor, cf.ThreadPoolExecutor):
        raise TypeError(
            "executor must run the fits in other processes: Pyro's param store and effect "
            "handlers are global to a process, so threads would mix the runs. Use "
            "concurrent.futures.ProcessPoolExecutor, 'ray', or None"
        )
    if isinstance(executor, cf.Executor):
        return "futures"
    raise TypeError(
        "executor must be None, a concurrent.futures.Executor (e.g. ProcessPoolExecutor), "
        f"'ray' or the ray module; got {executor!r}"
    )


def _check_picklable(tasks: list) -> None:
    try:
        pickle.dumps(tasks[0])
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(
            "with a process pool, model, make_guide, optim, loss and the model arguments are "
            "sent to the worker processes by pickle and must be picklable (module-level "
            "functions or classes, functools.partial; not lambdas or local functions). "
            f"Pickling failed with: {error}"
        ) from error


def _run_on_executor(kind: str, executor: Any, tasks: list, bar) -> list:
    """The workers' ``(state, losses)`` in run order."""
    results: list = [None] * len(tasks)
    if kind == "ray":
        try:
            import ray
        except ImportError as error:
            raise ImportError(
                "executor='ray' needs Ray: pip install 'pyro-mogflow[distributed]' (or ray)"
            ) from error
        if not ray.is_initialized():
            ray.init()  # a local Ray; call ray.init(address=...) first to use a cluster
        remote = ray.remote(_run_in_worker)
        pending = {remote.remote(task): i for i, task in enumerate(tasks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            if bar is not None:
                bar.update(tasks[i].num_steps)
        return results
    if isinstance(executor, cf.ProcessPoolExecutor):
        _check_picklable(tasks)
    futures = {executor.submit(_run_in_worker, task): i for i, task in enumerate(tasks)}
    try:
        for future in cf.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if bar is not None:
                bar.update(tasks[i].num_steps)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return results


def _rebuild(model: Callable, make_guide: Callable, task: _Task, state: dict, previous: list):
    """A guide in this process holding a worker's fitted state."""
    with torch.random.fork_rng(devices=_devices()):
        torch.manual_seed(task.seed)
        guide = _new_guide(model, make_guide, previous)
        setup = getattr(guide, "setup", None)
        with poutine.block(), torch.no_grad():
            if callable(setup):
                setup(*task.args, **task.kwargs)
            else:  # Pyro's AutoGuides make their parameters on the first call
                guide(*task.args, **task.kwargs)
    guide.load_state_dict(state)
    return guide


def fit_independent(
    model: Callable,
    make_guide: Callable,
    *,
    num_runs: int = 4,
    num_steps: int = 1000,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    optim: pyro.optim.PyroOptim | None = None,
    loss: pyro.infer.ELBO | None = None,
    seed: int = 0,
    progress_bar: bool = False,
    executor: cf.Executor | str | Any | None = None,
) -> IndependentFits:
    r"""Fit ``num_runs`` fresh guides to ``model`` by SVI, each from its own seed.

    Run :math:`r` seeds torch with ``seed + r``, builds ``make_guide(model)`` and takes
    ``num_steps`` steps of ``SVI(model, guide, optim, loss)`` with its own copy of ``optim``
    and ``loss``. Each guide gets its own names in Pyro's param store, so the runs never share
    parameters. The global random state is left as it was.

    Comparing the runs is what catches a missed mode: pass the result to
    :func:`~pyro_mogflow.vi_diagnostics` (R-hat across runs, spread of the evidence estimates)
    or to :func:`~pyro_mogflow.to_inference_data` (one chain per run).

    The runs are independent, so they can run in parallel: with ``executor`` a
    ``concurrent.futures.ProcessPoolExecutor`` (or any executor whose tasks run in other
    processes), or ``"ray"`` (a local Ray started by ``ray.init()`` unless Ray is already
    initialized, e.g. by ``ray.init(address=...)`` on a cluster), each run is fitted in a
    worker process from the same seed, and its fitted state is loaded into a guide built here
    with ``make_guide``: the losses and parameters equal those of the sequential run
    (``executor=None``, the default) as long as the workers compute as this process does
    (same library versions and threads). A process pool sends ``model``, ``make_guide``,
    ``optim``, ``loss`` and the model arguments by pickle: use module-level functions, not
    lambdas (Ray's serializer accepts lambdas).

    Example::

        fits = fit_independent(model, lambda m: AutoNormal(m), num_runs=4, num_steps=2000,
                               model_args=(x, y))
        print(fits.vi_diagnostics(num_samples=2000, seed=0))

        with ProcessPoolExecutor(4) as pool:
            fits = fit_independent(model, make_guide, num_runs=4, model_args=(x, y),
                                   executor=pool)

    :param callable model: the Pyro model.
    :param callable make_guide: ``make_guide(model) -> guide``; must return a new, not yet run
        guide that is a :class:`~pyro.nn.PyroModule` (every AutoGuide is) on each call.
    :param int num_runs: ``R >= 2`` (default 4).
    :param int num_steps: SVI steps per run (default 1000).
    :param tuple model_args: positional arguments of the model.
    :param dict model_kwargs: keyword arguments of the model.
    :param optim: a Pyro optimizer, copied for each run (default
        ``pyro.optim.Adam({"lr": 0.01})``).
    :param loss: a Pyro ELBO, copied for each run (default ``Trace_ELBO()``).
    :param int seed: seed of run 0; run ``r`` uses ``seed + r`` (default 0).
    :param bool progress_bar: show a tqdm bar over all steps (default False).
    :param executor: where the runs are fitted: ``None`` (default: one after the other in this
        process), a ``concurrent.futures.Executor`` running tasks in other processes, or
        ``"ray"`` (or the ``ray`` module).
    :return: an :class:`IndependentFits`.
    :raises RuntimeError: if a run's loss becomes NaN or infinite.
    :raises TypeError: for a thread pool (Pyro's state is global to a process) or, with a
        process pool, arguments that cannot be pickled.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if not callable(make_guide):
        raise TypeError(
            f"make_guide must be a callable model -> guide, got {type(make_guide).__name__}"
        )
    num_runs = check_int("num_runs", num_runs, 2)
    num_steps = check_int("num_steps", num_steps, 1)
    seed = check_seed("seed", seed, offset=num_runs - 1)
    args, kwargs = _check_model_args(model_args, model_kwargs)
    if optim is None:
        optim = pyro.optim.Adam({"lr": 0.01})
    if not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(
            f"optim must be a Pyro optimizer (pyro.optim.*), got {type(optim).__name__}"
        )
    if loss is None:
        loss = Trace_ELBO()
    if not isinstance(loss, pyro.infer.ELBO):
        raise TypeError(f"loss must be a Pyro ELBO, got {type(loss).__name__}")
    if not isinstance(progress_bar, bool):
        raise TypeError(f"progress_bar must be a bool, got {type(progress_bar).__name__}")
    kind = _executor_kind(executor)

    guides, seeds = [], []
    losses = np.zeros((num_runs, num_steps))
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_runs * num_steps, desc="independent fits")
    try:
        if kind is None:
            for r in range(num_runs):
                run_seed = seed + r
                with torch.random.fork_rng(devices=_devices()):
                    torch.manual_seed(run_seed)
                    guide = _new_guide(model, make_guide, guides)
                    svi = SVI(model, guide, copy.deepcopy(optim), copy.deepcopy(loss))
                    losses[r] = _train(svi, num_steps, args, kwargs, r, run_seed, bar)
                guides.append(guide)
                seeds.append(run_seed)
        else:
            tasks = [
                _Task(
                    model, make_guide, r, seed + r, num_steps, args, kwargs,
                    copy.deepcopy(optim), copy.deepcopy(loss), os.getpid(),
                    torch.get_default_dtype(), is_validation_enabled(),
                )
                for r in range(num_runs)
            ]  # fmt: skip
            for task, (state, run_losses) in zip(
                tasks, _run_on_executor(kind, executor, tasks, bar)
            ):
                guides.append(_rebuild(model, make_guide, task, state, guides))
                seeds.append(task.seed)
                losses[task.run] = run_losses
    finally:
        if bar is not None:
            bar.close()
    return IndependentFits(
        model=model,
        guides=tuple(guides),
        seeds=tuple(seeds),
        losses=losses,
        model_args=args,
        model_kwargs=kwargs,
    )
