"""Tests for pyro_mogflow.fit's steps: failed steps leave the guide untouched, beta schedules,
stop and resume, interrupted steps, model keywords, the weight-balancing phase."""

import copy
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_mogflow import AutoMixtureFlow, FitResult, fit
from pyro_mogflow.examples import gaussian_mixture_target


def two_modes(dtype=torch.float32):
    return gaussian_mixture_target([[-3.0], [3.0]], scales=0.5, dtype=dtype)


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[-1]):
        return pyro.sample("y", dist.Normal(w * x, 0.5), obs=y)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, generator=g)
    return x, 1.5 * x + 0.5 * torch.randn(20, generator=g)


def _state(guide, optim):
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    return params, copy.deepcopy(optim.get_state())


def _assert_same_state(a, b):
    params_a, optim_a = a
    params_b, optim_b = b
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k
    assert optim_a.keys() == optim_b.keys()
    for k in optim_a:
        for key, value in optim_a[k]["state"].items():
            for name, tensor in value.items():
                assert torch.equal(
                    torch.as_tensor(tensor), torch.as_tensor(optim_b[k]["state"][key][name])
                ), (k, name)


# --------------------------------------------------------- a failed step changes nothing
@pytest.mark.parametrize("guide_kind", ["AutoMixtureFlow", "AutoNormal"])
def test_a_step_with_an_infinite_loss_leaves_guide_and_optimiser_as_they_were(guide_kind):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    calls = {"n": 0}
    fail_at = 10  # model calls; setup, model check, memory probes and first steps run clean

    def model():
        calls["n"] += 1
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        bad = math.inf if calls["n"] >= fail_at else 0.0
        pyro.factor("blows_up", torch.full_like(z, bad))

    if guide_kind == "AutoMixtureFlow":
        guide = AutoMixtureFlow(model, num_components=2)
    else:
        guide = AutoNormal(model)
    optim = pyro.optim.Adam({"lr": 0.05})
    snapshots = []
    with pytest.raises(RuntimeError, match=r"the loss became -?inf at step \d+") as info:
        fit(
            model,
            guide=guide,
            optim=optim,
            num_steps=20,
            progress=False,
            callback=lambda step, loss, beta: snapshots.append(_state(guide, optim)),
        )
    message = str(info.value)
    assert "'blows_up'" in message and "not applied" in message
    assert snapshots, "some steps ran before the failure"
    _assert_same_state(_state(guide, optim), snapshots[-1])
    for _, p in pyro.get_param_store().named_parameters():
        assert bool(torch.isfinite(p).all())
        assert p.grad is None


def test_a_non_finite_gradient_names_the_parameter_and_is_not_applied():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    state = {"poison": False}

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if state["poison"]:
            # finite value, NaN gradient: sqrt at 0 of a quantity that is exactly 0
            pyro.factor("f", torch.sqrt(z * 0.0) * 0.0)

    guide = AutoNormal(model)
    optim = pyro.optim.Adam({"lr": 0.05})
    fit(model, guide=guide, optim=optim, num_steps=3, beta=None, progress=False)
    before = _state(guide, optim)
    state["poison"] = True
    with pytest.raises(RuntimeError, match="gradient of parameter.*AutoNormal.locs.z"):
        fit(model, guide=guide, optim=optim, num_steps=3, beta=None, progress=False)
    _assert_same_state(_state(guide, optim), before)


# ------------------------------------------------------------------------- beta schedules
@pytest.mark.parametrize(
    "schedule, error, match",
    [
        (lambda step: math.inf if step == 3 else 0.5, ValueError, "inf at step 3"),
        (lambda step: 1.5 if step >= 4 else 0.5, ValueError, r"1.5 at step 4.*\(0, 1\]"),
        (lambda step: 0.0, ValueError, "at step 0"),
        (lambda step: float("nan") if step == 2 else 1.0, ValueError, "nan at step 2"),
        (lambda step: "hot", TypeError, "at step 0"),
    ],
)
def test_bad_beta_schedules_are_refused_before_any_work(schedule, error, match):
    target = two_modes()
    calls = []

    def model(*args, **kwargs):
        calls.append(1)
        return target.model(*args, **kwargs)

    with pytest.raises(error, match=match):
        fit(model, *target.args, num_steps=6, beta=schedule, progress=False, **target.kwargs)
    assert calls == []


