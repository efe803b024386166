"""A tiered CNN family for 28x28 grey images, in pure JAX.

Tier 0 is the paper's model: two 3x3 convolutions, each followed by a 2x2
max-pool, then dropout and two fully connected layers. Tier ``t`` inserts
``t`` residual 3x3 conv blocks at the 7x7 resolution, each
``h + residual_scale * conv(act(h))`` with its kernel and bias initialized to
zero. So:

* every tensor of a shallower tier exists, with the same name, shape and
  meaning, in every deeper tier, and aggregation can average each tensor over
  the devices that hold it;
* a freshly added block is the identity, so a deep model built from a
  shallow global model computes the same function until it trains;
* the branch is scaled down (``residual_scale``, default 0.2, a constant of
  the family, not of the tier, so ``block1`` means the same in every tier).
  Nothing normalizes the residual stream, and a zero-initialized branch gets
  gradients as large as a full layer's: at full scale the loss curvature along
  the block kernels alone (about 89 at init for relu 16/32/64) is past
  momentum SGD's stability limit ``2 (1 + m) / lr`` (76 at lr 0.05, m 0.9),
  the blocks' kernels run away (norm 0 -> 100 within 15 steps, block 2
  feeding on block 1), the logits blow up and the relus die or overflow to
  NaN. Scaling the branch by ``s`` scales that curvature by ``s**2`` (3.6 at
  0.2) and leaves the identity at init untouched; the residual scaling of
  Inception-ResNet (Szegedy et al. 2016: 0.1-0.3 against residual nets that
  "died" early in training).

Convolutions are written as patch matrices times kernels (im2col) rather than
``lax.conv``: per-example gradients (``vmap`` of ``grad``) then lower to
batched matrix products, which is what makes DP-SGD cheap on a CPU, and
vmapping over devices (one set of weights each) stays a batched matmul
instead of a grouped convolution. Widths were chosen by measured cost and
accuracy (see ``fedchain bench learning`` and the module docs of
:mod:`fedchain.learning.local`).

Parameters are a flat ``dict[str, Array]`` with names like ``"conv1/w"``: a
pytree that optax and ``vmap`` accept as it is, and whose names are the
aggregation and serialization keys.

Beside the CNNs, :class:`LinearSpec` is a linear classifier on fixed
features (the scattering features of :mod:`fedchain.learning.scattering`):
the model that learns best under per-device DP (``learning/README.md``).
Every function here takes either spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fedchain.learning.errors import ConfigError

__all__ = [
    "DEVICE_CLASSES",
    "CnnSpec",
    "DevicePerformance",
    "LinearSpec",
    "ModelSpec",
    "apply",
    "choose_tier",
    "dropout_masks",
    "init_params",
    "param_shapes",
    "tier_spec",
]

Params = dict[str, jax.Array]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class CnnSpec:
    """Architecture of one tier. Hashable, so it can be a static jit argument.

    ``blocks`` is the tier (the number of residual blocks). ``activation`` is
    ``"tanh"`` (bounded activations keep clipped DP gradients informative,
    Papernot et al. 2021) or ``"relu"``. ``residual_scale`` multiplies every
    block's branch (see the module docs: at 1.0 the blocks diverge under
    ordinary momentum SGD).
    """

    conv1: int = 16
    conv2: int = 32
    hidden: int = 64
    blocks: int = 0
    classes: int = 10
    dropout: float = 0.25
    activation: str = "tanh"
    residual_scale: float = 0.2

    def __post_init__(self):
        if min(self.conv1, self.conv2, self.hidden, self.classes) < 1 or self.blocks < 0:
            raise ConfigError(f"invalid CNN widths or depth: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}")
        if not 0.0 < self.residual_scale <= 1.0:
            raise ConfigError(f"residual_scale must be in (0, 1], got {self.residual_scale}")

    @property
    def tier(self) -> int:
        return self.blocks


@dataclass(frozen=True)
class LinearSpec:
    """A linear classifier on fixed per-example features (C, H, W), each
    example's features normalized per group of channels first.

    Why the normalization: scattering channels differ in scale by orders of
    magnitude (order 0 against order 2), and one clip norm for the whole
    gradient would let the largest drown the rest. Per-example group
    normalization (Tramer and Boneh's choice for ScatterNet under DP) needs
    no statistics of the data, so it spends no privacy. One tier: every
    device trains the whole model (``tier_spec`` returns it unchanged).
    """

    channels: int = 81
    size: int = 7
    groups: int = 27
    classes: int = 10

    def __post_init__(self):
        if min(self.channels, self.size, self.groups, self.classes) < 1:
            raise ConfigError(f"invalid linear model sizes: {self}")
        if self.channels % self.groups:
            raise ConfigError(f"{self.groups} groups do not divide {self.channels} channels")

    @property
    def tier(self) -> int:
        return 0

    @property
    def features(self) -> int:
        return self.channels * self.size * self.size


ModelSpec = CnnSpec | LinearSpec


def tier_spec(tier: int, base: ModelSpec | None = None) -> ModelSpec:
    """The spec of ``tier`` with the widths of ``base`` (default widths); a
    :class:`LinearSpec` has one tier and is its own spec at every tier."""
    if isinstance(base, LinearSpec):
        return base
    base = base or CnnSpec()
    return CnnSpec(
        conv1=base.conv1,
        conv2=base.conv2,
        hidden=base.hidden,
        blocks=tier,
        classes=base.classes,
        dropout=base.dropout,
        activation=base.activation,
        residual_scale=base.residual_scale,
    )


@dataclass(frozen=True)
class DevicePerformance:
    """A device's performance record, as stored on chain by its identifier.

    ``gflops`` is sustained compute, ``memory_mb`` the memory it can give to
    training. The paper only says phones are weaker than computers; these
    two numbers are what the tier choice reads.
    """

    gflops: float
    memory_mb: float


# Typical records for the paper's two device classes.
DEVICE_CLASSES: Mapping[str, DevicePerformance] = {
    "phone": DevicePerformance(gflops=5.0, memory_mb=512.0),
    "computer": DevicePerformance(gflops=50.0, memory_mb=4096.0),
}


def choose_tier(
    performance: DevicePerformance,
    *,
    gflops_per_tier: float = 20.0,
    memory_mb_per_tier: float = 1024.0,
    max_tier: int = 2,
) -> int:
    """The deepest tier the device can afford: one block per
    ``gflops_per_tier`` of compute and ``memory_mb_per_tier`` of memory,
    whichever is scarcer, capped at ``max_tier``. A phone gets tier 0 (the
    paper's model), a computer tier 2 with the defaults."""
    if performance.gflops <= 0 or performance.memory_mb <= 0:
        raise ConfigError(f"performance must be positive, got {performance}")
    by_compute = int(performance.gflops // gflops_per_tier)
    by_memory = int(performance.memory_mb // memory_mb_per_tier)
    return max(0, min(by_compute, by_memory, max_tier))


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of ``spec``, in canonical order."""
    if isinstance(spec, LinearSpec):
        return {"linear/w": (spec.features, spec.classes), "linear/b": (spec.classes,)}
    shapes: dict[str, tuple[int, ...]] = {
        "conv1/w": (9 * 1, spec.conv1),
        "conv1/b": (spec.conv1,),
        "conv2/w": (9 * spec.conv1, spec.conv2),
        "conv2/b": (spec.conv2,),
    }
    for i in range(spec.blocks):
        shapes[f"block{i + 1}/w"] = (9 * spec.conv2, spec.conv2)
        shapes[f"block{i + 1}/b"] = (spec.conv2,)
    shapes["fc1/w"] = (7 * 7 * spec.conv2, spec.hidden)
    shapes["fc1/b"] = (spec.hidden,)
    shapes["fc2/w"] = (spec.hidden, spec.classes)
    shapes["fc2/b"] = (spec.classes,)
    return shapes


def init_params(key: jax.Array, spec: ModelSpec) -> Params:
    """Fresh parameters: LeCun-normal kernels, zero biases, zero residual
    kernels (so each block starts as the identity); a linear model starts
    at zero (its loss is convex, so no symmetry needs breaking)."""
    shapes = param_shapes(spec)
    if isinstance(spec, LinearSpec):
        return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}
    keys = jax.random.split(key, len(shapes))
    params: Params = {}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True):
        if name.endswith("/b") or name.startswith("block"):
            params[name] = jnp.zeros(shape, jnp.float32)
        else:
            fan_in = shape[0]
            params[name] = jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)
    return params


def dropout_masks(key: jax.Array, spec: ModelSpec, batch: int) -> jax.Array:
    """Inverted-dropout multipliers for a batch, (batch, hidden): 0 or
    1 / (1 - rate). One draw for the whole batch keeps compiled code small.
    A linear model has no dropout: (batch, 1) ones, which it ignores."""
    if isinstance(spec, LinearSpec):
        return jnp.ones((batch, 1), jnp.float32)
    if spec.dropout == 0.0:
        return jnp.ones((batch, spec.hidden), jnp.float32)
    keep = jax.random.bernoulli(key, 1.0 - spec.dropout, (batch, spec.hidden))
    return keep.astype(jnp.float32) / (1.0 - spec.dropout)


def _patches(x: jax.Array) -> jax.Array:
    """3x3 'same' patches of an (H, W, C) image as (H * W, 9 * C)."""
    h, w, c = x.shape
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    views = [padded[i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    return jnp.concatenate(views, axis=-1).reshape(h * w, 9 * c)


def _conv(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    h, wd, _ = x.shape
    return (_patches(x) @ w + b).reshape(h, wd, w.shape[1])


def _pool(x: jax.Array) -> jax.Array:
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def apply(
    params: Mapping[str, jax.Array],
    image: jax.Array,
    spec: ModelSpec,
    *,
    dropout_mask: jax.Array | None = None,
) -> jax.Array:
    """Logits of ONE image (28, 28) or (28, 28, 1), uint8 or float (for a
    :class:`LinearSpec`: one example's features (C, H, W)).

    Written per example on purpose: batching is ``vmap``, so per-example
    gradients are ``vmap(grad(...))`` and need no other code. Dropout is
    active only when ``dropout_mask`` (this example's row of
    :func:`dropout_masks`) is given.
    """
    if isinstance(spec, LinearSpec):
        return _apply_linear(params, image, spec)
    act = _ACTIVATIONS[spec.activation]
    x = image.astype(jnp.float32).reshape(28, 28, 1)
    if image.dtype == jnp.uint8:
        x = x / 255.0
    x = (x - MNIST_MEAN) / MNIST_STD
    h = _pool(act(_conv(x, params["conv1/w"], params["conv1/b"])))
    h = _pool(act(_conv(h, params["conv2/w"], params["conv2/b"])))
    for i in range(spec.blocks):
        # pre-activation residual: identity at zero init, and its kernel still
        # gets a gradient there whatever the activation (relu'(0) = 0 would
        # freeze a post-activation block forever); scaled, see the module docs
        branch = _conv(act(h), params[f"block{i + 1}/w"], params[f"block{i + 1}/b"])
        h = h + spec.residual_scale * branch
    h = h.reshape(-1)
    h = act(h @ params["fc1/w"] + params["fc1/b"])
    if dropout_mask is not None:
        h = h * dropout_mask
    return h @ params["fc2/w"] + params["fc2/b"]


def _apply_linear(params: Mapping[str, jax.Array], features: jax.Array, spec: LinearSpec):
    x = features.astype(jnp.float32).reshape(spec.groups, -1)
    mean = jnp.mean(x, axis=1, keepdims=True)
    var = jnp.var(x, axis=1, keepdims=True)
    x = ((x - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(-1)
    return x @ params["linear/w"] + params["linear/b"]
