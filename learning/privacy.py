"""DP-SGD as composable optax-style gradient transformations.

The paper's eq. 4 adds noise to every example's gradient; DP-SGD (Abadi et
al. 2016), which this follows, instead

1. clips each example's gradient to L2 norm ``S`` (eq. 3), and sums;
2. adds ONE Gaussian draw of standard deviation ``z * S`` to the sum
   (``z`` is the noise multiplier; eq. 5's sigma is ``z * S``);
3. divides by the (expected) batch size.

Each step is its own transformation, and the private step is their chain::

    tx = optax.chain(
        clip_per_example(S),                  # (B, ...) per-example grads -> clipped sum
        add_gaussian_noise(z, S, key),        # + N(0, (z S)^2)
        normalize_by_batch(expected_batch),   # / B
        optax.sgd(learning_rate),
    )

``clip_per_example`` is the one transformation whose input has a leading
batch axis (per-example gradients, from ``vmap(grad)``); after it the tree
has the parameters' shapes. Rows of zeros (padding or examples left out by
Poisson sampling) clip to zero and add nothing.

On the paper's S = 0.01: the clipped gradients are then tiny and SGD needs a
learning rate scaled by 1/S; what matters is the product ``lr * S``. With
S = 0.01 a rate of 100-400 behaves like S = 1 with a rate of 1-4 (see
:data:`PAPER_CLIP_NORM` and :func:`paper_learning_rate`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedchain.learning.errors import ConfigError

__all__ = [
    "PAPER_CLIP_NORM",
    "NoiseState",
    "add_gaussian_noise",
    "clip_examples",
    "clip_per_example",
    "normalize_by_batch",
    "paper_learning_rate",
    "per_example_norms",
]

PAPER_CLIP_NORM = 0.01


def paper_learning_rate(clip_norm: float = PAPER_CLIP_NORM, lr_times_clip: float = 2.0) -> float:
    """A learning rate that works for clip norm ``clip_norm``: the update
    scale is ``lr * S`` so keep that product fixed (2.0 trains the default
    CNN well under DP; at S = 0.01 this is a rate of 200)."""
    if clip_norm <= 0:
        raise ConfigError(f"clip norm must be positive, got {clip_norm}")
    return lr_times_clip / clip_norm


def per_example_norms(grads) -> jax.Array:
    """L2 norm of each example's gradient over all leaves; leaves have a
    leading batch axis."""
    leaves = jax.tree.leaves(grads)
    squares = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves]
    return jnp.sqrt(sum(squares))


def clip_examples(grads, max_norm: float):
    """Each example's gradient scaled to L2 norm at most ``max_norm``
    (eq. 3: ``g / max(1, |g| / S)``), and the norms before clipping."""
    norms = per_example_norms(grads)
    factor = max_norm / jnp.maximum(norms, max_norm)
    clipped = jax.tree.map(
        lambda g: g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads
    )
    return clipped, norms


def clip_per_example(max_norm: float) -> optax.GradientTransformation:
    """Per-example gradients (leading batch axis) in, sum of the clipped
    gradients out."""
    if not max_norm > 0:
        raise ConfigError(f"clip norm must be positive, got {max_norm}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        clipped, _ = clip_examples(updates, max_norm)
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped), state

    return optax.GradientTransformation(init, update)


class NoiseState(NamedTuple):
    """The PRNG key of :func:`add_gaussian_noise`, split on every step."""

    key: jax.Array


def add_gaussian_noise(
    noise_multiplier: float | jax.Array, max_norm: float, key: jax.Array
) -> optax.GradientTransformation:
    """Add one draw of N(0, (noise_multiplier * max_norm)^2) to every
    coordinate. ``noise_multiplier`` may be a traced array (one per device
    under ``vmap``); 0 adds nothing."""
    if isinstance(noise_multiplier, int | float) and noise_multiplier < 0:
        raise ConfigError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not max_norm > 0:
        raise ConfigError(f"clip norm must be positive, got {max_norm}")

    def init(params):
        del params
        return NoiseState(key)

    def update(updates, state, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        next_key, key_now = jax.random.split(state.key)
        std = jnp.asarray(noise_multiplier, flat.dtype) * max_norm
        noisy = flat + std * jax.random.normal(key_now, flat.shape, flat.dtype)
        return unravel(noisy), NoiseState(next_key)

    return optax.GradientTransformation(init, update)


def normalize_by_batch(batch_size: float | jax.Array) -> optax.GradientTransformation:
    """Divide by the batch size. With Poisson sampling pass the EXPECTED
    batch size (q * n), not the drawn one: dividing by the drawn size would
    leak it."""
    if isinstance(batch_size, int | float) and batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    return optax.scale(1.0 / jnp.asarray(batch_size, jnp.float32))
