"""ResUNet: a ResNet encoder with the U-Net decoder of the official GraTa/VPTTA code.

Layout (DESIGN.md §2 "Backbone"):

* encoder: ResNet stem (7×7/2 conv, BN, ReLU → skip 0), 3×3/2 max-pool,
  ``layer1``..``layer4`` (skips 1..3; ``layer4`` is the bottleneck);
* decoder: four :class:`UnetBlock` (layer3, layer2, layer1, stem skips), each
  ``ConvTranspose 2×2/2 → n_out/2`` on the upsampled path and ``1×1 conv →
  n_out/2`` on the skip, concatenated, ReLU, then ``BN(n_out)``;
* head: ``ConvTranspose 2×2/2 → 32``, BN, ReLU, ``1×1 conv → num_classes``.

Module names mirror the PyTorch ``state_dict`` of the official network so that a
converter can map ``rn.4.0.conv1.weight`` → ``layer1_0/conv1/kernel`` and so
on: the stem is ``conv1``/``bn1``, residual blocks are ``layer{i}_{j}`` with
``conv{k}``/``bn{k}``/``downsample_conv``/``downsample_bn``, decoder blocks are
``up1``..``up4`` with ``tr_conv``/``x_conv``/``bn``, then ``up5``, ``bnout``,
``seg_head``.

``width`` multiplies every channel count (1.0 = the paper's network); CPU
configs use 0.25.

BatchNorm statistics: ``train=False`` uses the stored running statistics
(source statistics); ``train=True`` normalises with the statistics of the batch
being forwarded.  Test-time methods that want per-image statistics call
``apply(..., train=True, mutable=["batch_stats"])`` and drop the returned
statistics (see :mod:`tta_jax.bn`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

# PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1 (= flax momentum 0.9).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

RESNET_STAGES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        y = Conv(self.features, 3, self.strides, use_bias=False, name="conv1")(x)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
        y = Conv(self.features, 3, use_bias=False, name="conv2")(y)
        y = BatchNorm(use_running_average=not train, name="bn2")(y)
        if residual.shape != y.shape:
            residual = Conv(self.features, 1, self.strides, use_bias=False, name="downsample_conv")(residual)
            residual = BatchNorm(use_running_average=not train, name="downsample_bn")(residual)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    features: int
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        y = Conv(self.features, 1, use_bias=False, name="conv1")(x)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
        # torchvision's ResNet-50 (v1.5) strides in the 3×3 conv.
        y = Conv(self.features, 3, self.strides, use_bias=False, name="conv2")(y)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn2")(y))
        y = Conv(self.features * 4, 1, use_bias=False, name="conv3")(y)
        y = BatchNorm(use_running_average=not train, name="bn3")(y)
        if residual.shape != y.shape:
            residual = Conv(self.features * 4, 1, self.strides, use_bias=False, name="downsample_conv")(residual)
            residual = BatchNorm(use_running_average=not train, name="downsample_bn")(residual)
        return nn.relu(y + residual)


_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides: int, pad: int):
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), [(pad, pad), (pad, pad)],
                                        dimension_numbers=_DIMS)


# Name of the optional parameter, next to a frozen square convolution's ``kernel``, that holds
# its precomputed input-gradient kernel (see :func:`with_input_grad_kernels`).
INPUT_GRAD_KERNEL = "kernel_input_grad"


def input_grad_kernel(kernel):
    """The kernel of a convolution's input gradient: spatially flipped, in/out channels swapped (HWIO)."""
    return jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_same(x, kernel, grad_kernel, strides: int, pad: int):
    """A square convolution (NHWC/HWIO, symmetric ``pad``) whose input gradient is spelled out.

    The input gradient is the convolution of the (dilated, for ``strides`` > 1)
    output gradient with :func:`input_grad_kernel` of ``kernel`` — written
    here as an explicit transpose, which XLA:CPU materialises and hands to
    its fast convolution library; left to autodiff it keeps the swapped kernel
    layout and falls back to a slow generic convolution (TENT step, ResNet-34
    at 256²: 270 of its 600 ms). Values and gradients equal autodiff's
    (``tests/test_model.py``).

    ``grad_kernel``: ``None``, or ``input_grad_kernel(kernel)`` computed once
    beforehand for a frozen kernel (:func:`with_input_grad_kernels`). The
    transpose of all kernels is a strided copy of every weight, ~90 ms of a
    GraTa step (ResNet-34, 256², two backward passes) when redone per step.
    The forward value does not depend on it, so its cotangent is zero.
    """
    return _conv(x, kernel, strides, pad)


