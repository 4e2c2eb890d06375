"""``vptta``: visual prompt test-time adaptation (Chen et al., "Each Test Image Deserves A Specific
Prompt", CVPR 2024).

The network stays frozen; each test image gets its own prompt, a ``p × p × 3``
multiplier of the low-frequency amplitude spectrum (:func:`apply_prompt`;
``p = max(1, int(side · prompt_fraction))``, official 1 % of the side), trained
for one Adam step (the optimiser's moments persist along the stream) on the
BN-statistics alignment loss (:func:`alignment_loss`), then the image is
predicted through the prompt.

BN statistics (official ``AdaBN``): for the t-th image, every BN layer
normalises with ``μ = m μ_batch + (1 − m) μ_source``, ``σ² = m σ²_batch + (1 − m) σ²_source``,
``m = 1 / (√t / warm_n + 1)`` (batch variance unbiased, both statistics
detached); the source statistics never change.

Memory bank (official ``Memory``): the last ``memory_size`` (key, prompt)
pairs; the key is the unprompted low-frequency amplitude square. Once it holds
``neighbours`` entries, an image's prompt starts from the softmax(cos / 0.2)-
weighted mean of its nearest neighbours' prompts (cosine similarity of keys),
before that from ones. The adapted prompt is stored after the prediction.

Choices documented: the prompt buffer has a fixed side ``max_prompt_size``
(the state's shape is fixed before the first image); the prompt uses its
central ``p × p`` part, so the key and prompt beyond it are zero and never
change. The bank holds exactly ``memory_size`` entries (the official one
evicts after exceeding it, holding one more). Official defaults: lr 0.05
(fundus; polyp 0.01, declared as the ``polyp`` family default), Adam betas
(0.9, 0.99), memory 40, 16 neighbours, warm_n 5.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.bn import channel_axes, forward_with_statistics
from tta_jax.hparams import HParamError, bounded
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register
from tta_jax.methods.common import memory_neighbours


@dataclasses.dataclass(frozen=True)
class VPTTAHParams:
    lr: float = bounded(0.05, low=0.0)
    b1: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = bounded(0.99, low=0.0, high=1.0, high_open=True)
    prompt_fraction: float = bounded(0.01, low=0.0, high=1.0, low_open=True)
    max_prompt_size: int = bounded(16, low=1)
    memory_size: int = bounded(40, low=1)
    neighbours: int = bounded(16, low=1)
    similarity_temperature: float = bounded(0.2, low=0.0, low_open=True)
    warm_n: float = bounded(5.0, low=0.0, low_open=True)

    def __post_init__(self):
        if self.neighbours > self.memory_size:
            raise HParamError(f"vptta: neighbours={self.neighbours} exceeds memory_size={self.memory_size}")


class VPTTAState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any        # Adam on the prompt buffer, persistent
    keys: jax.Array       # [M, 3·P²] low-frequency amplitudes of stored images
    prompts: jax.Array    # [M, P, P, 3] their adapted prompts
    count: jax.Array      # images seen (t − 1 before the current one)


def prompt_side(side: int, fraction: float) -> int:
    return max(1, int(side * fraction))


def _square(height: int, width: int, p: int):
    """Rows/columns of the prompt square in the fftshifted spectrum (official offset (side − p) // 2)."""
    return slice((height - p) // 2, (height - p) // 2 + p), slice((width - p) // 2, (width - p) // 2 + p)


def apply_prompt(image, prompt):
    """``image`` ``[H, W, 3]`` with its fftshifted amplitude multiplied by ``prompt`` ``[p, p, 3]`` on the
    central square (the phase kept); returns (prompted image (real part), unprompted amplitude square)."""
    h, w, _ = image.shape
    p = prompt.shape[0]
    spectrum = jnp.fft.fft2(image, axes=(0, 1))
    amplitude = jnp.fft.fftshift(jnp.abs(spectrum), axes=(0, 1))
    rows, cols = _square(h, w, p)
    low = amplitude[rows, cols]
    prompted = amplitude.at[rows, cols].multiply(prompt)
    rebuilt = jnp.fft.ifftshift(prompted, axes=(0, 1)) * jnp.exp(1j * jnp.angle(spectrum))
    return jnp.real(jnp.fft.ifft2(rebuilt, axes=(0, 1))), low


def adabn_momentum(t, warm_n: float):
    """Weight of the test batch's statistics for the t-th image (1-based): ``1 / (√t / warm_n + 1)``."""
    return 1.0 / (jnp.sqrt(t) / warm_n + 1.0)


def adabn_statistics(momentum, losses: list | None = None):
    """VPTTA's normalisation statistics (detached mixture); appends each layer's alignment loss to ``losses``:
    mean_c |μ − μ_inst| + mean_c |σ − σ_inst| (instance std unbiased)."""
    def statistics(layer, x):
        axes = channel_axes(x)
        n = x.size // x.shape[-1]
        mean, var = x.mean(axes), x.var(axes) * n / max(n - 1, 1)
        mixed_mean = jax.lax.stop_gradient(momentum * mean + (1 - momentum) * layer.source_mean)
        mixed_var = jax.lax.stop_gradient(momentum * var + (1 - momentum) * layer.source_var)
        if losses is not None:
            losses.append(jnp.mean(jnp.abs(mixed_mean - mean)) + jnp.mean(jnp.abs(jnp.sqrt(mixed_var) - jnp.sqrt(var))))
        return mixed_mean, mixed_var
    return statistics


def alignment_loss(model, params, batch_stats, images, momentum):
    """Mean over BN layers of the alignment loss of :func:`adabn_statistics`."""
    losses = []
    forward_with_statistics(model, params, batch_stats, images, adabn_statistics(momentum, losses))
    return jnp.mean(jnp.stack(losses))


def warm_start(keys, prompts, count, key, hp: VPTTAHParams):
    """The starting prompt: ones until ``neighbours`` entries are stored, then the softmax(cos / T)-weighted
    mean of the nearest stored prompts."""
    size = keys.shape[0]
    weights, top_idx = memory_neighbours(keys, count, key, hp.neighbours, hp.similarity_temperature)
    mixed = jnp.einsum("k,kabc->abc", weights, prompts[top_idx])
    return jnp.where(jnp.minimum(count, size) >= hp.neighbours, mixed, jnp.ones_like(mixed))


@register("vptta", VPTTAHParams, family_defaults={"polyp": {"lr": 0.01}})
def make(model, hp: VPTTAHParams) -> Method:
    optimizer = optax.adam(hp.lr, b1=hp.b1, b2=hp.b2)
    big = hp.max_prompt_size

    def init(variables, rng):
        del rng
        buffer = jnp.ones((big, big, 3))
        return VPTTAState(variables["params"], variables["batch_stats"], optimizer.init(buffer),
                          jnp.zeros((hp.memory_size, 3 * big * big)), jnp.ones((hp.memory_size, big, big, 3)),
                          jnp.zeros((), jnp.int32))

    def step(state, images, rng):
        del rng
        check_step_input(images)
        if images.shape[0] != 1:
            raise ValueError(f"vptta adapts one image at a time, got a batch of {images.shape[0]}")
        p = prompt_side(min(images.shape[1:3]), hp.prompt_fraction)
        if p > big:
            raise ValueError(f"vptta: the prompt side {p} exceeds max_prompt_size={big}")
        image = images[0]
        _, low = apply_prompt(image, jnp.ones((p, p, 3)))
        key = jnp.zeros((big, big, 3)).at[:p, :p].set(low).reshape(-1)
        start = warm_start(state.keys, state.prompts, state.count, key, hp)
        momentum = adabn_momentum(state.count + 1.0, hp.warm_n)

        def loss_fn(buffer):
            prompted, _ = apply_prompt(image, buffer[:p, :p])
            return alignment_loss(model, state.params, state.batch_stats, prompted[None], momentum)

        loss, grads = jax.value_and_grad(loss_fn)(start)
        updates, opt_state = optimizer.update(grads, state.opt_state, start)
        adapted = optax.apply_updates(start, updates)
        slot = state.count % hp.memory_size
        new = state._replace(opt_state=opt_state, keys=state.keys.at[slot].set(key),
                             prompts=state.prompts.at[slot].set(adapted), count=state.count + 1)
        new, ok = keep_if_finite(new, state, loss)
        prompt = jnp.where(ok, adapted, start)
        prompted, _ = apply_prompt(image, prompt[:p, :p])
        logits, _ = forward_with_statistics(model, state.params, state.batch_stats, prompted[None],
                                            adabn_statistics(momentum))
        return new, logits, {"loss": loss, "momentum": momentum, "skipped": 1.0 - ok.astype(jnp.float32)}

    return Method("vptta", init, step, stream_axes=VPTTAState(params=None, batch_stats=None, opt_state=0, keys=0,
                                                             prompts=0, count=0))
