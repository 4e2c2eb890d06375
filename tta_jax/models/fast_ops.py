"""Layers of the ResUNet rewritten for XLA:CPU, with the parameters, names and values of the Flax layers.

Each one replaces a stock Flax layer whose lowering XLA:CPU runs on a slow
path; checkpoints and the PyTorch converter see the same parameter tree, and
``tests/test_model.py`` checks each against the layer it replaces (values and
gradients). The benchmark (README, Performance) measures what they buy.

* :class:`Conv` — square convolutions with a hand-written input gradient
  (:func:`conv_same`), multiplied as k² tap matmuls (:func:`conv_taps`) where
  :func:`use_tap_matmuls` says the machine's matmuls beat its convolutions;
  1×1 convolutions as matmuls;
* :func:`max_pool_3x3_s2` — the stem's max-pool as 9 strided slices;
* :class:`UpConv2x` — the 2×2/2 transposed convolution as two row matmuls.

Each takes a ``compute_dtype`` (``None``: that of the inputs): with
``"bfloat16"`` the multiplications read bf16 copies of the activations and the
float32 kernel and accumulate into float32 (``preferred_element_type``), so
outputs, gradients and everything downstream (BatchNorm, losses, optimizer
state) stay float32: the mixed precision of ``model.compute_dtype``.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


_DIMS = ("NHWC", "HWIO", "NHWC")


def _low(compute_dtype, *arrays):
    """``arrays`` cast to ``compute_dtype`` (unchanged for None) and the accumulation dtype to ask for."""
    if compute_dtype is None:
        return arrays, None
    return tuple(a.astype(compute_dtype) for a in arrays), jnp.float32


# With fewer input channels the tap matmuls lost to the convolution on an AMX CPU (README, "Roofline
# and bfloat16").
TAP_MATMUL_MIN_CHANNELS = 64


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU reports Intel AMX with bf16 (``amx_bf16`` in ``/proc/cpuinfo``; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read().split()
    except OSError:
        return False


def use_tap_matmuls(in_channels: int, compute_dtype) -> bool:
    """Whether :func:`conv_same` multiplies as tap matmuls (:func:`conv_taps`) instead of one convolution.

    True for bfloat16 multiplication of at least :data:`TAP_MATMUL_MIN_CHANNELS`
    input channels on a CPU with AMX-BF16: there XLA:CPU runs bf16 matmuls on
    the AMX tiles but bf16 convolutions on a generic path at float32 speed,
    so the k² matmuls win on the ResNet encoder's maps (the benchmark's
    convolution-forms table measures both forms per shape on any machine).
    GPUs and TPUs run bf16 convolutions natively and keep them; so do float32
    and CPUs without AMX, where a convolution beats its tap matmuls.
    """
    return (compute_dtype is not None and jnp.dtype(compute_dtype) == jnp.bfloat16
            and in_channels >= TAP_MATMUL_MIN_CHANNELS
            and jax.default_backend() == "cpu" and cpu_has_amx_bf16())


def conv_taps(x, kernel, strides: int, pad: int, preferred_element_type=None):
    """A square convolution (NHWC/HWIO, symmetric zero ``pad``) as a sum of k² channel matmuls.

    ``y[n, i, j] = Σ_{a,b} x_pad[n, s·i + a, s·j + b] @ kernel[a, b]``: one
    strided window of the padded input per tap, each multiplied by that tap's
    ``[C_in, C_out]`` matrix, the products summed in ``preferred_element_type``.
    The same sum as ``lax.conv_general_dilated`` (``tests/test_model.py``), in another order.
    """
    n, h, w, c = x.shape
    k = kernel.shape[0]
    ho, wo = (h + 2 * pad - k) // strides + 1, (w + 2 * pad - k) // strides + 1
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for a in range(k):
        for b in range(k):
            window = jax.lax.slice(padded, (0, a, b, 0), (n, a + strides * (ho - 1) + 1, b + strides * (wo - 1) + 1, c),
                                   (1, strides, strides, 1))
            tap = jnp.einsum("nhwc,co->nhwo", window, kernel[a, b], preferred_element_type=preferred_element_type)
            out = tap if out is None else out + tap
    return out


def _conv(x, kernel, strides: int, pad: int, compute_dtype=None):
    (x, kernel), accumulate = _low(compute_dtype, x, kernel)
    if use_tap_matmuls(x.shape[-1], compute_dtype):
        return conv_taps(x, kernel, strides, pad, accumulate)
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), [(pad, pad), (pad, pad)],
                                        dimension_numbers=_DIMS, preferred_element_type=accumulate)


def matmul_channels(spec: str, x, kernel, compute_dtype=None):
    """``jnp.einsum(spec, x, kernel)`` with the multiplication in ``compute_dtype`` and float32 accumulation."""
    (x, kernel), accumulate = _low(compute_dtype, x, kernel)
    return jnp.einsum(spec, x, kernel, preferred_element_type=accumulate)


def input_grad_kernel(kernel):
    """The kernel of a convolution's input gradient: spatially flipped, in/out channels swapped (HWIO)."""
    return jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_same(x, kernel, strides: int, pad: int, compute_dtype=None):
    """A square convolution (NHWC/HWIO, symmetric ``pad``) whose input gradient is spelled out.

    The input gradient is the convolution of the (dilated, for ``strides`` > 1)
    output gradient with :func:`input_grad_kernel` of ``kernel`` — written
    here as an explicit transpose, which XLA:CPU materialises and hands to
    its fast convolution library; left to autodiff it keeps the swapped kernel
    layout and falls back to a slow generic convolution. Values and gradients equal autodiff's
    (``tests/test_model.py``). Both gradient convolutions also multiply in ``compute_dtype``;
    the forward pass and a stride-1 input gradient go through :func:`conv_taps` where
    :func:`use_tap_matmuls` says so.
    """
    return _conv(x, kernel, strides, pad, compute_dtype)


