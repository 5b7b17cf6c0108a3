import pyro.distributions.transforms as T
import pytest
import torch

from pyro_mogflow.flows import (
    DEFAULT_SPLINE_BOUND,
    FLOWS,
    BufferPermute,
    ForwardOnlyGuard,
    build_flow,
    is_forward_only,
    register_flow,
)


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_registered_flow_builds_and_maps_shapes(name, dtype):
    torch.manual_seed(0)
    flow = build_flow(name, 3, num_flows=2).to(dtype=dtype)
    x = torch.randn(5, 3, dtype=dtype)
    y = flow(x)
    assert y.shape == x.shape and y.dtype == dtype
    ladj = flow.log_abs_det_jacobian(x, y)
    assert ladj.shape == (5,) and torch.isfinite(ladj).all()
    assert is_forward_only(flow) == (not FLOWS[name].invertible)


@pytest.mark.parametrize("name", sorted(n for n, s in FLOWS.items() if s.invertible))
def test_invertible_flows_invert_points_they_did_not_produce(name):
    torch.manual_seed(0)
    flow = build_flow(name, 3, num_flows=2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = flow(x).detach().clone()  # a fresh tensor: no cache hit
    assert torch.allclose(flow.inv(y), x, atol=1e-6)


def test_permutations_are_buffers_so_state_dict_reproduces_the_flow():
    torch.manual_seed(0)
    a = build_flow("affine_coupling", 4, num_flows=3)
    torch.manual_seed(123)
    b = build_flow("affine_coupling", 4, num_flows=3)
    keys = [k for k in a.state_dict() if k.endswith("permutation")]
    assert keys, "permutations must be in the state_dict"
    x = torch.randn(6, 4)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    x = x.clone()  # a new tensor, so neither flow answers from its cache
    assert torch.allclose(a(x), b(x))


def test_spline_default_bound_acts_beyond_pyros_three():
    torch.manual_seed(0)
    flow = build_flow("spline_autoregressive", 2, num_flows=1)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_()
    x = torch.tensor([[5.0, -5.0]])
    assert DEFAULT_SPLINE_BOUND > 5
    assert not torch.allclose(flow(x), x)
    narrow = build_flow("spline_autoregressive", 2, num_flows=1, bound=3.0)
    with torch.no_grad():
        for p in narrow.parameters():
            p.normal_()
    assert torch.allclose(narrow(x), x)  # Pyro's bound: the identity outside [-3, 3]


def test_buffer_permute_roundtrip_and_zero_logdet():
    p = BufferPermute(torch.tensor([2, 0, 1]))
    x = torch.randn(4, 3)
    y = p(x)
    assert torch.equal(y[:, 0], x[:, 2])
    assert torch.equal(p.inv(y.clone()), x)
    assert torch.equal(p.log_abs_det_jacobian(x, y), torch.zeros(4))
    with pytest.raises(ValueError, match="permutation"):
        BufferPermute(torch.tensor([0, 0, 1]))


def test_forward_only_guard_refuses_points_it_did_not_produce():
    torch.manual_seed(0)
    inner = build_flow("neural_autoregressive", 2, num_flows=1)
    guard = ForwardOnlyGuard(inner, name="neural_autoregressive")
    x = torch.randn(3, 2)
    y = guard(x)
    assert guard.inv(y) is x
    ladj = guard.log_abs_det_jacobian(x, y)
    # a second, different input: the guard recomputes rather than returning a stale log-det
    x2 = torch.randn(3, 2)
    ladj2 = guard.log_abs_det_jacobian(x2, inner(x2))
    assert torch.allclose(ladj2, inner.log_abs_det_jacobian(x2, inner(x2)))
    assert not torch.allclose(ladj, ladj2)
    with pytest.raises(ValueError, match="forward-only"):
        guard.inv(torch.randn(3, 2))


def test_callable_flow_is_called_once_per_layer():
    calls = []

    def make(d):
        calls.append(d)
        return build_flow("affine_autoregressive", d, num_flows=1)

    flow = build_flow(make, 3, num_flows=3)
    assert calls == [3, 3, 3]
    # a permutation between consecutive layers, plus one that undoes them
    assert sum(isinstance(t, BufferPermute) for t in flow.parts) == 3


def test_register_flow_adds_a_name():
    register_flow(
        "test_householder_alias",
        lambda d, h, **kw: FLOWS["householder"].builder(d, h, **kw),
        invertible=True,
        min_dim=2,
    )
    try:
        flow = build_flow("test_householder_alias", 3, num_flows=1)
        assert flow(torch.randn(2, 3)).shape == (2, 3)
    finally:
        FLOWS.pop("test_householder_alias")


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("no_such_flow", 3), {}, ValueError, "unknown flow"),
        (("spline_coupling", 1), {}, ValueError, "at least 2"),
        ((42, 3), {}, TypeError, "flow must be"),
        ((lambda d: "not a transform", 3), {}, TypeError, "Transform"),
        ((lambda d: None, 3), {"hidden_dims": [4]}, ValueError, "hidden_dims"),
    ],
)
def test_bad_flows_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_flow(*args, **kwargs)


def test_none_means_no_flow():
    assert build_flow(None, 3) is None


def test_stacked_permutations_compose_to_the_identity():
    """A stack of identity layers is the identity: the last permutation undoes the others, so
    components placed at chosen points start there."""
    torch.manual_seed(0)
    flow = build_flow("spline_coupling", 5, num_flows=4)
    x = torch.randn(7, 5)
    perms = [p for p in flow.parts if isinstance(p, BufferPermute)]
    assert len(perms) == 4  # three between layers, one to undo them
    index = torch.arange(5)
    for p in perms:
        index = index[p.permutation]
    assert torch.equal(index, torch.arange(5))
    only_perms = T.ComposeTransform(perms)
    assert torch.equal(only_perms(x), x)


@pytest.mark.parametrize("num_flows, error", [(0, ValueError), (-1, ValueError), (1.0, TypeError)])
def test_num_flows_below_one_is_refused(num_flows, error):
    with pytest.raises(error, match="num_flows"):
        build_flow("affine_autoregressive", 3, num_flows=num_flows)


def test_conditional_num_flows_below_one_is_refused():
    from pyro_mogflow.flows import build_conditional_flow

    with pytest.raises(ValueError, match="num_flows"):
        build_conditional_flow("affine_autoregressive", 3, 4, num_flows=0)


def test_register_flow_refuses_to_replace_a_built_in_unless_asked():
    original = FLOWS["householder"]
    with pytest.raises(ValueError, match="'householder' is a built-in flow.*override=True"):
        register_flow("householder", original.builder, invertible=True)
    assert FLOWS["householder"] is original
    try:
        register_flow("householder", original.builder, invertible=True, min_dim=2, override=True)
        assert FLOWS["householder"] is not original
    finally:
        FLOWS["householder"] = original


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"invertible": "yes"}, TypeError, "invertible must be a bool"),
        ({"invertible": True, "min_dim": 0}, ValueError, "min_dim must be an int >= 1"),
        ({"invertible": True, "min_dim": 1.5}, TypeError, "min_dim must be an int"),
        ({"invertible": True, "description": 3}, TypeError, "description must be a str"),
        ({"invertible": True, "override": 1}, TypeError, "override must be a bool"),
    ],
)
def test_register_flow_validates_its_metadata(kwargs, error, match):
    with pytest.raises(error, match=match):
        register_flow("test_bad_metadata", lambda d, h, **kw: None, **kwargs)
    assert "test_bad_metadata" not in FLOWS