def _conv_same_fwd(x, kernel, grad_kernel, strides, pad):
    return _conv(x, kernel, strides, pad), (x, kernel, grad_kernel)


def _conv_same_bwd(strides, pad, residuals, dy):
    x, kernel, grad_kernel = residuals
    k = kernel.shape[0]
    flipped = input_grad_kernel(kernel) if grad_kernel is None else grad_kernel
    pads = [(k - 1 - pad, k - 1 - pad + (n + 2 * pad - k) % strides) for n in x.shape[1:3]]
    dx = jax.lax.conv_general_dilated(dy, flipped, (1, 1), pads, lhs_dilation=(strides, strides),
                                      dimension_numbers=_DIMS)
    _, kernel_vjp = jax.vjp(lambda kk: _conv(x, kk, strides, pad), kernel)
    return dx, kernel_vjp(dy)[0], None if grad_kernel is None else jnp.zeros_like(grad_kernel)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def with_input_grad_kernels(params):
    """``params`` plus, next to every square convolution's ``kernel``, its precomputed input gradient kernel.

    For weights that stay frozen while gradients flow through them (TENT,
    GraTa and adversarial TTT differentiate w.r.t. BN parameters or the input
    only): :class:`Conv` then reuses the stored kernel in every backward pass
    instead of transposing the kernel again each step. The stored copy is
    only valid for the kernel it was made from — never add it to parameters
    that are trained. Costs one more copy of the convolution weights.
    """
    flat = traverse_util.flatten_dict(params)
    extra = {path[:-1] + (INPUT_GRAD_KERNEL,): input_grad_kernel(v) for path, v in flat.items()
             if path[-1] == "kernel" and v.ndim == 4 and v.shape[0] == v.shape[1] > 1 and v.shape[0] % 2}
    return traverse_util.unflatten_dict({**flat, **extra})


