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

from tta_jax.models.fast_ops import Conv, UpConv2x, max_pool_3x3_s2

# PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1 (= flax momentum 0.9). Flax's one-pass
# variance (use_fast_variance) is kept: the two-pass form reduced neither the float32 GraTa
# step's distance to a float64 PyTorch step nor its time in an interleaved A/B.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# model.compute_dtype → the dtype the convolutions multiply in (None: float32 inputs as they are)
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}

RESNET_STAGES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def scaled_channels(base: int, width: float) -> int:
    """The channels of a layer with ``base`` channels in the full-width network, at ``width`` (at least 1)."""
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    compute_dtype: Any = None
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        y = Conv(self.features, 3, self.strides, use_bias=False, name="conv1",
                 compute_dtype=self.compute_dtype)(x)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
        y = Conv(self.features, 3, use_bias=False, name="conv2", compute_dtype=self.compute_dtype)(y)
        y = BatchNorm(use_running_average=not train, name="bn2")(y)
        if residual.shape != y.shape:
            residual = Conv(self.features, 1, self.strides, use_bias=False, name="downsample_conv",
                            compute_dtype=self.compute_dtype)(residual)
            residual = BatchNorm(use_running_average=not train, name="downsample_bn")(residual)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    features: int
    strides: int = 1
    compute_dtype: Any = None
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        y = Conv(self.features, 1, use_bias=False, name="conv1", compute_dtype=self.compute_dtype)(x)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
        # torchvision's ResNet-50 (v1.5) strides in the 3×3 conv.
        y = Conv(self.features, 3, self.strides, use_bias=False, name="conv2",
                 compute_dtype=self.compute_dtype)(y)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn2")(y))
        y = Conv(self.features * 4, 1, use_bias=False, name="conv3", compute_dtype=self.compute_dtype)(y)
        y = BatchNorm(use_running_average=not train, name="bn3")(y)
        if residual.shape != y.shape:
            residual = Conv(self.features * 4, 1, self.strides, use_bias=False, name="downsample_conv",
                            compute_dtype=self.compute_dtype)(residual)
            residual = BatchNorm(use_running_average=not train, name="downsample_bn")(residual)
        return nn.relu(y + residual)


class UnetBlock(nn.Module):
    """Decoder block of the official ResUNet: cat(tr_conv(up), x_conv(skip)) → ReLU → BN."""

    n_out: int
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, up, skip, train: bool):
        half = self.n_out // 2
        up = UpConv2x(half, name="tr_conv", compute_dtype=self.compute_dtype)(up)
        skip = Conv(half, 1, name="x_conv", compute_dtype=self.compute_dtype)(skip)
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
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, 1, name="conv", compute_dtype=self.compute_dtype)(upsample2x_align_corners(x))
        return BatchNorm(use_running_average=not train, name="bn")(nn.relu(x))


AUX_HEADS = ("reconstruction", "rotation", "super_resolution", "denoising", "blind_spot", "noise_contrastive")
# PyTorch names of the official branches: recon*, rotate_head, supres*, denoise*; blindspot* is
# DeTTA's denoising decoder (not part of the GraTa network).
_AUX_PREFIX = {"reconstruction": "recon", "denoising": "denoise", "super_resolution": "supres",
               "blind_spot": "blindspot"}


# NC-TTT's head (Osowiechi et al., CVPR 2024; the method is tta_jax/methods/nc_ttt.py), official
# defaults of github.com/GustavoVargasHakim/NCTTT: the noise levels of the in- and out-of-distribution
# views (its --std2 and --std), one view of each level per feature map, a projection 6× as wide as its
# input (--embed-size 1536 on ResNet-50's 256-channel layer1) and a 4-unit discriminator (--hidden).
NC_SIGMA_IN = 0.015
NC_SIGMA_OUT = 0.1
NC_VIEWS = 1
NC_EMBED_RATIO = 6
NC_HIDDEN = 4
NC_NOISE_RNG = "noise_contrastive"   # the RNG stream the head draws its source-time noise from


