r"""RAD: a Real-and-Discrete flow (Dinh, Sohl-Dickstein, Pascanu & Larochelle, 2019).

A RAD layer is a *coupling layer whose coupling function is only piecewise invertible*. The input
:math:`x \in \mathbb{R}^D` is split into a conditioner half :math:`x_a` (passed through) and a
transformed half :math:`x_b`. Every coordinate :math:`x_{b,i}` goes through a function
:math:`g_i = g(\cdot\,; \theta_i(x_a))` that cuts the real line into :math:`K` pieces
:math:`I_1 < \dots < I_K` and maps each piece bijectively and increasingly onto its image
:math:`g(I_k)`; the images overlap, so several inputs map to one output. Going from data to
latent, a point gives a *real* latent :math:`z_{b,i} = g_i(x_{b,i})` and a *discrete* one, the
piece :math:`k_i` it fell in. A gating network gives
:math:`p(k \mid z_b, x_a) = \prod_i p(k_i \mid z_b, x_a)`, a softmax over the pieces whose image
contains :math:`z_{b,i}` (the other logits are masked to :math:`-\infty`). Then, exactly,

.. math::
    \log p(x) = \log p(z) + \log p(k(x) \mid z_b, x_a)
        + \sum_i \log \left| \frac{\partial g_i}{\partial x_{b,i}}\right|_{x_{b,i}},

since :math:`x \mapsto (z, k)` is a bijection onto :math:`\{(z, k) : z_{b,i} \in g(I_{k_i})\}`,
whose density is :math:`p(z)\,p(k \mid z)` — it integrates to one because the gate normalises
over exactly the pieces that can produce :math:`z`. Sampling is exact: draw :math:`z`, draw
:math:`k` from the gate, and invert piece :math:`k`.

**What is built here** (the paper has no public code; this is derived from its text):

* The coupling function is a *continuous* piecewise-linear zig-zag, the paper's construction of a
  locally invertible function from pieces joined by reflections. Per coordinate the conditioner
  outputs a core interval :math:`[L, U]` (its centre and log-height), boundaries
  :math:`B_1 < \dots < B_{K-1}` (the first and the log-widths of the :math:`K - 2` interior
  pieces), and end slopes :math:`a_1, a_K > 0`. Piece 1, :math:`(-\infty, B_1)`, rises to
  :math:`(-\infty, U]` (:math:`z = U + a_1 (x - B_1)`); the interior pieces alternately fall
  from :math:`U` to :math:`L` and rise from :math:`L` to :math:`U` (each is the reflection of its
  neighbour, so neighbouring pieces meet at the boundaries and the map is continuous); piece
  :math:`K`, :math:`[B_{K-1}, \infty)`, rises from :math:`L` to :math:`\infty`. The end pieces
  run to :math:`-\infty` and :math:`+\infty` only when :math:`K` is odd, so :math:`K \in \{3, 5,
  \dots\}`. Every :math:`z` in the core has :math:`K` pre-images, every :math:`z` outside one;
  the images cover the line, so no mass is lost.
* The gate is one MLP on :math:`(x_a, z_b)` — conditioned like a coupling layer, on the
  conditioner half and the real latent — with :math:`K` logits per transformed coordinate,
  masked to the pieces whose image contains :math:`z_b`, its softmax mixed with a uniform over
  them (weight :data:`GATE_FLOOR`, so held-out points never get a vanishing gate probability);
  the end slopes are kept in :math:`[e^{-2}, e^{2}]` (:data:`MAX_LOG_SLOPE`): a steep end
  piece sent an ordinary held-out point to :math:`|z| \approx 80` (wine, seed 4; held-out
  log-likelihood -119 with :math:`e^{3}`).
* Initialisation: every network's last layer starts at zero, so the initial map is the same for
  every :math:`x_a`: boundaries evenly on :math:`[-s, s]` (``span`` :math:`s = 0.1` in
  standardised units), all slopes :math:`\pm 1`, a uniform gate. The fold is then a small
  wiggle, and the layer's density is within 0.12 nat (KL) of a standard normal per
  transformed coordinate — so a RAD flow starts where a Real NVP flow starts (a standard
  normal), and training grows the fold where the data have discrete structure. (A fold spanning
  the data, ``span = 2`` on 1-D, starts about 0.7 nat per coordinate away and trains far more
  slowly.)
* :func:`build_rad_layers` stacks RAD layers with fixed permutations (buffers) between them so
  both halves are transformed, on a standard normal base; ``affine_between=True`` adds a Real NVP
  affine coupling (Pyro's ``affine_coupling``) before each RAD layer. Each RAD layer already
  carries a conditioned scale (its slopes) and shift (its core centre), so it generalises an
  affine coupling; the extra affine layers cost time and, at matched parameters and budget,
  made the fits worse, so they are off by default.
* :class:`~pyro_mogflow.density.builders.RADDensity` trains the RAD layers at twice the common
  learning rate (its ``param_groups``).

**Departures from the paper** (as far as its text describes): its network architectures
(convolutional for images) and multi-scale structure are not reproduced; the core interval is
shared by all interior pieces of a coordinate (the paper's pieces need not share an image); the
gate floor and the bounded end slopes are additions for held-out stability; the density of
:math:`x` is continuous in :math:`x` only where the gate's mask does not change (the gate
probability jumps where :math:`z_b` leaves the core, as it must when the number of pre-images
changes); in 1-D the conditioner is empty, so the layer's parameters are free parameters.

Reference: L. Dinh, J. Sohl-Dickstein, R. Pascanu, H. Larochelle, *A RAD approach to deep mixture
models*, ICLR 2019 workshop (DeepGenStruct), arXiv:1903.07714.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions.transforms as T
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn
from torch.distributions import Transform
from torch.distributions.utils import _sum_rightmost

from .._validation import check_int, check_real
from ..flows import BufferPermute

__all__ = ["GATE_FLOOR", "MAX_LOG_SLOPE", "RADCoupling", "RADFlow", "build_rad_layers"]

#: Share of the gate given to the uniform distribution over the valid pieces.
GATE_FLOOR = 1e-3

#: Bound on the log-slopes of the end pieces (conditioned slopes lie in [e^-b, e^b]).
MAX_LOG_SLOPE = 2.0


def _inv_softplus(c: float) -> float:
    return math.log(math.expm1(c))


class _MLP(nn.Module):
    """``in -> hidden... -> out`` with ReLU; the last layer starts at zero. ``in = 0`` is a
    free bias (an unconditional parameter vector)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        if in_dim == 0:
            self.bias = nn.Parameter(torch.zeros(out_dim))
            self.net = None
            return
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        last = nn.Linear(d, out_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            return self.bias.to(x).expand(x.shape[:-1] + self.bias.shape)
        return self.net(x)


class RADCoupling(nn.Module):
    r"""One Real-and-Discrete coupling layer (see the module docstring for the math).

    The first ``split_dim`` coordinates condition the piecewise-linear map of the others.

    Usage::

        layer = RADCoupling(2, num_pieces=3)
        z, k, log_det, log_gate = layer.encode(x)     # data -> (real, discrete) latents
        x_back = layer.decode(z, k)                   # exact inverse of piece k
        k_draw = layer.sample_pieces(z)               # k ~ p(k | z, x_a)

    :param int dim: ``D``.
    :param int num_pieces: ``K``, odd and ``>= 3``: pieces of each coordinate's map (default 3).
    :param hidden_dims: hidden sizes of the conditioner and the gate MLPs (default ``(32, 32)``).
    :param int split_dim: coordinates in the conditioner half (default ``D // 2``).
    :param float span: the initial boundaries lie evenly on ``[-span, span]`` (default 0.1:
        a small fold, so the layer starts close to the identity in density).
    :param float gate_bias: initial gate logit added to the middle piece (default 0: uniform).
    """

    def __init__(
        self,
        dim: int,
        num_pieces: int = 3,
        hidden_dims: Sequence[int] = (32, 32),
        split_dim: int | None = None,
        span: float = 0.1,
        gate_bias: float = 0.0,
    ):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.num_pieces = check_int("num_pieces", num_pieces, 3)
        if self.num_pieces % 2 == 0:
            raise ValueError(
                f"num_pieces must be odd (a continuous zig-zag whose end pieces run to -inf and "
                f"+inf has an odd number of monotone pieces), got {num_pieces}"
            )
        split = dim // 2 if split_dim is None else check_int("split_dim", split_dim, 0)
        if split >= dim:
            raise ValueError(f"split_dim must be < dim={dim}, got {split}")
        self.split_dim = split
        self.out_dim = dim - split
        k = self.num_pieces
        # per coordinate: centre c of the core, log(U - L), B_1, log widths of the K - 2 interior
        # pieces, log a_1, log a_K
        self.conditioner = _MLP(split, hidden_dims, self.out_dim * (k + 3))
        self.gate = _MLP(dim, hidden_dims, self.out_dim * k)
        # initial map: boundaries evenly on [-span, span], every piece of slope +-1 (so the core
        # is as high as an interior piece is wide), the core centred on 0
        span = check_real("span", span, minimum=0.0, strict=True)
        gate_bias = check_real("gate_bias", gate_bias)
        width = 2.0 * span / (k - 2)
        init = torch.zeros(k + 3)
        init[1] = _inv_softplus(width)
        init[2] = -span
        init[3 : k + 1] = _inv_softplus(width)
        self.register_buffer("_init", init)
        gate_init = torch.zeros(k)
        gate_init[k // 2] = gate_bias
        self.register_buffer("_gate_init", gate_init)
        sign = torch.ones(k)
        sign[1:-1:2] = -1.0  # interior pieces alternate: decreasing, increasing, ..., decreasing
        self.register_buffer("_sign", sign)
        # piece j starts (at its left anchor) on U when it decreases or is piece 0, else on L
        self.register_buffer("_starts_up", (sign < 0) | (torch.arange(k) == 0))

    # ------------------------------------------------------------------ pieces
    def _pieces(self, x_a: torch.Tensor):
        """Anchors, offsets, signed slopes, log|slopes| ``(..., out, K)``; core ``L, U``."""
        k = self.num_pieces
        raw = self.conditioner(x_a).unflatten(-1, (self.out_dim, k + 3)) + self._init.to(x_a)
        height = torch.nn.functional.softplus(raw[..., 1]) + 1e-3
        low = raw[..., 0] - 0.5 * height
        up = low + height
        first = raw[..., 2]
        widths = torch.nn.functional.softplus(raw[..., 3 : k + 1]) + 1e-3  # (..., out, K-2)
        bounds = torch.cat([first.unsqueeze(-1), first.unsqueeze(-1) + widths.cumsum(-1)], -1)
        # end slopes in [e^-2, e^2]: a steep end piece would give the tails a vanishing density
        log_a1 = (MAX_LOG_SLOPE * torch.tanh(raw[..., k + 1] / MAX_LOG_SLOPE)).unsqueeze(-1)
        log_ak = (MAX_LOG_SLOPE * torch.tanh(raw[..., k + 2] / MAX_LOG_SLOPE)).unsqueeze(-1)
        log_mid = torch.log(height).unsqueeze(-1) - torch.log(widths)
        log_slopes = torch.cat([log_a1, log_mid, log_ak], -1)  # (..., out, K)
        slopes = self._sign.to(x_a) * log_slopes.exp()
        anchors = torch.cat([bounds[..., :1], bounds], -1)  # (..., out, K)
        offsets = torch.where(self._starts_up, up.unsqueeze(-1), low.unsqueeze(-1))
        return bounds, anchors, offsets, slopes, log_slopes, low, up

    def _gate_logits(self, x_a: torch.Tensor, z_b: torch.Tensor, low, up, own=None) -> torch.Tensor:
        """Masked gate logits ``(..., out, K)``: ``-inf`` where piece k cannot produce ``z_b``."""
        k = self.num_pieces
        logits = self.gate(torch.cat([x_a, z_b], -1)).unflatten(-1, (self.out_dim, k))
        logits = logits + self._gate_init.to(logits)
        below = (z_b < low).unsqueeze(-1)
        above = (z_b > up).unsqueeze(-1)  # the core [L, U] is closed: U is reached by piece 2
        idx = torch.arange(k, device=z_b.device)
        invalid = (below & (idx != 0)) | (above & (idx != k - 1))
        if own is not None:
            # the piece that produced z_b is valid even where rounding puts z_b a hair outside
            # its image (at the turning points), so an encoded point never scores -inf
            invalid = invalid & (idx != own.unsqueeze(-1))
        return logits.masked_fill(invalid, -math.inf)

    def _gate_log_probs(self, x_a, z_b, low, up, own=None) -> torch.Tensor:
        """``log p(k | z_b, x_a)``: the masked softmax mixed with ``GATE_FLOOR`` of the uniform
        over the valid pieces (still normalised; no valid piece gets a vanishing probability)."""
        logits = self._gate_logits(x_a, z_b, low, up, own)
        valid = torch.isfinite(logits)
        n_valid = valid.sum(-1, keepdim=True).to(logits.dtype)
        floor = math.log(GATE_FLOOR) - n_valid.log()
        mixed = torch.logaddexp(math.log1p(-GATE_FLOOR) + torch.log_softmax(logits, -1), floor)
        return mixed.masked_fill(~valid, -math.inf)

    # ------------------------------------------------------------------ maps
    def encode(self, x: torch.Tensor):
        r"""Data to latents: ``(z, k, log|dz/dx|, log p(k | z, x_a))``.

        :param torch.Tensor x: shape ``(..., D)``.
        :return: ``z`` ``(..., D)``; ``k`` ``(..., D - split_dim)`` (long); the log-Jacobian and
            the gate log-probability, each ``(...)``.
        """
        x_a, x_b = x[..., : self.split_dim], x[..., self.split_dim :]
        bounds, anchors, offsets, slopes, log_slopes, low, up = self._pieces(x_a)
        k = (x_b.unsqueeze(-1) >= bounds).sum(-1)  # (..., out) in [0, K-1]
        ki = k.unsqueeze(-1)
        log_a = log_slopes.gather(-1, ki).squeeze(-1)
        z_b = offsets.gather(-1, ki).squeeze(-1) + slopes.gather(-1, ki).squeeze(-1) * (
            x_b - anchors.gather(-1, ki).squeeze(-1)
        )
        log_gate = self._gate_log_probs(x_a, z_b, low, up, k).gather(-1, ki).squeeze(-1)
        z = torch.cat([x_a, z_b], -1)
        return z, k, log_a.sum(-1), log_gate.sum(-1)

    def gate_probs(self, z: torch.Tensor) -> torch.Tensor:
        """``p(k | z_b, x_a)`` for every piece, shape ``(..., D - split_dim, K)``."""
        x_a, z_b = z[..., : self.split_dim], z[..., self.split_dim :]
        *_, low, up = self._pieces(x_a)
        return self._gate_log_probs(x_a, z_b, low, up).exp()

    def sample_pieces(self, z: torch.Tensor) -> torch.Tensor:
        """Draw ``k ~ p(k | z_b, x_a)``, shape ``(..., D - split_dim)`` (long)."""
        probs = self.gate_probs(z)
        return torch.distributions.Categorical(probs=probs).sample()

    def decode(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The inverse of piece ``k`` at ``z`` (``z_b`` must lie in piece ``k``'s image).

        :param torch.Tensor z: shape ``(..., D)``.
        :param torch.Tensor k: shape ``(..., D - split_dim)``, long.
        :return: ``x``, shape ``(..., D)``.
        """
        x_a, z_b = z[..., : self.split_dim], z[..., self.split_dim :]
        _, anchors, offsets, slopes, _, _, _ = self._pieces(x_a)
        ki = k.unsqueeze(-1)
        x_b = anchors.gather(-1, ki).squeeze(-1) + (
            z_b - offsets.gather(-1, ki).squeeze(-1)
        ) / slopes.gather(-1, ki).squeeze(-1)
        return torch.cat([x_a, x_b], -1)


def build_rad_layers(
    dim: int,
    num_layers: int = 2,
    num_pieces: int = 3,
    hidden_dims: Sequence[int] = (32, 32),
    affine_between: bool = False,
) -> nn.ModuleList:
    """A RAD stack, from the base side to the data side (the order :class:`RADFlow` takes).

    ``num_layers`` RAD layers; between consecutive ones (and before the first, when ``dim > 1``
    and ``affine_between``), a Real NVP affine coupling (Pyro's ``affine_coupling``); and a
    permutation (a buffer) before each layer so both halves get transformed. In 2-D and 3-D the
    permutation is a reversal, so consecutive layers always alternate halves.

    :param int dim: ``D``.
    :param int num_layers: RAD layers, ``>= 1``.
    :param int num_pieces: pieces per coordinate of each RAD layer, odd, ``>= 3``.
    :param hidden_dims: hidden sizes of every network.
    :param bool affine_between: add a Real NVP affine coupling before each RAD layer (default
        ``False``: RAD layers and permutations).
    :return: an :class:`~torch.nn.ModuleList` of :class:`RADCoupling` and torch transforms.
    """
    check_int("dim", dim, 1)
    check_int("num_layers", num_layers, 1)
    check_int("num_pieces", num_pieces, 3)
    hidden = list(hidden_dims)
    parts: list = []

    def permute():
        if dim > 1:
            perm = torch.arange(dim - 1, -1, -1) if dim <= 3 else torch.randperm(dim)
            parts.append(BufferPermute(perm))

    for i in range(num_layers):
        if dim > 1 and affine_between:
            if i > 0:
                permute()
            parts.append(T.affine_coupling(dim, hidden_dims=hidden))
        permute()
        parts.append(RADCoupling(dim, num_pieces, hidden))
    return nn.ModuleList(parts)


class RADFlow(TorchDistribution):
    r"""The distribution of a RAD stack on a standard normal base (see the module docstring).

    ``layers`` run from the base to the data side: :class:`RADCoupling` layers (piecewise, with a
    discrete latent each) and ordinary torch transforms (bijections). Going from data to base,

    .. math::
        \log p(x) = \log \mathcal{N}(z_L; 0, I) + \sum_{\ell} \Big[\log\left|\det
        \tfrac{\partial z_{\ell}}{\partial z_{\ell - 1}}\right|
        + \mathbb{1}[\ell\ \text{is RAD}]\, \log p(k_\ell \mid z_\ell)\Big],

    with :math:`z_0 = x`. :meth:`sample` is exact (ancestral: base, then each layer backwards,
    drawing each RAD layer's pieces from its gate). There is no ``rsample``: the discrete draw has
    no reparameterization; under maximum likelihood none is needed.

    :param layers: the stack, base side first (e.g. :func:`build_rad_layers`).
    :param transforms: extra bijections applied last on the data side (e.g. the affine map that
        undoes standardisation).
    :param int dim: ``D``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        layers: Sequence[nn.Module | Transform],
        dim: int,
        transforms: Sequence[Transform] = (),
        validate_args: bool | None = None,
    ):
        self.layers = list(layers) + list(transforms)
        for layer in self.layers:
            if not isinstance(layer, (RADCoupling, Transform)):
                raise TypeError(
                    f"layers must be RADCoupling or torch Transforms, got {type(layer).__name__}"
                )
        self.dim = check_int("dim", dim, 1)
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=validate_args)

    def _reference(self) -> torch.Tensor:
        for layer in self.layers:
            for p in getattr(layer, "parameters", lambda: [])():
                return p
            for b in getattr(layer, "buffers", lambda: [])():
                if b.is_floating_point():
                    return b
        return torch.zeros(())

    def encode(self, value: torch.Tensor):
        """Data to base: ``(z, log p(x) - log N(z), [k of each RAD layer])``."""
        y = value
        extra = torch.zeros(value.shape[:-1], dtype=value.dtype, device=value.device)
        pieces = []
        for layer in reversed(self.layers):
            if isinstance(layer, RADCoupling):
                y, k, log_det, log_gate = layer.encode(y)
                extra = extra + log_det + log_gate
                pieces.append(k)
            else:
                x = layer.inv(y)
                ladj = layer.log_abs_det_jacobian(x, y)
                extra = extra - _sum_rightmost(ladj, 1 - layer.domain.event_dim)
                y = x
        return y, extra, pieces[::-1]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log-density, shape ``value.shape[:-1]``; ``value`` ``(..., D)``."""
        if self._validate_args:
            self._validate_sample(value)
        z, extra, _ = self.encode(value)
        base = -0.5 * (z**2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return base + extra

    def sample_with_pieces(self, sample_shape=torch.Size()):
        """Exact draws ``(*sample_shape, D)`` and each RAD layer's pieces (base side first)."""
        ref = self._reference()
        with torch.no_grad():
            x = torch.randn(
                torch.Size(sample_shape) + (self.dim,), dtype=ref.dtype, device=ref.device
            )
            pieces = []
            for layer in self.layers:
                if isinstance(layer, RADCoupling):
                    k = layer.sample_pieces(x)
                    x = layer.decode(x, k)
                    pieces.append(k)
                else:
                    x = layer(x)
        return x, pieces

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Exact draws, shape ``(*sample_shape, D)``."""
        return self.sample_with_pieces(sample_shape)[0]
