"""Named flow stacks built from Pyro transforms, stacked on top of the mixture base.

A flow is built by :func:`build_flow` from a registered name (see :data:`FLOWS`), or from a
callable ``latent_dim -> TransformModule``. Layers are separated by :class:`BufferPermute`, a
permutation stored as a buffer, so a reloaded ``state_dict`` gives the very same flow (Pyro's
``T.permute`` keeps its permutation out of the ``state_dict``).

Some of Pyro's transforms are *forward-only*: they can map a base point forward but cannot score
an arbitrary point (planar, radial, Sylvester, block and neural autoregressive, polynomial). They
are marked in the registry, and :class:`ForwardOnlyGuard` makes any attempt to invert them at a
point the flow did not just produce raise a clear error instead of returning a stale log-det.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import Transform

from .._validation import check_bool, check_int

__all__ = [
    "FLOWS",
    "FlowSpec",
    "BufferPermute",
    "ForwardOnlyGuard",
    "build_flow",
    "check_flow",
    "register_flow",
    "is_forward_only",
    "stack_layers",
]

#: Default half-width of the box on which spline flows act. Pyro's default (3) makes a spline
#: the identity beyond +-3, where the modes of many posteriors lie; ours covers +-8.
DEFAULT_SPLINE_BOUND = 8.0


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """How to build one layer of a registered flow.

    :param builder: ``builder(latent_dim, hidden_dims, **kwargs) -> TransformModule``.
    :param invertible: whether the layer can score points it did not produce.
    :param min_dim: the smallest latent dimension the layer supports.
    :param description: one line for the docs and error messages.
    """

    builder: Callable[..., Transform]
    invertible: bool
    min_dim: int = 1
    description: str = ""


#: Flow layers buildable by name: name -> :class:`FlowSpec` (add one with :func:`register_flow`).
FLOWS: dict[str, FlowSpec] = {}
_BUILTIN_FLOWS: frozenset = frozenset()  # set once the built-ins below are registered


def register_flow(
    name: str,
    builder: Callable[..., Transform],
    *,
    invertible: bool,
    min_dim: int = 1,
    description: str = "",
    override: bool = False,
) -> None:
    """Register a flow layer under ``name`` so ``AutoMixtureFlow(flow=name)`` can build it.

    :param str name: the name to register (a non-empty str).
    :param callable builder: ``builder(latent_dim, hidden_dims, **kwargs) -> Transform``.
    :param bool invertible: whether the layer can score points it did not produce.
    :param int min_dim: the smallest latent dimension the layer supports (``>= 1``).
    :param str description: one line for the docs and error messages.
    :param bool override: allow replacing a built-in flow (default False: registering a
        built-in name raises ``ValueError``; a name you registered yourself can be replaced).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    invertible = check_bool("invertible", invertible)
    min_dim = check_int("min_dim", min_dim, 1)
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, got {type(description).__name__}")
    override = check_bool("override", override)
    if name in _BUILTIN_FLOWS and not override:
        raise ValueError(
            f"flow {name!r} is a built-in flow; pass override=True to replace it, or choose "
            "another name"
        )
    FLOWS[name] = FlowSpec(builder, invertible, min_dim, description)


def _hidden(hidden_dims, d=None):
    return None if hidden_dims is None else list(hidden_dims)