def _conv_same_fwd(x, kernel, strides, pad, compute_dtype):
    return _conv(x, kernel, strides, pad, compute_dtype), (x, kernel)


def _conv_same_bwd(strides, pad, compute_dtype, residuals, dy):
    x, kernel = residuals
    k = kernel.shape[0]
    flipped = input_grad_kernel(kernel)
    pads = [(k - 1 - pad, k - 1 - pad + (n + 2 * pad - k) % strides) for n in x.shape[1:3]]
    (dy_low, flipped), accumulate = _low(compute_dtype, dy, flipped)
    if strides == 1 and use_tap_matmuls(dy.shape[-1], compute_dtype):
        dx = conv_taps(dy_low, flipped, 1, k - 1 - pad, accumulate)
    else:
        dx = jax.lax.conv_general_dilated(dy_low, flipped, (1, 1), pads, lhs_dilation=(strides, strides),
                                          dimension_numbers=_DIMS, preferred_element_type=accumulate)
    _, kernel_vjp = jax.vjp(lambda kk: _conv(x, kk, strides, pad, compute_dtype), kernel)
    return dx.astype(x.dtype), kernel_vjp(dy)[0]


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class Conv(nn.Module):
    """``nn.Conv(features, (k, k), strides, padding=k // 2)`` with the same parameters, names, initialisers.

    k > 1 goes through :func:`conv_same`. k = 1 is a strided slice and a matmul over
    channels, which XLA:CPU runs faster than the convolution, forward and backward
    (most of all for the two-channel segmentation head). ``tests/test_model.py``
    checks both against ``nn.Conv``.
    """

    features: int
    kernel_size: int
    strides: int = 1
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        if k == 1:
            y = matmul_channels("nhwc,co->nhwo", x[:, ::self.strides, ::self.strides], kernel[0, 0],
                                self.compute_dtype)
        else:
            y = conv_same(x, kernel, self.strides, k // 2, self.compute_dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


def max_pool_3x3_s2(x):
    """``nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))`` as the maximum of 9 strided slices.

    The same forward values; XLA:CPU differentiates the chain of maxima with fused
    element-wise selects instead of ``reduce_window``'s slow gradient (select-and-scatter).
    """
    n, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out = None
    for dy in range(3):
        for dx in range(3):
            window = jax.lax.slice(xp, (0, dy, dx, 0), (n, dy + 2 * (ho - 1) + 1, dx + 2 * (wo - 1) + 1, c),
                                   (1, 2, 2, 1))
            out = window if out is None else jnp.maximum(out, window)
    return out


class UpConv2x(nn.Module):
    """``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")`` as a matmul + depth-to-space.

    A 2×2/2 transposed convolution has no overlapping windows: output pixel
    ``(2i + a, 2j + b)`` is ``x[i, j] @ K[1 − a, 1 − b] + bias`` (Flax does not
    transpose the kernel, hence the flip). Same parameters, names, shapes and
    initialisers as the Flax module — checkpoints and the PyTorch converter are
    unchanged (``tests/test_model.py`` checks the two agree). Written this way
    because XLA:CPU runs the lhs-dilated convolution that ``ConvTranspose``
    lowers to, and its gradient, slower than matmuls.
    """

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        n, h, w, _ = x.shape
        kernel = kernel[::-1, ::-1]
        # One matmul per output row parity a: its [n, h, w, (b, o)] result is already output row
        # 2i + a in memory order, so the two interleave by a cheap row-block concatenation. (A
        # single einsum to "nhawbo" makes XLA:CPU transpose whole activations.)
        rows = [matmul_channels("nhwc,bco->nhwbo", x, kernel[a], self.compute_dtype).reshape(
                    n, h, 1, 2 * w, self.features)
                for a in range(2)]
        return jnp.concatenate(rows, axis=2).reshape(n, 2 * h, 2 * w, self.features) + bias
