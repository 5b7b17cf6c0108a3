"""Saving, restoring and copying AutoMixtureFlow, and its names in Pyro's param store."""

import copy
import io
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.flows import FLOWS

ESTIMATORS = ["relaxed", "relaxed-nested", "pathwise", "implicit"]
DTYPES = [torch.float32, torch.float64]


def make_model(dtype=torch.float32):
    def model(data):
        s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=dtype)))
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2, dtype=dtype), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(theta.sum(), s), obs=data)

    return model


def make_data(dtype=torch.float32):
    return torch.tensor(0.3, dtype=dtype)


def make_guide(model, flow="affine_coupling", estimator="pathwise", **kwargs):
    kwargs.setdefault("num_components", 3)
    if flow is not None:
        kwargs.setdefault("hidden_dims", [8])
        kwargs.setdefault("num_flows", 2)
    return AutoMixtureFlow(model, flow=flow, estimator=estimator, **kwargs)


def train(model, guide, data, steps=2):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(data)


def draw(guide, seed, *args):
    """The guide's sample and its log-density for a given seed."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        trace = poutine.trace(guide).get_trace(*args)
        return {k: v.clone() for k, v in trace.nodes["_RETURN"]["value"].items()}, float(
            trace.log_prob_sum()
        )


def assert_same_draws(a, b):
    values_a, log_q_a = a
    values_b, log_q_b = b
    assert values_a.keys() == values_b.keys()
    for name in values_a:
        assert torch.equal(values_a[name], values_b[name]), name
    assert log_q_a == pytest.approx(log_q_b, rel=1e-6, abs=1e-6)


def assert_draws_differ(a, b):
    assert not all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def state(guide):
    return {k: v.detach().clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ state_dict
def _restore_into_fresh_guide(flow, estimator, dtype):
    model, data = make_model(dtype), make_data(dtype)
    guide = make_guide(model, flow, estimator)
    train(model, guide, data)
    # A fresh guide from another seed: other component means, network weights, permutations.
    pyro.set_rng_seed(123)
    fresh = make_guide(model, flow, estimator).setup(data)
    assert_draws_differ(draw(guide, 7, data), draw(fresh, 7, data))
    fresh.load_state_dict(guide.state_dict())
    assert_same_draws(draw(guide, 7, data), draw(fresh, 7, data))
    assert fresh.name != guide.name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flow", sorted(FLOWS) + [None])
def test_state_dict_into_a_fresh_guide_gives_the_same_samples_for_each_flow(flow, dtype):
    _restore_into_fresh_guide(flow, "pathwise", dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_state_dict_into_a_fresh_guide_gives_the_same_samples_for_each_estimator(estimator):
    _restore_into_fresh_guide("affine_coupling", estimator, torch.float32)


def test_state_dict_carries_the_step_that_drives_a_temperature_schedule():
    model, data = make_model(), make_data()

    def schedule(step):
        return 1.0 / (1.0 + step)

    guide = make_guide(model, estimator="relaxed", temperature=schedule)
    train(model, guide, data, steps=3)
    assert guide.step == 3
    fresh = make_guide(model, estimator="relaxed", temperature=schedule).setup(data)
    assert fresh.step == 0
    fresh.load_state_dict(guide.state_dict())
    assert fresh.step == 3
    assert fresh.current_temperature() == guide.current_temperature() == 0.25
    assert_same_draws(draw(guide, 3, data), draw(fresh, 3, data))


def test_load_state_dict_before_setup_raises_a_clear_error():
    model, data = make_model(), make_data()
    guide = make_guide(model)
    train(model, guide, data, steps=1)
    fresh = make_guide(model)
    with pytest.raises(RuntimeError, match=r"not set up.*guide\.setup"):
        fresh.load_state_dict(guide.state_dict())
    assert fresh.prototype_trace is None


def test_setup_registers_no_sample_and_is_idempotent():
    model, data = make_model(), make_data()
    calls = []

    def counted(data):
        calls.append(1)
        model(data)

    guide = make_guide(counted)
    assert guide.setup(data) is guide
    first = len(calls)  # one run, plus one prior draw per component (init_spread="prior")
    params = {k: id(v) for k, v in guide.named_parameters()}
    assert guide.setup(data) is guide  # a second call neither reruns the model nor rebuilds
    assert len(calls) == first
    assert {k: id(v) for k, v in guide.named_parameters()} == params
    assert guide.step == 0


# ------------------------------------------------------------------- pickling and copies
@pytest.mark.parametrize("flow", ["affine_coupling", "neural_autoregressive", None])
def test_torch_save_and_load_round_trip(flow):
    model, data = make_model(), make_data()
    guide = make_guide(model, flow)
    train(model, guide, data)
    before = state(guide)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_same_draws(draw(guide, 11, data), draw(loaded, 11, data))
    # The original is untouched and still trains; the copy claimed its own param-store name,
    # so training one never moves the other.
    assert guide.model is not None
    assert_same_state(before, state(guide))
    assert loaded.name != guide.name
    train(model, loaded, data, steps=2)
    assert_same_state(before, state(guide))
    train(model, guide, data, steps=1)


def test_pickling_does_not_mutate_the_guide():
    model, data = make_model(), make_data()
    guide = make_guide(model, "planar")
    train(model, guide, data)
    wrapped_model = guide.model
    keys = set(guide.__dict__)
    before = state(guide)
    draws = draw(guide, 5, data)
    blob = pickle.dumps(guide)
    assert guide.model is wrapped_model
    assert set(guide.__dict__) == keys
    assert_same_state(before, state(guide))
    assert_same_draws(draws, draw(guide, 5, data))
    clone = pickle.loads(blob)
    assert_same_draws(draws, draw(clone, 5, data))
    train(model, guide, data, steps=1)  # the original still has its model and trains


@pytest.mark.parametrize("flow", ["spline_autoregressive", "block_autoregressive"])
def test_deepcopy_after_training_is_an_equal_independent_guide(flow):
    # After a step the flows' caches hold non-leaf tensors, which plain deepcopy refuses.
    model, data = make_model(), make_data()
    guide = make_guide(model, flow, estimator="relaxed", temperature=lambda step: 0.5)
    train(model, guide, data)
    twin = copy.deepcopy(guide)
    assert twin.model is guide.model and twin.temperature is guide.temperature
    assert twin.name != guide.name
    assert_same_draws(draw(guide, 9, data), draw(twin, 9, data))
    before = state(guide)
    train(model, twin, data, steps=2)
    assert_same_state(before, state(guide))
    assert_draws_differ(draw(guide, 9, data), draw(twin, 9, data))


# --------------------------------------------------------------------------------- names
def test_two_guides_in_one_param_store_never_share_parameters():
    model, data = make_model(), make_data()
    first, second = make_guide(model), make_guide(model)
    first.setup(data)
    second.setup(data)
    draw(first, 0, data)  # parameters enter the param store on a guide's first call
    draw(second, 0, data)
    assert first.name != second.name
    shared = {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    assert not shared
    store = pyro.get_param_store()
    for guide in (first, second):
        assert any(name.startswith(guide.name + ".") for name in store.keys())
    before = state(first)
    train(model, second, data, steps=3)
    assert_same_state(before, state(first))


def test_guide_set_up_after_clear_param_store_avoids_a_live_guides_name():
    # Pyro hands a PyroModule whatever the store holds under its name, so a new guide that took
    # a live guide's name would silently swap parameters with it.
    model, data = make_model(), make_data()
    first = make_guide(model)
    train(model, first, data)
    draws = draw(first, 2, data)
    pyro.clear_param_store()
    second = make_guide(model).setup(data)
    assert second.name != first.name
    train(model, second, data, steps=2)
    assert_same_draws(draws, draw(first, 2, data))


def test_explicit_name_in_use_raises_before_creating_parameters():
    model, data = make_model(), make_data()
    first = make_guide(model, name="mine")
    draw(first, 0, data)
    names = set(pyro.get_param_store().keys())
    assert names and all(name.startswith("mine.") for name in names)
    other = make_guide(model, name="mine")
    with pytest.raises(ValueError, match="name='mine' already has parameters"):
        other.setup(data)
    assert set(pyro.get_param_store().keys()) == names
    assert other.prototype_trace is None
