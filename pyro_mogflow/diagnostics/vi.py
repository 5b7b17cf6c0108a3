r"""Honest diagnostics for a variational fit: can the guide be trusted as a posterior?

Every quantity here is computed from draws :math:`z_s \sim q` of the guide and their log
importance weights :math:`\log w_s = \log p(x, z_s) - \log q(z_s)`, as exported by
:func:`~pyro_mogflow.to_inference_data` (``sample_stats`` holds ``lp``, ``lp_approx`` and
``log_weight``):

* the Pareto :math:`\hat k` of the weights' tail (Yao et al. 2018), judged against the
  sample-size-dependent threshold :math:`\min(1 - 1/\log_{10} S,\ 0.7)` (Vehtari et al. 2024);
* the importance-sampling effective sample size :math:`1 / \sum_s \tilde w_s^2` of the
  Pareto-smoothed normalised weights :math:`\tilde w`;
* the ELBO :math:`\frac1S \sum_s \log w_s` and the log evidence
  :math:`\log \hat Z = \log \frac1S \sum_s w_s`, with standard errors;
* for :class:`~pyro_mogflow.AutoMixtureFlow`, the mass of each mixture component before and
  after Pareto-smoothed reweighting;
* given several independent runs (one chain each), the rank-normalised split
  :math:`\hat R` across runs and the spread of the runs' evidence estimates.

:math:`\hat k` is computed from draws of the guide, so it cannot see a mode the guide never
visits: a guide that found one of two modes has light-tailed weights and a small
:math:`\hat k`. Only independent runs compared with each other reveal such a fit, which is why
:func:`vi_diagnostics` takes several runs (see :func:`~pyro_mogflow.fit_independent`).

References:

* Y. Yao, A. Vehtari, D. Simpson, A. Gelman, *Yes, but Did It Work?: Evaluating Variational
  Inference*, ICML 2018.
* A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, *Pareto Smoothed Importance Sampling*,
  JMLR 25(72), 2024.
* A. Vehtari, A. Gelman, D. Simpson, B. Carpenter, P.-C. Bürkner, *Rank-Normalization,
  Folding, and Localization: An Improved R-hat for Assessing Convergence of MCMC*, Bayesian
  Analysis 16(2), 2021.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validation import check_real, check_seed
from ..infer.memory import DEFAULT_MEMORY_BUDGET, check_memory_budget
from .components import (
    _component_groups,
    _component_masses,
    _component_summary,
)
from .export import to_inference_data
from .groups import _group, _is_datatree, _is_inference_data
from .importance import _evidence, _min_draws_for, good_k_threshold, psis

if TYPE_CHECKING:
    from arviz import InferenceData
    from xarray import DataTree

__all__ = [
    "MISSED_MODES_WARNING",
    "VIDiagnostics",
    "VIDiagnosticsWarning",
    "vi_diagnostics",
]

#: The sentence every "runs disagree" warning carries.
MISSED_MODES_WARNING = "k-hat cannot detect modes the guide never visits"

#: R-hat above which runs are taken to sit on different modes rather than to be unconverged.
_RHAT_MODES = 1.1

#: Draws per run below which k-hat and the evidence estimate are themselves too noisy.
_MIN_DRAWS = 100


class VIDiagnosticsWarning(UserWarning):
    """Issued by :func:`vi_diagnostics` when a fit should not be trusted as it stands."""


class _RunsWithTheirModel(abc.ABC):
    """Independent runs that carry their model and can export themselves, one chain per run.

    :class:`~pyro_mogflow.diagnostics.IndependentFits` is one. :func:`vi_diagnostics` draws
    from such a source through its own ``to_inference_data``, so this module needs no import
    of the class that fits the runs (which itself calls :func:`vi_diagnostics`).
    """

    @abc.abstractmethod
    def to_inference_data(self, **kwargs: Any) -> InferenceData | DataTree:
        """:func:`~pyro_mogflow.to_inference_data` of the runs, one chain per run."""


# --------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class VIDiagnostics:
    r"""What :func:`vi_diagnostics` found. Arrays indexed by run have length ``R``.

    :ivar int num_runs: ``R``, the number of independent runs (chains).
    :ivar int num_draws: ``S``, draws per run.
    :ivar float khat: the largest per-run Pareto :math:`\hat k` (each run is judged as a fit
        of its own).
    :ivar float khat_threshold: :func:`~pyro_mogflow.diagnostics.good_k_threshold` of ``S``.
    :ivar numpy.ndarray khat_per_run: shape ``(R,)``.
    :ivar float ess: importance ESS summed over runs, in ``[R, R * S]``.
    :ivar numpy.ndarray ess_per_run: shape ``(R,)``, each the ESS
        :math:`1/\sum_s \tilde w_s^2` of that run's Pareto-smoothed normalised weights.
    :ivar float elbo: mean log weight over all draws (an estimate of the ELBO).
    :ivar float elbo_se: its standard error.
    :ivar numpy.ndarray elbo_per_run: shape ``(R,)``.
    :ivar float log_evidence: :math:`\log \hat Z` from all draws (the runs' estimates of
        :math:`Z` averaged).
    :ivar float log_evidence_se: its delta-method standard error.
    :ivar numpy.ndarray log_evidence_per_run: shape ``(R,)``.
    :ivar numpy.ndarray log_evidence_se_per_run: shape ``(R,)``.
    :ivar float evidence_spread: largest minus smallest per-run :math:`\log \hat Z` (0 for one
        run).
    :ivar rhat: the largest rank-normalised split :math:`\hat R` over every posterior variable
        and element, across runs; ``None`` for a single run.
    :ivar dict rhat_per_variable: variable name -> its largest :math:`\hat R` (empty for one
        run).
    :ivar component_mass: for :class:`~pyro_mogflow.AutoMixtureFlow` draws, shape ``(R, K)``:
        the fraction of each run's draws that came from each component; else ``None``.
    :ivar component_mass_psis: shape ``(R, K)``: the same masses after Pareto-smoothed
        importance reweighting (the posterior mass each component accounts for); else ``None``.
    :ivar component_groups: per run, the components grouped by the mode their draws sit on
        (``pyro_mogflow.guides.summaries.group_components`` on each component's draw mean
        and spread), heaviest first: dicts with ``"components"``, ``"mass"`` (under q) and
        ``"mass_psis"``; ``None`` without component labels. ``print`` shows these groups and
        the components that matter, not all ``K`` masses.
    :ivar tuple warnings: plain-language problems found, each with advice; empty if none.
    :ivar tuple notes: caveats that are not failures (e.g. a single run cannot reveal a missed
        mode).
    """

    num_runs: int
    num_draws: int
    khat: float
    khat_threshold: float
    khat_per_run: np.ndarray
    ess: float
    ess_per_run: np.ndarray
    elbo: float
    elbo_se: float
    elbo_per_run: np.ndarray
    log_evidence: float
    log_evidence_se: float
    log_evidence_per_run: np.ndarray
    log_evidence_se_per_run: np.ndarray
    evidence_spread: float
    rhat: float | None
    rhat_per_variable: dict
    component_mass: np.ndarray | None
    component_mass_psis: np.ndarray | None
    warnings: tuple = ()
    notes: tuple = ()
    component_groups: tuple | None = None

    @property
    def ok(self) -> bool:
        """True when no warning was raised (the notes still apply)."""
        return not self.warnings

    def __str__(self) -> str:
        lines = [
            f"VI diagnostics: {self.num_runs} run(s) x {self.num_draws} draws",
            f"  Pareto k-hat      {self.khat:7.3f}   (good below {self.khat_threshold:.3f})",
            f"  importance ESS    {self.ess:7.1f}   of {self.num_runs * self.num_draws}",
            f"  ELBO              {self.elbo:10.3f} +- {self.elbo_se:.3f}",
            f"  log evidence      {self.log_evidence:10.3f} +- {self.log_evidence_se:.3f}",
        ]
        if self.num_runs > 1:
            lines.append(f"  evidence spread   {self.evidence_spread:10.3f} nats across runs")
            if self.rhat is not None:
                lines.append(f"  max R-hat         {self.rhat:10.3f} across runs")
            per_run = ", ".join(f"{k:.2f}" for k in self.khat_per_run)
            lines.append(f"  k-hat per run     {per_run}")
            per_run = ", ".join(f"{z:.2f}" for z in self.log_evidence_per_run)
            lines.append(f"  log Z per run     {per_run}")
        if self.component_mass is not None:
            for r in range(self.num_runs):
                groups = None if self.component_groups is None else self.component_groups[r]
                lines.extend(
                    _component_summary(
                        r, self.component_mass[r], self.component_mass_psis[r], groups
                    )
                )
        for prefix, texts in (("WARNING: ", self.warnings), ("note: ", self.notes)):
            for text in texts:
                lines.extend(
                    textwrap.wrap(
                        prefix + text, width=100, initial_indent="  ", subsequent_indent="    "
                    )
                )
        if not self.warnings:
            lines.append("  no problems found")
        return "\n".join(lines)


def _sample_stats(data) -> tuple[object, np.ndarray]:
    stats = _group(data, "sample_stats")
    if stats is None or "log_weight" not in stats:
        raise ValueError(
            "data has no sample_stats.log_weight; make it with pyro_mogflow.to_inference_data, "
            "which records log p (lp), log q (lp_approx) and log_weight = lp - lp_approx"
        )
    log_w = np.asarray(stats["log_weight"].transpose("chain", "draw").values, dtype=np.float64)
    return stats, log_w


def _rhat(posterior) -> tuple[float | None, dict]:
    import arviz as az

    if posterior is None or not len(posterior.data_vars):
        return None, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(posterior)
    per_var = {}
    for name in rhat.data_vars:
        values = np.asarray(rhat[name].values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            per_var[str(name)] = float(finite.max())
    return (max(per_var.values()) if per_var else None), per_var


def vi_diagnostics(
    source: InferenceData | DataTree | Callable | Sequence[Callable],
    model: Callable | None = None,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    seed: int | None = None,
    rhat_threshold: float = 1.01,
    evidence_z: float = 4.0,
    evidence_tol: float = 0.1,
    warn: bool = True,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> VIDiagnostics:
    r"""Can this variational fit be trusted? Pareto :math:`\hat k`, ESS, ELBO, evidence, and
    agreement between independent runs, with plain advice.

    ``source`` is either what :func:`~pyro_mogflow.to_inference_data` returned (each chain one
    independent run), or guides to draw from: one Pyro guide, a sequence of independently
    fitted guides, or the :class:`~pyro_mogflow.IndependentFits` of
    :func:`~pyro_mogflow.fit_independent` (then ``model`` and its arguments are needed, except
    for :class:`~pyro_mogflow.IndependentFits`, which carries them).

    For each run :math:`r` with draws :math:`z_{rs} \sim q_r` and log weights
    :math:`\log w_{rs} = \log p(x, z_{rs}) - \log q_r(z_{rs})`:

    .. math::
        \widehat{\mathrm{ELBO}}_r = \frac1S \sum_s \log w_{rs}, \qquad
        \log \hat Z_r = \log \frac1S \sum_s w_{rs}.

    Pooled over runs, :math:`\log \hat Z = \log \frac{1}{RS} \sum_{r,s} w_{rs}` (each run's
    :math:`\hat Z_r` is unbiased for :math:`Z` when :math:`q_r` covers the posterior, so their
    mean is too). Pareto :math:`\hat k` and the ESS come from
    :func:`~pyro_mogflow.diagnostics.psis`, run by run.

    Warnings (each also issued as a :class:`VIDiagnosticsWarning` when ``warn``):

    * :math:`\hat k > 0.7` for some run: importance weights too heavy-tailed to be repaired;
    * :math:`k_{\text{good}}(S) < \hat k \le 0.7`, or fewer than 100 draws per run: too few
      draws for this :math:`\hat k`;
    * runs disagree: :math:`\max \hat R >` ``rhat_threshold``, or the per-run
      :math:`\log \hat Z_r` span more than ``evidence_tol`` plus ``evidence_z`` standard errors.
      The warning says plainly that :math:`\hat k` cannot detect modes the guide never visits.

    :param source: an ``arviz.InferenceData`` / ``xarray.DataTree`` from
        :func:`~pyro_mogflow.to_inference_data`, a guide, a sequence of guides, or an
        :class:`~pyro_mogflow.IndependentFits`.
    :param callable model: the Pyro model, when ``source`` holds guides.
    :param tuple model_args: the model's positional arguments, when ``source`` holds guides.
    :param dict model_kwargs: the model's keyword arguments, when ``source`` holds guides.
    :param int num_samples: draws per run, when ``source`` holds guides (default 1000).
    :param seed: seed for those draws (``None``: the global random state).
    :param float rhat_threshold: largest acceptable :math:`\hat R` across runs (default 1.01,
        Vehtari et al. 2021).
    :param float evidence_z: how many standard errors of the difference two runs' evidence
        estimates may differ by (default 4).
    :param float evidence_tol: extra slack in nats on that difference (default 0.1).
    :param bool warn: also issue the warnings with :func:`warnings.warn` (default True).
    :param memory_budget: bytes of working memory for the model's evaluation of a batch of
        draws, when ``source`` holds guides (default 1 GiB; see
        :func:`~pyro_mogflow.to_inference_data`).
    :return: a :class:`VIDiagnostics`; ``print`` it for a summary.

    References: Yao et al. (2018); Vehtari et al. (2024); Vehtari et al. (2021).
    """
    rhat_threshold = check_real("rhat_threshold", rhat_threshold, minimum=1.0)
    evidence_z = check_real("evidence_z", evidence_z, minimum=0.0)
    evidence_tol = check_real("evidence_tol", evidence_tol, minimum=0.0)
    seed = check_seed("seed", seed, allow_none=True)
    memory_budget = check_memory_budget(memory_budget)
    if not isinstance(warn, bool):
        raise TypeError(f"warn must be a bool, got {type(warn).__name__}")
    if _is_inference_data(source) or _is_datatree(source):
        if model is not None:
            raise ValueError(
                "model must be None when source is already an InferenceData/DataTree; it is "
                "only needed to draw from guides"
            )
        data = source
    else:
        data = _draw(source, model, model_args, model_kwargs, num_samples, seed, memory_budget)
    return _diagnose(data, rhat_threshold, evidence_z, evidence_tol, warn)


def _draw(source, model, model_args, model_kwargs, num_samples, seed, memory_budget):
    if isinstance(source, _RunsWithTheirModel):
        if model is not None or model_args or model_kwargs:
            raise ValueError(
                "model, model_args and model_kwargs must not be given with an IndependentFits, "
                "which carries its own"
            )
        return source.to_inference_data(
            num_samples=num_samples,
            seed=seed,
            posterior_predictive=False,
            log_likelihood=False,
            memory_budget=memory_budget,
        )
    if model is None:
        raise ValueError(
            "model is required when source is a guide or a sequence of guides, got None"
        )
    guides = source if isinstance(source, Sequence) else [source]
    return to_inference_data(
        None,
        model,
        guides=list(guides),
        model_args=model_args,
        model_kwargs=model_kwargs,
        num_samples=num_samples,
        seed=seed,
        posterior_predictive=False,
        log_likelihood=False,
        memory_budget=memory_budget,
    )


def _diagnose(data, rhat_threshold, evidence_z, evidence_tol, warn) -> VIDiagnostics:
    stats, log_w = _sample_stats(data)
    if not np.isfinite(log_w).all():
        bad = int((~np.isfinite(log_w)).sum())
        raise ValueError(
            f"sample_stats.log_weight has {bad} non-finite value(s): the model's log density is "
            "-inf, +inf or NaN at some guide draws (a draw outside the support, or an overflow); "
            "check the model and the guide's constraints"
        )
    runs, draws = log_w.shape
    if draws < 10:
        raise ValueError(f"need at least 10 draws per run for Pareto smoothing, got {draws}")

    smoothed_runs, khat_runs = psis(log_w)
    khat_runs = np.asarray(khat_runs, dtype=np.float64).reshape(runs)
    khat = float(khat_runs.max())
    ess_runs = 1.0 / np.exp(np.logaddexp.reduce(2 * smoothed_runs, axis=-1))
    ess = float(ess_runs.sum())

    elbo_runs = log_w.mean(axis=1)
    elbo = float(log_w.mean())
    elbo_se = float(log_w.std(ddof=1) / math.sqrt(log_w.size))
    evidence_runs = [_evidence(log_w[r]) for r in range(runs)]
    log_z_runs = np.array([z for z, _ in evidence_runs])
    log_z_se_runs = np.array([se for _, se in evidence_runs])
    log_z, log_z_se = _evidence(log_w.reshape(-1))
    spread = float(log_z_runs.max() - log_z_runs.min())

    rhat, rhat_per_var = (None, {})
    if runs > 1:
        rhat, rhat_per_var = _rhat(_group(data, "posterior"))

    mass = mass_psis = component_groups = None
    if "component" in stats:
        component = np.asarray(stats["component"].transpose("chain", "draw").values).astype(int)
        k = int(stats.attrs.get("num_components", component.max() + 1))
        mass, mass_psis = _component_masses(component, smoothed_runs, k)
        component_groups = _component_groups(_group(data, "posterior"), component, mass, mass_psis)

    threshold = good_k_threshold(draws)
    found: list[str] = []
    notes: list[str] = []
    worst_run = f" (run {int(khat_runs.argmax())})" if runs > 1 else ""
    if khat > 0.7:
        found.append(
            f"Pareto k-hat = {khat:.2f}{worst_run} > 0.7: the importance weights p/q are too "
            "heavy-tailed, "
            "so the guide under-covers part of the posterior and importance-sampling estimates "
            "(evidence, reweighted expectations) cannot be trusted. Fit a richer guide (more "
            "mixture components or flow layers), train longer, or compare with MCMC."
        )
    elif khat > threshold:
        need = _min_draws_for(khat)
        found.append(
            f"too few draws: Pareto k-hat = {khat:.2f}{worst_run} is above the threshold "
            f"{threshold:.2f} for {draws} draws; draw at least {math.ceil(need)} per run "
            "(to_inference_data(num_samples=...)) before trusting importance-sampling estimates."
        )
    if draws < _MIN_DRAWS:
        found.append(
            f"too few draws: {draws} per run makes k-hat and the evidence estimate noisy "
            f"themselves; use at least {_MIN_DRAWS} (1000 or more is better)."
        )
    if runs > 1:
        i, j = int(log_z_runs.argmax()), int(log_z_runs.argmin())
        pair_se = math.sqrt(log_z_se_runs[i] ** 2 + log_z_se_runs[j] ** 2)
        evidence_disagree = spread > evidence_tol + evidence_z * pair_se
        rhat_disagree = rhat is not None and rhat > rhat_threshold
        if evidence_disagree or rhat_disagree:
            reasons = []
            if rhat_disagree:
                worst = max(rhat_per_var, key=rhat_per_var.get)
                reasons.append(
                    f"R-hat across runs is {rhat:.3f} > {rhat_threshold:g} (worst: {worst!r})"
                )
            if evidence_disagree:
                reasons.append(
                    f"the runs' log-evidence estimates span {spread:.2f} nats "
                    f"({spread / max(pair_se, 1e-300):.1f} standard errors)"
                )
            if evidence_disagree or rhat > _RHAT_MODES:
                cause = (
                    "At least one run settled on a different part of the posterior, although "
                    "each may look fine on its own"
                )
            else:
                cause = (
                    "The runs have not converged to the same fit (train longer or decay the "
                    "learning rate), or they settled on different parts of the posterior"
                )
            found.append(
                f"runs disagree: {'; '.join(reasons)}. {cause}: {MISSED_MODES_WARNING}. Use a "
                "guide that can hold several modes (e.g. AutoMixtureFlow with more "
                "components), anneal the target, or fit again and compare; do not trust a "
                "single run."
            )
    else:
        notes.append(
            "a single run cannot reveal a mode the guide never visited: "
            f"{MISSED_MODES_WARNING}. Compare several independent runs "
            "(pyro_mogflow.fit_independent) to check."
        )
    if warn:
        for message in found:
            warnings.warn(message, VIDiagnosticsWarning, stacklevel=3)
    return VIDiagnostics(
        num_runs=runs,
        num_draws=draws,
        khat=float(khat),
        khat_threshold=threshold,
        khat_per_run=np.asarray(khat_runs, dtype=np.float64).reshape(runs),
        ess=ess,
        ess_per_run=ess_runs,
        elbo=elbo,
        elbo_se=elbo_se,
        elbo_per_run=elbo_runs,
        log_evidence=log_z,
        log_evidence_se=log_z_se,
        log_evidence_per_run=log_z_runs,
        log_evidence_se_per_run=log_z_se_runs,
        evidence_spread=spread,
        rhat=rhat,
        rhat_per_variable=rhat_per_var,
        component_mass=mass,
        component_mass_psis=mass_psis,
        warnings=tuple(found),
        notes=tuple(notes),
        component_groups=component_groups,
    )