def without_input_grad_kernels(params):
    """Inverse of :func:`with_input_grad_kernels` (e.g. before saving adapted weights)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] != INPUT_GRAD_KERNEL})


class Conv(nn.Module):
    """``nn.Conv(features, (k, k), strides, padding=k // 2)`` with the same parameters, names, initialisers.

    k > 1 goes through :func:`conv_same`. k = 1 is a strided slice and a matmul over
    channels: on XLA:CPU about 2× faster forward than the convolution (and faster
    backward), and 9× for the two-channel segmentation head (microbenchmarks at
    ResNet-34 256² shapes). ``tests/test_model.py`` checks both against ``nn.Conv``.
    """

    features: int
    kernel_size: int
    strides: int = 1
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        if k == 1:
            y = jnp.einsum("nhwc,co->nhwo", x[:, ::self.strides, ::self.strides], kernel[0, 0])
        else:
            grad_kernel = None
            if self.has_variable("params", INPUT_GRAD_KERNEL):
                grad_kernel = self.get_variable("params", INPUT_GRAD_KERNEL)
                if grad_kernel.shape != (k, k, self.features, x.shape[-1]):
                    raise ValueError(f"{INPUT_GRAD_KERNEL} of shape {grad_kernel.shape} does not fit kernel "
                                     f"{kernel.shape}: make it with with_input_grad_kernels")
            y = conv_same(x, kernel, grad_kernel, self.strides, k // 2)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


def max_pool_3x3_s2(x):
    """``nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))`` as the maximum of 9 strided slices.

    The same forward values; XLA:CPU differentiates the chain of maxima with fused
    element-wise selects, where ``reduce_window``'s gradient (select-and-scatter)
    cost ~9 ms per backward pass at 256².
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
    lowers to, and its gradient, slower than matmuls (GraTa step, ResNet-34 at
    256²: 1.54–1.62 s with ``ConvTranspose``, 1.27–1.36 s with this form).
    """

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        n, h, w, _ = x.shape
        kernel = kernel[::-1, ::-1]
        # One matmul per output row parity a: its [n, h, w, (b, o)] result is already output row
        # 2i + a in memory order, so the two interleave by a cheap row-block concatenation. (A
        # single einsum to "nhawbo" made XLA:CPU transpose whole activations: 20 % slower GraTa.)
        rows = [jnp.einsum("nhwc,bco->nhwbo", x, kernel[a]).reshape(n, h, 1, 2 * w, self.features)
                for a in range(2)]
        return jnp.concatenate(rows, axis=2).reshape(n, 2 * h, 2 * w, self.features) + bias


class UnetBlock(nn.Module):
    """Decoder block of the official ResUNet: cat(tr_conv(up), x_conv(skip)) → ReLU → BN."""

    n_out: int

    @nn.compact
    def __call__(self, up, skip, train: bool):
        half = self.n_out // 2
        up = UpConv2x(half, name="tr_conv")(up)
        skip = Conv(half, 1, name="x_conv")(skip)
        x = nn.relu(jnp.concatenate([up, skip], axis=-1))
        return BatchNorm(use_running_average=not train, name="bn")(x)


def _interp_matrix(n: int, out: int):
    pos = jnp.arange(out) * ((n - 1) / max(out - 1, 1))
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n - 1)
    hi = jnp.clip(lo + 1, 0, n - 1)
    w = pos - lo
    return jax.nn.one_hot(lo, n) * (1 - w)[:, None] + jax.nn.one_hot(hi, n) * w[:, None]


def resize_bilinear_align_corners(x, height: int, width: int):
    """Bilinear resize of NHWC ``x`` with ``align_corners=True`` (PyTorch ``F.interpolate``)."""
    mh, mw = _interp_matrix(x.shape[1], height), _interp_matrix(x.shape[2], width)
    return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x)


def upsample2x_align_corners(x):
    """Bilinear ×2 upsampling with ``align_corners=True`` (PyTorch ``nn.Upsample`` in the official branches)."""
    return resize_bilinear_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])


def pixel_shuffle(x, factor: int):
    """PyTorch ``PixelShuffle`` on NHWC: [B, H, W, C·f²] → [B, H·f, W·f, C] (channel order as PyTorch)."""
    b, h, w, c = x.shape
    out_c = c // factor**2
    x = x.reshape(b, h, w, out_c, factor, factor)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, out_c)


class UpsampleBlock(nn.Module):
    """Official auxiliary-branch block: bilinear ×2 (align corners), 1×1 conv, ReLU, BN."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, 1, name="conv")(upsample2x_align_corners(x))
        return BatchNorm(use_running_average=not train, name="bn")(nn.relu(x))


AUX_HEADS = ("reconstruction", "rotation", "super_resolution", "denoising")
# PyTorch names of the official branches: recon*, rotate_head, supres*, denoise*.
_AUX_PREFIX = {"reconstruction": "recon", "denoising": "denoise", "super_resolution": "supres"}


