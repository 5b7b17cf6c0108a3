r"""Fit a density to data by maximum likelihood: :func:`fit_density`.

.. math::
    \hat\theta = \arg\max_\theta \frac1{N_{\rm train}} \sum_{n} \log p_\theta(x_n),

by Adam on minibatches, with a held-out split scored after every epoch, early stopping when the
held-out log-likelihood has not improved for ``patience`` epochs, and the best parameters
restored. The held-out score is computed in chunks whose size follows a memory budget, not the
number of points.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from pyro.distributions import TorchDistribution, constraints
from tqdm.auto import tqdm

from .._validation import check_bool, check_int, check_real
from ..distributions.estimators import check_estimator
from ..flows import FLOWS
from .builders import MODELS, DensityModule, MixtureFlowDensity, RADDensity, stack_flow
from .kmeans import kmeans_init

__all__ = ["FittedDensity", "fit_density", "as_data"]

_NORMAL_BASE_FLOWS = {"realnvp": "affine_coupling", "nsf": "spline_coupling"}


def as_data(data: object, name: str = "data") -> torch.Tensor:
    """``data`` as a floating tensor of shape ``(N, D)`` with finite rows, or a clear error.

    numpy arrays and tensors keep their float dtype (float32/float64) and device; integer or
    boolean data become the default dtype.

    :raises TypeError: for anything but a numeric tensor or array.
    :raises ValueError: for a shape other than ``(N, D)`` or any NaN/inf row.
    """
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a numeric array, got dtype {data.dtype}")
        data = torch.from_numpy(np.ascontiguousarray(data))
    elif not isinstance(data, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray of shape (N, D), got "
            f"{type(data).__name__}"
        )
    if data.is_complex():
        raise TypeError(f"{name} must be real, got dtype {data.dtype}")
    if not data.is_floating_point() or data.dtype in (torch.float16, torch.bfloat16):
        data = data.to(torch.get_default_dtype())
    if data.dim() != 2:
        hint = " (for 1-D data use data.reshape(-1, 1))" if data.dim() == 1 else ""
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(data.shape)}{hint}")
    if data.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(data.shape)}")
    bad = ~torch.isfinite(data).all(-1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} has {int(bad.sum())} rows with NaN or inf values (first rows: {rows}); "
            "drop or impute them before fitting"
        )
    return data


class FittedDensity(TorchDistribution):
    r"""A density fitted by :func:`fit_density`: a Pyro distribution on :math:`\mathbb{R}^D`.

    ``log_prob`` is the model's exact log-density. ``sample`` draws exactly; ``rsample`` (mixture
    flows only) carries gradients through the component choice with the model's ``estimator``.

    :ivar module: the fitted :class:`~torch.nn.Module` (its ``state_dict`` saves the fit).
    :ivar dict history: per epoch, ``"train"`` (mean training log-likelihood, nats per point),
        ``"held_out"`` (mean held-out log-likelihood) and ``"time"`` (seconds since the start).
    :ivar int best_epoch: the epoch whose parameters were restored.
    :ivar str model: the model name.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, module: DensityModule, model: str, history: dict, best_epoch: int):
        self.module = module
        self.model = model
        self.history = history
        self.best_epoch = best_epoch
        dim = int(module.shift.shape[-1])
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=False)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return isinstance(self.module, MixtureFlowDensity)

    @property
    def distribution(self) -> TorchDistribution:
        """The underlying :class:`~pyro_mogflow.MixtureFlow` or RAD flow."""
        return self.module.distribution()

    @property
    def num_parameters(self) -> int:
        """Trainable scalars of the model."""
        return self.module.num_parameters()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log-density; ``value`` ``(..., D)``, result ``(...)``."""
        return self.module.log_prob(value)

    def log_prob_chunked(self, value: torch.Tensor, memory_budget: int = 2**26) -> torch.Tensor:
        """:meth:`log_prob` without gradients, in chunks sized to ``memory_budget`` bytes.

        :param value: ``(N, D)`` tensor or array. :return: ``(N,)``.
        """
        value = as_data(value, "value").to(self.module.shift)
        return _chunked_log_prob(self.module, value, memory_budget)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Exact draws, shape ``(*sample_shape, D)``."""
        with torch.no_grad():
            return self.module.distribution().sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterized draws (mixture flows), shape ``(*sample_shape, D)``."""
        if not self.has_rsample:
            raise NotImplementedError(
                f"model {self.model!r} has a discrete latent with no reparameterization; "
                "use sample()"
            )
        return self.module.distribution().rsample(sample_shape)

    def components(self) -> dict:
        """The model's components: ``"weights"`` ``(K,)`` and ``"locs"`` ``(K, D)`` in data space
        (for RAD, estimated by sampling; see :meth:`RADDensity.components`)."""
        return self.module.components()


def _row_bytes(module: DensityModule, dim: int, itemsize: int) -> int:
    """A generous estimate of the bytes one row needs in a forward pass."""
    widths = [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)]
    k = int(module.logits.shape[-1]) if isinstance(module, MixtureFlowDensity) else 1
    return itemsize * (8 * k * dim + 4 * sum(widths) + 32 * dim + 64)


def _chunked_log_prob(module: DensityModule, x: torch.Tensor, memory_budget: int) -> torch.Tensor:
    rows = max(1, int(memory_budget) // _row_bytes(module, x.shape[-1], x.element_size()))
    with torch.no_grad():
        return torch.cat([module.log_prob(part) for part in x.split(rows)])


def _build(
    model: str,
    train: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    num_components: int,
    flow: str,
    num_flows: int,
    hidden_dims: Sequence[int],
    estimator: str,
    temperature: float,
    num_pieces: int,
    generator: torch.Generator,
    flow_kwargs: dict,
) -> DensityModule:
    dim = train.shape[-1]
    std = (train - shift) / scale
    if model == "rad":
        return RADDensity(shift, scale, dim, num_flows, num_pieces, hidden_dims)
    if model in ("mixture_flow", "gmm"):
        logits, locs, scales = kmeans_init(std, num_components, generator=generator)
        layers = (
            None if model == "gmm" else stack_flow(flow, dim, num_flows, hidden_dims, **flow_kwargs)
        )
        return MixtureFlowDensity(
            shift, scale, logits, locs, scales, layers, True, estimator, temperature
        ).to(train)
    zeros = torch.zeros(1, dim, dtype=train.dtype, device=train.device)
    layers = stack_flow(_NORMAL_BASE_FLOWS[model], dim, num_flows, hidden_dims, **flow_kwargs)
    return MixtureFlowDensity(
        shift, scale, zeros[:, 0], zeros, torch.ones_like(zeros), layers, False, estimator
    ).to(train)


def fit_density(
    data: torch.Tensor | np.ndarray,
    *,
    model: str = "mixture_flow",
    num_components: int = 8,
    flow: str = "spline_coupling",
    num_flows: int = 2,
    hidden_dims: Sequence[int] = (32, 32),
    estimator: str = "implicit",
    temperature: float = 0.5,
    num_pieces: int = 3,
    validation_fraction: float = 0.2,
    batch_size: int = 256,
    learning_rate: float = 5e-3,
    max_epochs: int = 300,
    patience: int = 30,
    max_time: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    memory_budget: int = 2**26,
    **flow_kwargs,
) -> FittedDensity:
    r"""Fit a density model to ``data`` by maximum likelihood, and return it as a distribution.

    .. math::
        \max_\theta \sum_{n \in \text{train}} \log p_\theta(x_n), \qquad
        \log p_\theta(x) = \log q_0(u) - \log\left|\det \tfrac{\partial f}{\partial u}\right|,
        \ u = f^{-1}(x),

    for a mixture flow (:class:`~pyro_mogflow.MixtureFlow`, base
    :math:`q_0 = \sum_k \pi_k \mathcal{N}(\mu_k, \operatorname{diag}\sigma_k^2)`), and the RAD
    density of :mod:`pyro_mogflow.density.rad` for ``model="rad"``. The data are standardised
    (training split's mean and standard deviation) inside the model, and the mixture components
    start from k-means++ seeding on them (:func:`~pyro_mogflow.density.kmeans.kmeans_init`), so
    every cluster of the data has a component from the first step.

    Under maximum likelihood :math:`\log p_\theta(x)` of *data* is differentiable in every
    parameter (weights, means, scales, flow) directly: no sample of the model is drawn, so the
    ``estimator`` plays no part in fitting. It only decides how :meth:`FittedDensity.rsample`
    carries gradients after the fit (e.g. for a downstream objective); ``sample`` and
    ``log_prob`` are exact whatever it is.

    Training: Adam on shuffled minibatches; after each epoch the held-out split is scored, and
    training stops after ``patience`` epochs without improvement, after ``max_epochs`` or after
    ``max_time`` seconds, whichever comes first; the best parameters are restored. A step with a
    non-finite loss is skipped, so the returned model never holds NaN parameters.

    Usage::

        q = fit_density(x, num_components=8)          # x: (N, D) tensor or numpy array
        q.log_prob(x[:5])                             # (5,)
        q.sample((1000,))                             # (1000, D)
        q.components()["weights"], q.history["held_out"]

    :param data: shape ``(N, D)``; float32/float64 and the device are kept (integers become the
        default dtype).
    :param str model: ``"mixture_flow"`` (default), ``"gmm"`` (the mixture, no flow),
        ``"realnvp"`` / ``"nsf"`` (affine / spline coupling on a standard normal base) or
        ``"rad"`` (Dinh et al. 2019; see :mod:`pyro_mogflow.density.rad`).
    :param int num_components: ``K`` for ``mixture_flow`` and ``gmm`` (default 8).
    :param str flow: the registered flow of ``mixture_flow`` (default ``"spline_coupling"``).
    :param int num_flows: flow layers (RAD: RAD layers), default 2.
    :param hidden_dims: hidden sizes of the flows' networks (default ``(32, 32)``).
    :param str estimator: one of :data:`~pyro_mogflow.ESTIMATORS`, for ``rsample`` only.
    :param float temperature: the relaxed estimators' temperature.
    :param int num_pieces: RAD's pieces per coordinate, odd, ``>= 3`` (default 3).
    :param float validation_fraction: held-out share of ``data`` in ``(0, 1)`` (default 0.2).
    :param int batch_size: minibatch size (default 256).
    :param float learning_rate: Adam's step size (default 5e-3).
    :param int max_epochs: at most this many passes (default 300).
    :param int patience: epochs without held-out improvement before stopping (default 30).
    :param max_time: wall-clock budget in seconds (``None``: none).
    :param seed: seeds the split, the shuffling, the seeding and the networks' initialisation
        (it sets torch's global seed); ``None`` leaves the global RNG as it is.
    :param bool progress: show a tqdm progress bar.
    :param int memory_budget: bytes for one evaluation chunk (default 64 MiB).
    :param flow_kwargs: passed to the flow's builder (e.g. ``count_bins``, ``bound``).
    :return: a :class:`FittedDensity`.
    :raises TypeError: for data or arguments of the wrong type.
    :raises ValueError: for bad shapes, NaN/inf rows, too few points, constant columns or
        out-of-range arguments; all raised before any work.

    References: L. Dinh, J. Sohl-Dickstein, S. Bengio, *Density estimation using Real NVP*,
    ICLR 2017; C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, *Neural Spline Flows*,
    NeurIPS 2019; L. Dinh, J. Sohl-Dickstein, R. Pascanu, H. Larochelle, *A RAD approach to deep
    mixture models*, 2019; D. Arthur, S. Vassilvitskii, *k-means++*, SODA 2007.
    """
    # ------------------------------------------------------------ checks, before any work
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    num_components = check_int("num_components", num_components, 1)
    num_flows = check_int("num_flows", num_flows, 1)
    num_pieces = check_int("num_pieces", num_pieces, 3)
    batch_size = check_int("batch_size", batch_size, 1)
    max_epochs = check_int("max_epochs", max_epochs, 1)
    patience = check_int("patience", patience, 1)
    memory_budget = check_int("memory_budget", memory_budget, 1)
    seed = check_int("seed", seed, allow_none=True)
    learning_rate = check_real("learning_rate", learning_rate, minimum=0.0, strict=True)
    temperature = check_real("temperature", temperature, minimum=0.0, strict=True)
    validation_fraction = check_real(
        "validation_fraction", validation_fraction, minimum=0.0, strict=True
    )
    if validation_fraction >= 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if max_time is not None:
        max_time = check_real("max_time", max_time, minimum=0.0, strict=True)
    check_bool("progress", progress)
    check_estimator(estimator)
    if (
        isinstance(hidden_dims, (str, bytes))
        or not isinstance(hidden_dims, Sequence)
        or not all(
            isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1
            for h in hidden_dims
        )
    ):
        raise TypeError(f"hidden_dims must be a sequence of ints >= 1, got {hidden_dims!r}")
    x = as_data(data)
    n, dim = x.shape
    if model == "mixture_flow" or model in _NORMAL_BASE_FLOWS:
        name = flow if model == "mixture_flow" else _NORMAL_BASE_FLOWS[model]
        if not isinstance(name, str) or name not in FLOWS:
            raise ValueError(f"flow must be one of {sorted(FLOWS)}, got {name!r}")
        if not FLOWS[name].invertible:
            raise ValueError(
                f"flow {name!r} is forward-only and cannot score data; use an invertible flow "
                "such as 'spline_coupling' or 'affine_coupling'"
            )
        if dim < FLOWS[name].min_dim:
            raise ValueError(
                f"flow {name!r} needs data with at least {FLOWS[name].min_dim} columns, got "
                f"{dim}; use flow='spline_autoregressive' for 1-D data"
            )
    num_val = max(1, int(round(validation_fraction * n)))
    k_needed = num_components if model in ("mixture_flow", "gmm") else 1
    min_train = max(2 * k_needed, 2 * dim, 8)
    if n - num_val < min_train:
        raise ValueError(
            f"data has too few points: N={n} leaves {n - num_val} for training after the "
            f"held-out split, and {model!r} with num_components={num_components} in D={dim} "
            f"needs at least {min_train}"
        )

    # ------------------------------------------------------------ split, standardise, build
    if seed is not None:
        torch.manual_seed(seed)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
    perm = torch.randperm(n, generator=gen, device=x.device)
    val, train = x[perm[:num_val]], x[perm[num_val:]]
    shift, scale = train.mean(0), train.std(0)
    if (scale <= 0).any():
        cols = (scale <= 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"data has constant columns {cols}; drop them before fitting")
    module = _build(
        model,
        train,
        shift,
        scale,
        num_components=num_components,
        flow=flow,
        num_flows=num_flows,
        hidden_dims=list(hidden_dims),
        estimator=estimator,
        temperature=temperature,
        num_pieces=num_pieces,
        generator=gen,
        flow_kwargs=flow_kwargs,
    )
    module = module.to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------ train
    optim = torch.optim.Adam(module.param_groups(learning_rate), lr=learning_rate)
    history: dict[str, list[float]] = {"train": [], "held_out": [], "time": []}
    best, best_epoch, best_state, stale = -math.inf, -1, copy.deepcopy(module.state_dict()), 0
    start = time.perf_counter()
    n_train = train.shape[0]
    bar = tqdm(range(max_epochs), disable=not progress, desc=f"fit_density[{model}]", leave=False)
    for epoch in bar:
        module.train()
        order = torch.randperm(n_train, generator=gen, device=x.device)
        total, count = 0.0, 0
        for idx in order.split(batch_size):
            loss = -module.log_prob(train[idx]).mean()
            if not torch.isfinite(loss):
                optim.zero_grad(set_to_none=True)
                continue
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 100.0)
            optim.step()
            total -= float(loss.detach()) * idx.numel()
            count += idx.numel()
        module.eval()
        held = float(_chunked_log_prob(module, val, memory_budget).mean())
        elapsed = time.perf_counter() - start
        history["train"].append(total / count if count else math.nan)
        history["held_out"].append(held)
        history["time"].append(elapsed)
        if math.isfinite(held) and held > best:
            best, best_epoch, stale = held, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            stale += 1
        bar.set_postfix(train=f"{history['train'][-1]:.3f}", held_out=f"{held:.3f}")
        if stale >= patience or (max_time is not None and elapsed > max_time):
            break
    bar.close()
    if best_epoch < 0:
        warnings.warn(
            "the held-out log-likelihood was never finite; returning the initial model",
            RuntimeWarning,
            stacklevel=2,
        )
    module.load_state_dict(best_state)
    return FittedDensity(module, model, history, best_epoch)