def _spline_kwargs(kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("bound", DEFAULT_SPLINE_BOUND)
    kwargs.setdefault("count_bins", 8)
    return kwargs


class _AffineAutoregressive(T.AffineAutoregressive):
    """Pyro's affine autoregressive layer with an inverse that follows the input's dtype.

    Pyro 1.9's ``AffineAutoregressive._inverse`` builds its work tensor in the *default* dtype,
    so a float64 flow cannot invert a point; this runs it with the default dtype set to ``y``'s.
    """

    def _inverse(self, y):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(y.dtype)
        try:
            return super()._inverse(y)
        finally:
            torch.set_default_dtype(previous)


def _affine_autoregressive(d, h, **kw):
    layer = T.affine_autoregressive(d, hidden_dims=_hidden(h, d), **kw)
    layer.__class__ = _AffineAutoregressive
    return layer


register_flow(
    "affine_autoregressive",
    _affine_autoregressive,
    invertible=True,
    description="IAF / MAF (Kingma et al. 2016; Papamakarios et al. 2017)",
)


def _zero_(*tensors):
    with torch.no_grad():
        for tensor in tensors:
            tensor.zero_()


# Spline layers start near the identity: zero spline parameters mean equal bins, which map each
# knot to itself. Pyro's own initialisation (random conditioner outputs; randn for coupling's
# pass-through spline) bends the whole +-bound box: on an 11-dimensional test model the initial
# -ELBO was 50-420 nats against 8 without a flow. Zeroing the conditioner's last layer keeps
# every other weight random, so gradients reach the whole network from the second step on.
def _spline_autoregressive(d, h, **kw):
    layer = T.spline_autoregressive(d, hidden_dims=_hidden(h, d), **_spline_kwargs(kw))
    last = layer.arn.layers[-1]
    _zero_(last.weight, last.bias)
    return layer


register_flow(
    "spline_autoregressive",
    _spline_autoregressive,
    invertible=True,
    description="autoregressive neural spline flow (Durkan et al. 2019)",
)


def _spline_coupling(d, h, **kw):
    layer = T.spline_coupling(d, hidden_dims=_hidden(h, d), **_spline_kwargs(kw))
    last = layer.upper_spline.nn.layers[-1]
    _zero_(last.weight, last.bias, *layer.lower_spline.parameters())
    return layer


register_flow(
    "spline_coupling",
    _spline_coupling,
    invertible=True,
    min_dim=2,
    description="coupling neural spline flow (Durkan et al. 2019)",
)
register_flow(
    "affine_coupling",
    lambda d, h, **kw: T.affine_coupling(d, hidden_dims=_hidden(h, d), **kw),
    invertible=True,
    min_dim=2,
    description="Real NVP / NICE coupling (Dinh et al. 2015, 2017)",
)
register_flow(
    "householder",
    lambda d, h, **kw: T.householder(d, **kw),
    invertible=True,
    min_dim=2,
    description="Householder reflections (Tomczak & Welling 2016)",
)
register_flow(
    "planar",
    lambda d, h, **kw: T.planar(d, **kw),
    invertible=False,
    description="planar flow (Rezende & Mohamed 2015), forward-only",
)
register_flow(
    "radial",
    lambda d, h, **kw: T.radial(d, **kw),
    invertible=False,
    description="radial flow (Rezende & Mohamed 2015), forward-only",
)
register_flow(
    "sylvester",
    lambda d, h, **kw: T.sylvester(d, **kw),
    invertible=False,
    description="Householder Sylvester flow (van den Berg et al. 2018), forward-only",
)


def _block_autoregressive(d, h, **kw):
    # Pyro's default (no residual) ends in a linear map of tanh units, so it sends R^D onto a
    # bounded box and the guide could never put mass outside it; y = x + f(x) covers R^D.
    kw.setdefault("residual", "normal")
    return T.block_autoregressive(d, **kw)


register_flow(
    "block_autoregressive",
    _block_autoregressive,
    invertible=False,
    description="BNAF (De Cao et al. 2019) with a residual connection, forward-only",
)
register_flow(
    "neural_autoregressive",
    lambda d, h, **kw: T.neural_autoregressive(d, hidden_dims=_hidden(h, d), **kw),
    invertible=False,
    description="NAF (Huang et al. 2018), forward-only",
)

#: The names registered by this module; replacing one needs ``override=True``.
_BUILTIN_FLOWS = frozenset(FLOWS)

_FORWARD_ONLY_TYPES = (
    T.Planar,
    T.Radial,
    T.Sylvester,
    T.BlockAutoregressive,
    T.NeuralAutoregressive,
    T.Polynomial,
)


def is_forward_only(transform: Transform) -> bool:
    """True when ``transform`` cannot invert a point it did not just produce."""
    if isinstance(transform, T.ComposeTransform):
        return any(is_forward_only(part) for part in transform.parts)
    if isinstance(transform, ForwardOnlyGuard):
        return True
    if isinstance(transform, _FORWARD_ONLY_TYPES):
        return True
    return type(transform)._inverse is Transform._inverse


class BufferPermute(TransformModule):
    """A fixed permutation of the last dimension, stored as a buffer (so it is in ``state_dict``).

    :param torch.Tensor permutation: a permutation of ``range(D)``, shape ``(D,)``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    volume_preserving = True

    def __init__(self, permutation: torch.Tensor):
        super().__init__(cache_size=1)
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        if permutation.dim() != 1 or not torch.equal(
            permutation.sort().values, torch.arange(permutation.numel())
        ):
            raise ValueError("permutation must be a permutation of range(D)")
        self.register_buffer("permutation", permutation)
        self.register_buffer("inv_permutation", torch.argsort(permutation))

    def _call(self, x):
        return x.index_select(-1, self.permutation)

    def _inverse(self, y):
        return y.index_select(-1, self.inv_permutation)

    def log_abs_det_jacobian(self, x, y):
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)


class ForwardOnlyGuard(Transform):
    """Wraps a forward-only transform; inverting a point it did not just produce raises.

    Pyro's forward-only transforms either raise ``NotImplementedError`` deep inside an ELBO, or
    (``NeuralAutoregressive``) silently return the log-det of the *previous* input. This guard
    remembers the last forward pair ``(x, y)`` and refuses any other ``y``.

    :param Transform transform: the forward-only transform.
    :param str name: a name for error messages.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, transform: Transform, name: str = "flow"):
        super().__init__(cache_size=0)
        self.transform = transform
        self.name = name
        self._last = None

    def _call(self, x):
        y = self.transform(x)
        self._last = (x, y)
        return y

    def _inverse(self, y):
        if self._last is not None and self._last[1] is y:
            return self._last[0]
        raise ValueError(
            f"the flow {self.name!r} is forward-only: it can score the points it has just sampled "
            "but cannot invert an arbitrary point, so log q(z) is unavailable here. Use an "
            "invertible flow (e.g. 'spline_autoregressive', 'affine_autoregressive', "
            "'spline_coupling', 'affine_coupling') to evaluate the guide's density at given points."
        )

    def log_abs_det_jacobian(self, x, y):
        # Run the forward map again before asking for the log-det: free when the layers' caches
        # still hold x, and a recomputation when anything else ran the flow since (another
        # sample, ``components()``), whose stored log-dets some layers would otherwise return.
        y = self.transform(x)
        return self.transform.log_abs_det_jacobian(x, y)