class ResUNet(nn.Module):
    """ResUNet segmentation network (NHWC input; logits out).

    Attributes:
      backbone: ``resnet18`` | ``resnet34`` | ``resnet50``.
      num_classes: output logits (sigmoid channels; 2 for optic disc and cup).
      width: channel multiplier (1.0 = official network).
      aux_heads: auxiliary self-supervised branches of GraTa's Table 5, built as
        in the official network on the bottleneck features: ``reconstruction``
        and ``denoising`` (4 :class:`UpsampleBlock` + ×2 upsampling + 1×1 conv
        to 3 channels), ``super_resolution`` (the same chain, then conv 5×5 →
        tanh → conv 3×3 → tanh → conv 3×3 to 3·f² and pixel shuffle by
        ``sr_factor``), ``rotation`` (global pooling → MLP 256–64–6 with
        LeakyReLU 0.2).  Returned in a dict when ``return_aux=True``.
      sr_factor: super-resolution factor (the input of that branch is the
        image downsampled by it).
    """

    backbone: str = "resnet34"
    num_classes: int = 2
    width: float = 1.0
    aux_heads: tuple[str, ...] = ()
    sr_factor: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False, return_aux: bool = False, return_features: bool = False,
                 bottleneck_dropout: float = 0.0):
        """Logits ``[B, H, W, num_classes]``; with ``return_aux`` also the auxiliary outputs, with
        ``return_features`` also the decoder's last feature map (the segmentation head's input,
        ``[B, H, W, c(32)]``). ``bottleneck_dropout > 0`` applies dropout to the bottleneck
        (needs a ``"dropout"`` rng): SPEGC's Monte-Carlo dropout passes."""
        if self.backbone not in RESNET_STAGES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(RESNET_STAGES)}")
        if x.ndim != 4:
            raise ValueError(f"ResUNet expects NHWC images of rank 4, got shape {x.shape}")
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"ResUNet needs image sides divisible by 32, got {x.shape[1:3]}")
        for name in self.aux_heads:
            if name not in AUX_HEADS:
                raise ValueError(f"unknown auxiliary head {name!r}; choose from {list(AUX_HEADS)}")
        kind, stages = RESNET_STAGES[self.backbone]
        block = BasicBlock if kind == "basic" else BottleneckBlock
        c = functools.partial(_channels, width=self.width)

        x = Conv(c(64), 7, 2, use_bias=False, name="conv1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
        skips = [x]
        x = max_pool_3x3_s2(x)
        for i, n_blocks in enumerate(stages):
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                x = block(c(64 * 2**i), strides, name=f"layer{i + 1}_{j}")(x, train)
            skips.append(x)
        # skips: stem, layer1, layer2, layer3, (layer4 = bottleneck)
        bottleneck = nn.relu(skips.pop())
        if bottleneck_dropout > 0:
            bottleneck = nn.Dropout(bottleneck_dropout, deterministic=False)(bottleneck)
        x = bottleneck
        for k, skip in enumerate(reversed(skips)):
            x = UnetBlock(c(256), name=f"up{k + 1}")(x, skip, train)
        features = UpConv2x(c(32), name="up5")(x)
        head_in = nn.relu(BatchNorm(use_running_average=not train, name="bnout")(features))
        logits = Conv(self.num_classes, 1, name="seg_head")(head_in)
        outputs = (logits,)
        if return_aux:
            outputs += ({name: self._aux_branch(name, bottleneck, train) for name in self.aux_heads},)
        if return_features:
            outputs += (head_in,)
        return outputs[0] if len(outputs) == 1 else outputs

    def _aux_branch(self, name, bottleneck, train):
        c = functools.partial(_channels, width=self.width)
        if name == "rotation":
            h = jnp.mean(bottleneck, axis=(1, 2))
            h = nn.leaky_relu(nn.Dense(c(256), name="rotate_head_0")(h), 0.2)
            h = nn.leaky_relu(nn.Dense(c(64), name="rotate_head_2")(h), 0.2)
            return nn.Dense(6, name="rotate_head_4")(h)
        prefix = _AUX_PREFIX[name]
        h = bottleneck
        for k, base in enumerate((256, 128, 64, 32)):
            h = UpsampleBlock(c(base), name=f"{prefix}{k + 1}")(h, train)
        h = upsample2x_align_corners(h)
        if name != "super_resolution":
            return Conv(3, 1, name=f"{prefix}_head")(h)
        h = jnp.tanh(Conv(c(32), 5, name="supres_head_0")(h))
        h = jnp.tanh(Conv(c(32), 3, name="supres_head_2")(h))
        h = Conv(3 * self.sr_factor**2, 3, name="supres_head_4")(h)
        return pixel_shuffle(h, self.sr_factor)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _jit_init(model, rbg_key, image_size, channels):
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return model.init(rbg_key, dummy, train=False, return_aux=bool(model.aux_heads))


def init_variables(model: nn.Module, rng: jax.Array, image_size: int, channels: int = 3):
    """Initialise ``model`` variables with a jitted init (eager init takes 20 s+ on CPU).

    The parameters are drawn from an RBG key derived deterministically from
    ``rng``: XLA:CPU compiles RBG sampling about 3× faster than threefry, and
    an init is compiled once per (model, image size) in a process.
    """
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    data = jnp.asarray(data, jnp.uint32).reshape(-1)
    rbg_key = jax.random.wrap_key_data(jnp.concatenate([data, data])[:4], impl="rbg")
    return _jit_init(model, rbg_key, image_size, channels)
