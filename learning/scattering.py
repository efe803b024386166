"""Scattering features of 28x28 images: fixed wavelets, no learned weights.

Why: under per-device DP on 1,500 examples, the noise that makes each
device's update private is sqrt(40) times the noise of the mean update,
and a CNN learned end to end from such gradients plateaued near 93% on
MNIST at eps = 3 (``learning/README.md``). Tramer and Boneh (ICLR 2021,
"Differentially private learning needs better features") showed that a
linear model on a ScatterNet (Mallat's scattering transform, Bruna and
Mallat 2013) beats end-to-end CNNs under DP: the features are fixed, so
no privacy is spent on them, and the model left to learn privately is
small and convex. A central proxy of our per-device setting put it at
97.1-97.7% where the CNN proxy gave 94.4%, and 40 devices trained it to
97.73% at eps 3 (``learning/README.md``, "Scattering features").

The transform, as in Kymatio (Andreux et al. 2020) with J = 2 scales and
L = 8 orientations: with Morlet wavelets psi_{j,theta} and a Gaussian
low-pass phi of width 2^J,

* order 0: ``x * phi``;
* order 1: ``|x * psi_{j1,t1}| * phi`` for 2 x 8 (j1, t1);
* order 2: ``||x * psi_{0,t1}| * psi_{1,t2}| * phi`` for 8 x 8 (t1, t2);

81 channels, each sampled every 2^J = 4 pixels: (81, 7, 7) per image.
Moduli make the features stable to small deformations, and the low-pass
makes them locally translation invariant. Filters follow Kymatio's design
(its filter parameters and channel order), and the convolutions are
periodic FFT products on the image reflect-padded to 32 x 32. Unlike
Kymatio, nothing is subsampled between orders (these images are small
enough to keep full resolution), so the values differ slightly from its
output; the features are deterministic, data-independent and computed per
image, so they cost no privacy and mean the same on every device.

Kymatio itself is not a dependency: its 0.3 release fails to import with
current SciPy (``scipy.special.sph_harm`` is gone), and the 2D transform
needed here is a few FFTs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedchain.learning.errors import ConfigError

__all__ = [
    "CHANNELS",
    "ORIENTATIONS",
    "SCALES",
    "filter_bank",
    "scatter_images",
    "scattering",
]

SCALES = 2
"""J: the low-pass has width 2^J and the features are sampled every 2^J pixels."""
ORIENTATIONS = 8
"""L: wavelet orientations over a half turn."""
CHANNELS = 1 + SCALES * ORIENTATIONS + ORIENTATIONS**2
"""81: one order-0, 16 order-1 and 64 order-2 channels."""

_SIZE = 28
_PAD = 2
_GRID = _SIZE + 2 * _PAD  # 32: a power of two for the FFTs
_STEP = 2**SCALES
_OUT = _SIZE // _STEP  # 7
_MNIST_MEAN = 0.1307
_MNIST_STD = 0.3081


def _gabor(sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """A Gabor filter on the periodic ``_GRID`` x ``_GRID`` grid, centred at
    the origin and summed over neighbouring periods (Kymatio's ``gabor_2d``)."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    curv = rot @ np.diag([1.0, slant**2]) @ rot.T / (2 * sigma**2)
    out = np.zeros((_GRID, _GRID), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.mgrid[ex * _GRID : (ex + 1) * _GRID, ey * _GRID : (ey + 1) * _GRID]
            arg = -(
                curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy
            ) + 1j * (xx * xi * math.cos(theta) + yy * xi * math.sin(theta))
            out += np.exp(arg)
    return out / (2 * math.pi * sigma**2 / slant)


def _morlet(sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor minus its envelope scaled to zero mean: a wavelet (no DC)."""
    wave = _gabor(sigma, theta, xi, slant)
    envelope = _gabor(sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


@functools.lru_cache(maxsize=1)
def filter_bank() -> tuple[np.ndarray, np.ndarray]:
    """``(psi_hat, phi_hat)``: the wavelets' Fourier transforms (J, L, 32, 32)
    and the low-pass's (32, 32), all real (the filters are symmetric).

    Cached because it is a constant of the module (pure, built once)."""
    psi = np.zeros((SCALES, ORIENTATIONS, _GRID, _GRID), np.float32)
    for j in range(SCALES):
        for t in range(ORIENTATIONS):
            theta = (int(ORIENTATIONS - ORIENTATIONS / 2 - 1) - t) * math.pi / ORIENTATIONS
            wave = _morlet(0.8 * 2**j, theta, 3.0 / 4.0 * math.pi / 2**j, 4.0 / ORIENTATIONS)
            psi[j, t] = np.fft.fft2(wave).real
    phi = np.fft.fft2(_gabor(0.8 * 2 ** (SCALES - 1), 0.0, 0.0)).real.astype(np.float32)
    psi.setflags(write=False)  # shared by every caller of the cache: constants
    phi.setflags(write=False)
    return psi, phi


_HALF = _GRID // 2 + 1


def _low_pass(u: jax.Array, phi: jax.Array) -> jax.Array:
    """Low-pass real ``u``, crop the padding and sample every 2^J pixels:
    (..., 7, 7). Real FFTs: half the spectrum, since phi is symmetric."""
    u_hat = jnp.fft.rfft2(u)
    full = jnp.fft.irfft2(u_hat * phi[:, :_HALF], s=(_GRID, _GRID))
    inner = full[..., _PAD : _PAD + _SIZE, _PAD : _PAD + _SIZE]
    return inner[..., _STEP // 2 :: _STEP, _STEP // 2 :: _STEP]


@jax.jit
def scattering(images: jax.Array) -> jax.Array:
    """Scattering features (N, 81, 7, 7) float32 of images (N, 28, 28)
    (uint8 pixels, scaled and normalized with the MNIST mean and std as the
    CNNs do, or floats taken as already normalized)."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = (x / 255.0 - _MNIST_MEAN) / _MNIST_STD
    psi_np, phi_np = filter_bank()
    psi, phi = jnp.asarray(psi_np), jnp.asarray(phi_np)
    x = jnp.pad(x, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), mode="reflect")
    order0 = _low_pass(x, phi)[:, None]  # (N, 1, 7, 7)
    # Wavelets are not symmetric in frequency: full complex FFTs for them.
    x_hat = jnp.fft.fft2(x)  # (N, 32, 32)
    u1 = jnp.abs(jnp.fft.ifft2(x_hat[:, None, None] * psi))  # (N, J, L, 32, 32)
    order1 = _low_pass(u1, phi).reshape(-1, SCALES * ORIENTATIONS, _OUT, _OUT)
    # j1 = 0 then j2 = 1 (the only pair with j2 > j1 for J = 2): (N, L, L, 32, 32)
    u1_hat = jnp.fft.fft2(u1[:, 0])
    u2 = jnp.abs(jnp.fft.ifft2(u1_hat[:, :, None] * psi[1][None, None]))
    order2 = _low_pass(u2, phi).reshape(-1, ORIENTATIONS**2, _OUT, _OUT)
    return jnp.concatenate([order0, order1, order2], axis=1)


def scatter_images(images: np.ndarray, *, chunk: int = 500) -> np.ndarray:
    """:func:`scattering` of any number of images, ``chunk`` at a time: one
    compiled shape, and bounded memory (order 2 alone is 64 complex 32 x 32
    planes per image, 262 MB per array at 500 images)."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (_SIZE, _SIZE):
        raise ConfigError(f"scattering takes images (N, 28, 28), got {images.shape}")
    out = np.empty((len(images), CHANNELS, _OUT, _OUT), np.float32)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        pad = chunk - len(part)
        if pad:
            part = np.concatenate([part, np.zeros((pad, _SIZE, _SIZE), part.dtype)])
        out[start : start + chunk] = np.asarray(scattering(jnp.asarray(part)))[: chunk - pad]
    return out