def check_flow(flow: object) -> None:
    """Raise unless ``flow`` is ``None``, a callable ``latent_dim -> Transform``, or a name in
    :data:`FLOWS`; before any work, naming the argument.

    :raises TypeError: for anything else than a string, a callable or ``None``.
    :raises ValueError: for a name that is not registered.
    """
    if flow is None or callable(flow):
        return
    if not isinstance(flow, str):
        raise TypeError(
            "flow must be a registered name, a callable latent_dim -> TransformModule or None, "
            f"got {type(flow).__name__}"
        )
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; registered flows are {sorted(FLOWS)}")


def build_flow(
    flow,
    latent_dim: int,
    num_flows: int = 1,
    hidden_dims=None,
    **flow_kwargs,
) -> T.ComposeTransformModule | None:
    """Build a stack of ``num_flows`` layers on ``R^latent_dim``, with buffer permutations between.

    :param flow: a registered name (see :data:`FLOWS`), a callable
        ``latent_dim -> TransformModule`` (called once per layer), or ``None`` for no flow.
    :param int latent_dim: ``D``.
    :param int num_flows: number of layers (``>= 1`` unless ``flow`` is ``None``).
    :param hidden_dims: hidden layer sizes for layers that take them (``None``: Pyro's default).
    :param flow_kwargs: extra keyword arguments for a registered builder (e.g. ``bound``,
        ``count_bins``).
    :return: a :class:`~pyro.distributions.transforms.ComposeTransformModule`, or ``None``.
    """
    if flow is None:
        return None
    latent_dim = check_int("latent_dim", latent_dim, 1)
    num_flows = check_int("num_flows", num_flows, 1)
    if isinstance(flow, str):
        if flow not in FLOWS:
            raise ValueError(f"unknown flow {flow!r}; registered flows are {sorted(FLOWS)}")
        spec = FLOWS[flow]
        if latent_dim < spec.min_dim:
            raise ValueError(
                f"flow {flow!r} needs a latent dimension of at least {spec.min_dim}, but the "
                f"model has {latent_dim}; use e.g. flow='spline_autoregressive' instead"
            )

        def make():
            return spec.builder(latent_dim, hidden_dims, **flow_kwargs)

    elif callable(flow):
        if flow_kwargs or hidden_dims is not None:
            raise ValueError("hidden_dims and flow_kwargs apply only to a registered flow name")

        def make():
            layer = flow(latent_dim)
            if not isinstance(layer, Transform):
                raise TypeError(
                    f"the flow callable must return a torch Transform, got {type(layer).__name__}"
                )
            return layer

    else:
        raise TypeError(
            f"flow must be a registered name, a callable latent_dim -> TransformModule or None, "
            f"got {type(flow).__name__}"
        )
    return T.ComposeTransformModule(stack_layers(make, latent_dim, num_flows))


def stack_layers(make: Callable[[], Transform], latent_dim: int, num_flows: int) -> list:
    """``num_flows`` layers from ``make()``, a :class:`BufferPermute` between consecutive ones,
    and a last permutation that undoes the others.

    The permutations are drawn from torch's global generator and stored as buffers, so a
    ``state_dict`` round trip restores the very same flow. The last one makes the stack the
    identity wherever its layers are (spline layers start so): without it a stack of identity
    layers would still permute the coordinates, and components placed at chosen points of the
    latent space (prior draws, ``init_loc_fn``, k-means centres) would start elsewhere.
    """
    parts: list = []
    total = torch.arange(latent_dim)
    for i in range(num_flows):
        if i > 0 and latent_dim > 1:
            # In 2-D and 3-D a reversal, so coupling layers alternate halves (a random
            # permutation of two coordinates is the identity half the time); random above.
            permutation = (
                torch.arange(latent_dim - 1, -1, -1)
                if latent_dim <= 3
                else torch.randperm(latent_dim)
            )
            total = total[permutation]
            parts.append(BufferPermute(permutation))
        parts.append(make())
    if num_flows > 1 and latent_dim > 1:  # always, so the structure (and state_dict) is fixed
        parts.append(BufferPermute(torch.argsort(total)))
    return parts