# ----------------------------------------------------------------------- stop and resume
def _fit_from_seed(target, num_steps, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    guide = AutoMixtureFlow(target.model, num_components=4)
    betas = []

    def record(step, loss, beta):
        betas.append((step, beta))
        return kwargs.pop("_stop_at", None) == step

    stop = kwargs.pop("stop_at", None)
    result = fit(
        target.model,
        *target.args,
        guide=guide,
        num_steps=num_steps,
        progress=False,
        callback=lambda step, loss, beta: record(step, loss, beta) or step == stop,
        **target.kwargs,
    )
    return result, betas


def test_stop_and_resume_equals_an_uninterrupted_fit():
    target = two_modes()
    steps = 30
    full, full_betas = _fit_from_seed(target, steps)
    full_params = _params()
    assert not full.stopped and full.next_step == steps

    first, betas = _fit_from_seed(target, steps, stop_at=11)
    assert first.stopped and first.next_step == 12 and len(first.losses) == 12
    second = fit(
        target.model,
        *target.args,
        guide=first.guide,
        optim=first.optim,
        num_steps=steps,
        start_step=first.next_step,
        progress=False,
        callback=lambda step, loss, beta: betas.append((step, beta)),
        **target.kwargs,
    )
    assert second.next_step == steps and not second.stopped
    assert betas == full_betas  # the tempering continued, it did not restart
    np.testing.assert_array_equal(np.concatenate([first.losses, second.losses]), full.losses)
    resumed = _params()
    assert resumed.keys() == full_params.keys()
    for k, v in resumed.items():
        assert torch.equal(v, full_params[k]), k


def test_fit_result_still_unpacks_as_guide_and_losses():
    target = two_modes()
    result = fit(
        target.model,
        *target.args,
        num_steps=2,
        progress=False,
        balance=None,
        guide=AutoMixtureFlow(target.model, num_components=2),
        **target.kwargs,
    )
    guide, losses = result
    assert isinstance(result, FitResult) and isinstance(result, tuple)
    assert result.guide is guide and result.losses is losses and len(result) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"start_step": 5}, ValueError, "start_step must be < num_steps=5"),
        ({"start_step": -1}, ValueError, "start_step must be an int >= 0"),
        ({"callback": 3}, TypeError, "callback must be None or callable"),
    ],
)
def test_bad_resume_arguments_raise(kwargs, error, match):
    target = two_modes()
    with pytest.raises(error, match=match):
        fit(target.model, *target.args, num_steps=5, progress=False, **target.kwargs, **kwargs)


# -------------------------------------------------------------- interrupted steps (Ctrl-C)
class _InterruptAfterBackward(pyro.optim.PyroOptim):
    """An optimiser whose first call raises KeyboardInterrupt: backward ran, the step did not."""

    def __init__(self, args):
        super().__init__(torch.optim.Adam, args)
        self.interrupt = True

    def __call__(self, params, *args, **kwargs):
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return super().__call__(params, *args, **kwargs)


def _params():
    """Param-store values keyed without the guide's unique prefix."""
    return {
        k.split(".", 1)[-1]: v.detach().clone()
        for k, v in pyro.get_param_store().named_parameters()
    }


@pytest.mark.parametrize("guide_kind", ["AutoMixtureFlow", "AutoNormal"])
def test_an_interrupted_step_leaves_no_gradient_for_the_next_fit(guide_kind):
    x, y = _data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if guide_kind == "AutoMixtureFlow":
        guide = AutoMixtureFlow(regression, num_components=2)
    else:
        guide = AutoNormal(regression)
    with pytest.raises(KeyboardInterrupt):
        fit(
            regression,
            x,
            y=y,
            guide=guide,
            num_steps=3,
            progress=False,
            optim=_InterruptAfterBackward({"lr": 0.05}),
        )
    for _, p in pyro.get_param_store().named_parameters():
        assert p.grad is None or not bool(p.grad.any())
    interrupted = _params()

    def one_sgd_step():
        pyro.set_rng_seed(1)
        sgd = pyro.optim.SGD({"lr": 0.01})
        fit(regression, x, y=y, guide=guide, num_steps=1, progress=False, optim=sgd, balance=None)
        return _params()

    after = one_sgd_step()
    # the reference: the same parameters, no gradient at all, the same step
    with torch.no_grad():
        for name, p in pyro.get_param_store().named_parameters():
            p.copy_(interrupted[name.split(".", 1)[-1]])
            p.grad = None
    reference = one_sgd_step()
    for k in reference:
        assert torch.equal(after[k], reference[k]), k