class NoiseContrastiveHead(nn.Module):
    """NC-TTT's auxiliary head: a linear (1×1) projection ``z`` of a feature map and a per-pixel
    discriminator (1×1 → BN → LeakyReLU 0.2 → 1×1) of noisy views ``z + n``.

    Returns ``{"logits": [V, B, h, w], "noise": [V, B, h, w, E]}``: per view ``v`` and pixel, the
    logit that ``z + noise[v]`` carries the out-of-distribution (larger) noise. Given the
    :data:`NC_NOISE_RNG` RNG stream (the source objective), ``V = 2·NC_VIEWS``: ``NC_VIEWS`` views
    with ``n ~ N(0, NC_SIGMA_IN² I_E)`` per pixel, then ``NC_VIEWS`` with ``N(0, NC_SIGMA_OUT² I_E)``;
    without it (test time) ``V = 1``, the clean projection (noise 0). In train mode the
    discriminator's BN normalises over all views, images and pixels together (the official
    ``BatchNorm2d`` sees both views concatenated along the batch). Kernels are Xavier-normal, as
    the official ``init_weight``.
    """

    embed_ratio: int = NC_EMBED_RATIO
    hidden: int = NC_HIDDEN

    @nn.compact
    def __call__(self, features, train: bool):
        xavier = nn.initializers.xavier_normal()
        z = nn.Dense(self.embed_ratio * features.shape[-1], kernel_init=xavier, name="projector")(features)
        if self.has_rng(NC_NOISE_RNG):
            # One draw per image and pixel, the paper's noise model. The official code broadcasts a
            # [B, 1] one-hot against the draws and sums, so every image of a batch gets the sum of the
            # batch's draws (standard deviation σ√B) while its targets assume σ.
            sigmas = jnp.repeat(jnp.array([NC_SIGMA_IN, NC_SIGMA_OUT], z.dtype), NC_VIEWS)
            unit = jax.random.normal(self.make_rng(NC_NOISE_RNG), (2 * NC_VIEWS,) + z.shape, z.dtype)
            noise = sigmas.reshape((-1,) + (1,) * z.ndim) * unit
        else:
            noise = jnp.zeros((1,) + z.shape, z.dtype)
        h = nn.Dense(self.hidden, kernel_init=xavier, name="discriminator_hidden")(z + noise)
        h = nn.leaky_relu(BatchNorm(use_running_average=not train, name="discriminator_bn")(h), 0.2)
        logits = nn.Dense(1, kernel_init=xavier, name="discriminator_out")(h)[..., 0]
        return {"logits": logits, "noise": noise}


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
        LeakyReLU 0.2), DeTTA's ``blind_spot`` denoiser (the ``denoising``
        chain), and NC-TTT's ``noise_contrastive`` head (:class:`NoiseContrastiveHead`)
        on ``layer1``'s output, the layer the official NC-TTT code reads by default.
        Returned in a dict when ``return_aux=True``.
      sr_factor: super-resolution factor (the input of that branch is the
        image downsampled by it).
      compute_dtype: ``float32`` or ``bfloat16``: the dtype every convolution
        and channel matmul multiplies in (``model.compute_dtype``). With
        ``bfloat16`` they read bf16 copies of activations and float32 kernels
        and accumulate in float32; parameters, BatchNorm (statistics and
        normalisation), losses, gradients and optimizer states stay float32
        (:mod:`tta_jax.models.fast_ops`). The small ``nn.Dense`` layers of the
        rotation and noise-contrastive heads stay float32.
    """

    backbone: str = "resnet34"
    num_classes: int = 2
    width: float = 1.0
    aux_heads: tuple[str, ...] = ()
    sr_factor: int = 4
    compute_dtype: str = "float32"

    def _multiply_dtype(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute_dtype {self.compute_dtype!r}; choose one of {list(COMPUTE_DTYPES)}")
        return COMPUTE_DTYPES[self.compute_dtype]

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
        c = functools.partial(scaled_channels, width=self.width)
        low = self._multiply_dtype()

        x = Conv(c(64), 7, 2, use_bias=False, name="conv1", compute_dtype=low)(x)
        x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
        skips = [x]
        x = max_pool_3x3_s2(x)
        for i, n_blocks in enumerate(stages):
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                x = block(c(64 * 2**i), strides, low, name=f"layer{i + 1}_{j}")(x, train)
            skips.append(x)
        # skips: stem, layer1, layer2, layer3, (layer4 = bottleneck)
        bottleneck = nn.relu(skips.pop())
        if bottleneck_dropout > 0:
            bottleneck = nn.Dropout(bottleneck_dropout, deterministic=False)(bottleneck)
        x = bottleneck
        for k, skip in enumerate(reversed(skips)):
            x = UnetBlock(c(256), low, name=f"up{k + 1}")(x, skip, train)
        features = UpConv2x(c(32), name="up5", compute_dtype=low)(x)
        head_in = nn.relu(BatchNorm(use_running_average=not train, name="bnout")(features))
        logits = Conv(self.num_classes, 1, name="seg_head", compute_dtype=low)(head_in)
        outputs = (logits,)
        if return_aux:
            aux = {}
            for name in self.aux_heads:
                if name == "noise_contrastive":
                    aux[name] = NoiseContrastiveHead(name="nc_head")(skips[1], train)
                else:
                    aux[name] = self._aux_branch(name, bottleneck, train)
            outputs += (aux,)
        if return_features:
            outputs += (head_in,)
        return outputs[0] if len(outputs) == 1 else outputs

    def _aux_branch(self, name, bottleneck, train):
        c = functools.partial(scaled_channels, width=self.width)
        low = self._multiply_dtype()
        if name == "rotation":
            h = jnp.mean(bottleneck, axis=(1, 2))
            h = nn.leaky_relu(nn.Dense(c(256), name="rotate_head_0")(h), 0.2)
            h = nn.leaky_relu(nn.Dense(c(64), name="rotate_head_2")(h), 0.2)
            return nn.Dense(6, name="rotate_head_4")(h)
        prefix = _AUX_PREFIX[name]
        h = bottleneck
        for k, base in enumerate((256, 128, 64, 32)):
            h = UpsampleBlock(c(base), low, name=f"{prefix}{k + 1}")(h, train)
        h = upsample2x_align_corners(h)
        if name != "super_resolution":
            return Conv(3, 1, name=f"{prefix}_head", compute_dtype=low)(h)
        h = jnp.tanh(Conv(c(32), 5, name="supres_head_0", compute_dtype=low)(h))
        h = jnp.tanh(Conv(c(32), 3, name="supres_head_2", compute_dtype=low)(h))
        h = Conv(3 * self.sr_factor**2, 3, name="supres_head_4", compute_dtype=low)(h)
        return pixel_shuffle(h, self.sr_factor)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _jit_init(model, rbg_key, image_size, channels):
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return model.init(rbg_key, dummy, train=False, return_aux=bool(model.aux_heads))


def init_variables(model: nn.Module, rng: jax.Array, image_size: int, channels: int = 3):
    """Initialise ``model`` variables with a jitted init (an eager Flax init is slow on CPU).

    The parameters are drawn from an RBG key derived deterministically from
    ``rng``: XLA:CPU compiles RBG sampling faster than threefry, and
    an init is compiled once per (model, image size) in a process.
    """
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    data = jnp.asarray(data, jnp.uint32).reshape(-1)
    rbg_key = jax.random.wrap_key_data(jnp.concatenate([data, data])[:4], impl="rbg")
    return _jit_init(model, rbg_key, image_size, channels)