def test_gradients_left_by_someone_else_are_not_added_into_the_first_step():
    x, y = _data()

    def run(stale):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(regression)
        guide(x, y=y)
        if stale:
            for _, p in pyro.get_param_store().named_parameters():
                p.grad = torch.full_like(p, 100.0)
        fit(
            regression,
            x,
            y=y,
            guide=guide,
            num_steps=1,
            progress=False,
            optim=pyro.optim.SGD({"lr": 0.01}),
        )
        return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    clean, stale = run(False), run(True)
    for k in clean:
        assert torch.equal(clean[k], stale[k]), k


# ------------------------------------------------------------------------ model keywords
def test_data_passed_by_keyword_reaches_the_model():
    x, y = _data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide, losses = fit(
        regression, x, y=y, guide=AutoNormal(regression), num_steps=300, lr=0.05, progress=False
    )
    assert np.isfinite(losses).all()
    assert guide.median(x, y=y)["w"].item() == pytest.approx(1.5, abs=0.3)


def test_model_kwargs_still_work_and_clashing_names_go_there():
    x, y = _data()

    def model(x, lr=None):  # an argument named like an option of fit
        assert lr == "model's"
        regression(x, y)

    fit(
        model,
        x,
        model_kwargs={"lr": "model's"},
        guide=AutoNormal(model),
        num_steps=2,
        progress=False,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"yy": 1}, r"unexpected keyword argument\(s\) \['yy'\]"),
        ({"y": 1, "model_kwargs": {"y": 2}}, "both directly and in model_kwargs"),
    ],
)
def test_unknown_or_doubled_model_keywords_are_refused_before_any_work(kwargs, match):
    x, _ = _data()
    with pytest.raises(TypeError, match=match):
        fit(regression, x, num_steps=2, progress=False, **kwargs)


# ---------------------------------------------------------------- balancing is a visible phase
def test_weight_balancing_shows_in_the_progress_bar(capsys):
    target = two_modes()
    fit(
        target.model,
        *target.args,
        guide=AutoMixtureFlow(target.model, num_components=2),
        num_steps=2,
        progress=True,
        desc="myfit",
        balance_particles=8,
        **target.kwargs,
    )
    assert "myfit (balancing weights)" in capsys.readouterr().err


def test_a_parameter_of_the_model_is_still_trained_when_the_steps_are_natural():
    # the natural steps need no backward pass for the mixture itself; a model parameter does
    def model(x, y=None):
        noise = pyro.param("noise", torch.tensor(2.0), constraint=dist.constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, 3.0))
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("y", dist.Normal(w * x, noise), obs=y)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = _data()
    guide = AutoMixtureFlow(model, num_components=4, flow=None)
    fit(model, x, y, guide=guide, num_steps=300, beta=None, progress=False)
    # the data's noise is 0.5: the learned scale falls from 2 toward it
    assert float(pyro.param("noise").detach()) < 1.0


def test_the_backward_pass_is_skipped_only_when_it_feeds_no_parameter():
    from pyro import poutine

    from pyro_mogflow.infer.mixture_weights import _backward_needed

    x, y = _data()
    guide = AutoMixtureFlow(regression, num_components=2, flow="affine_autoregressive")
    guide.setup(x, y)
    with poutine.trace(param_only=True) as capture:
        guide(x, y)
    trace = capture.trace

    def frozen():
        return True

    def trained():
        return False

    assert guide.flow is not None
    assert not _backward_needed(trace, guide, True, 0.05, frozen)
    assert _backward_needed(trace, guide, True, 0.05, trained)  # the flow learns
    assert _backward_needed(trace, guide, False, 0.05, frozen)  # Adam moves the means
    assert _backward_needed(trace, guide, True, None, frozen)  # Adam moves the logits
