"""TTDG's source stage (Lv et al., CVPR 2025): learn the universe of node embeddings 𝒰.

The universe is what :mod:`tta_jax.methods.ttdg` matches every test graph to ((T5)–(T6) there).
Its source objective is the official ``U_sup`` (github.com/Yore0/TTDG-MGM), numbered as in
the method module:

(T8) the nodes ``X`` of a batch of graphs (one per source image: features at the positives
     of the ground-truth mask, :func:`tta_jax.methods.ttdg.stride_positions`) are refined by a
     one-head attention ``X̂ = LayerNorm(X + O·(dropout(softmax(Q Kᵀ/√C)) V))`` whose weights
     give the intra-graph edges ``A = blockdiag(A_g)``; the soft node-to-universe assignment is
     ``Ũ = Sinkhorn(X̂ 𝒰ᵀ / 0.05)`` over all nodes of the batch (no dummy rows); with the
     label-equality matrix ``W_kl = [label_k = label_l]`` the target ``U* = HiPPI(Wᵀ A W, Ũ)``
     is a cycle-consistent multi-matching, and
     ``L_U = 0.1 · mean((Ũ − sg(U*))²) + 10⁻⁴ ‖𝒰‖_F``.
(T9) HiPPI (higher-order projected power iteration, official ``HiPPI``):
     ``U ← Sinkhorn_{τ=1/200}((B U) Uᵀ (B U))`` per graph with dummy rows, from ``U = Ũ``, at
     most 50 iterations, until ``‖ΔU‖_F < 10⁻⁵``.

Initialisation: ``𝒰 ~ N(0, 1) + 1/d``; the attention's layers as PyTorch's ``Linear`` default.
Optimiser: the official source run's SGD (lr 0.0025, momentum 0.9, weight decay 10⁻⁴), 8
images (graphs) per step, 10 000 steps.

Deviations (the design keeps the one source segmentor every method of a table shares):

* The segmentor is trained first and frozen here: the official run trains L_U jointly with the
  detector, so its gradient also reaches the backbone. Features: the decoder's last feature
  map (the segmentation head's input) with the source BN statistics (Detectron2's frozen BN),
  computed once per source image (no augmentation; the official loader flips and resizes).
* Labels: the channel of smallest area among those a location belongs to
  (:func:`tta_jax.methods.ttdg.smallest_area_labels`), the official smallest-box rule.
* The official edge weights are divided by ``1 − cos(x̂, x̂) + 10⁻⁸``, which is 10⁻⁸ plus float
  rounding (per node, of either sign): a factor of about ±10⁸ that only sharpens HiPPI's
  already sharp (τ = 1/200) Sinkhorn. The attention weights are used unscaled.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax.bn import forward_source_stats
from tta_jax.hparams import bounded
from tta_jax.methods.ttdg import block_diagonal, sinkhorn, smallest_area_labels, stride_positions

SOFT_TAU = 0.05           # U_sup's Sinkhorn
HIPPI_TAU = 1.0 / 200.0
HIPPI_ITERATIONS = 50
HIPPI_TOL = 1e-5
MATCHING_WEIGHT = 0.1     # U_loss: w · MSE + λ ‖𝒰‖_F
FROBENIUS_WEIGHT = 1e-4


@dataclasses.dataclass(frozen=True)
class UniverseHParams:
    """The universe and its source training (config ``universe.*`` when the config has it).

    Attributes:
      size: d, the universe's points (official ``univ_size`` 32).
      nodes_per_image: nodes sampled per source image (as the method's ``nodes_per_image``).
      batch_size, steps, lr, momentum, weight_decay: SGD on 𝒰 and the attention.
      dropout: the attention's dropout (0.1, train mode).
      seed: initialisation and batch sampling.
    """

    size: int = bounded(32, low=1)
    nodes_per_image: int = bounded(16, low=1)
    batch_size: int = bounded(8, low=1)
    steps: int = bounded(10000, low=0)
    lr: float = bounded(0.0025, low=0.0)
    momentum: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    weight_decay: float = bounded(1e-4, low=0.0)
    dropout: float = bounded(0.1, low=0.0, high=1.0, high_open=True)
    seed: int = 0

    def network(self, features: int) -> "UniverseNet":
        return UniverseNet(self.size, features, self.dropout)


def _torch_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class UniverseNet(nn.Module):
    """𝒰 (``embeddings`` ``[size, features]``) and the one-head attention of (T8).

    ``__call__`` takes no data (any arguments are ignored) and returns 𝒰, creating every
    parameter: ``init(rng)`` is the template of the stored variables. :meth:`refine` is (T8)'s
    attention on nodes ``[G, n, C]``: ``(X̂, A_g)``.
    """

    size: int = 32
    features: int = 32
    dropout: float = 0.1

    def setup(self):
        c = self.features
        self.embeddings = self.param("embeddings", lambda k, s: jax.random.normal(k, s) + 1.0 / self.size,
                                     (self.size, c))
        dense = lambda name: nn.Dense(c, kernel_init=_torch_uniform(c), bias_init=_torch_uniform(c), name=name)
        self.query, self.key, self.value, self.out = dense("query"), dense("key"), dense("value"), dense("out")
        self.norm = nn.LayerNorm(epsilon=1e-5)
        self.attention_dropout = nn.Dropout(self.dropout)
        self.output_dropout = nn.Dropout(self.dropout)

    def __call__(self, *_):
        self.refine(jnp.zeros((1, 1, self.features)))
        return self.embeddings

    def refine(self, nodes, train: bool = False):
        q, k, v = self.query(nodes), self.key(nodes), self.value(nodes)
        attention = jax.nn.softmax(jnp.einsum("gac,gbc->gab", q, k) / math.sqrt(self.features), axis=-1)
        attention = self.attention_dropout(attention, deterministic=not train)
        out = self.output_dropout(self.out(attention @ v), deterministic=not train)
        return self.norm(nodes + out), attention


def hippi(affinity, initial, num_graphs: int, num_nodes: int, *, tau: float = HIPPI_TAU,
          max_iter: int = HIPPI_ITERATIONS, tol: float = HIPPI_TOL):
    """(T9): ``affinity`` ``[G·n, G·n]``, ``initial`` ``[G·n, d]`` → the multi-matching ``[G·n, d]``."""
    d = initial.shape[1]

    def body(c):
        it, u, _ = c
        bu = affinity @ u
        v = bu @ (u.T @ bu)
        blocks = v.reshape(num_graphs, num_nodes, d)
        u_new = jax.vmap(lambda b: sinkhorn(b / tau, dummy_row=True))(blocks).reshape(-1, d)
        return it + 1, u_new, u

    def running(c):
        it, u, prev = c
        return (it < max_iter) & ((it == 0) | (jnp.linalg.norm(u - prev) >= tol))

    return jax.lax.while_loop(running, body, (jnp.int32(0), initial, initial))[1]


def universe_loss(params, net: UniverseNet, nodes, labels, rng):
    """(T8) on a batch of graphs: ``nodes`` ``[G, n, C]``, ``labels`` ``[G, n]`` (1-based)."""
    refined, attention = net.apply({"params": params}, nodes, train=True, rngs={"dropout": rng},
                                   method=UniverseNet.refine)
    g, n, c = nodes.shape
    points = params["embeddings"]
    soft = sinkhorn(refined.reshape(g * n, c) @ points.T / SOFT_TAU)
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).astype(soft.dtype)
    target = jax.lax.stop_gradient(hippi(same.T @ block_diagonal(attention) @ same, soft, g, n))
    return MATCHING_WEIGHT * jnp.mean((soft - target) ** 2) + FROBENIUS_WEIGHT * jnp.linalg.norm(points)


@jax.jit
def _graph_of(features, mask, index_template):
    """One source image's nodes, labels and positive count (``index_template``'s length is n)."""
    labels = smallest_area_labels(mask).reshape(-1)
    index, count = stride_positions(labels > 0, index_template.shape[0])
    return features.reshape(-1, features.shape[-1])[index], labels[index], count


def node_bank(model, variables, images, masks, num_nodes: int, chunk: int = 8):
    """Nodes and labels of every source image with foreground: ``(nodes [N, n, C], labels [N, n])``."""
    template = jnp.zeros((num_nodes,), jnp.int32)
    nodes, labels, counts = [], [], []
    for start in range(0, len(images), chunk):
        _, features = forward_source_stats(model, variables["params"], variables["batch_stats"],
                                           jnp.asarray(images[start:start + chunk], jnp.float32),
                                           return_features=True)
        for f, m in zip(features, jnp.asarray(masks[start:start + chunk])):
            for bank, part in zip((nodes, labels, counts), jax.device_get(_graph_of(f, m, template))):
                bank.append(part)
    nodes, labels, counts = np.stack(nodes), np.stack(labels), np.asarray(counts)
    keep = counts > 0
    return nodes[keep], labels[keep]


def train_universe(model, variables, images, masks, hp: UniverseHParams, log_every: int = 1000):
    """Learn 𝒰 on the source images and masks with the segmentor frozen; returns (variables, history)."""
    nodes, labels = node_bank(model, variables, images, masks, hp.nodes_per_image)
    if len(nodes) == 0:
        raise ValueError("the universe needs source masks with foreground; every source mask is empty")
    net = hp.network(nodes.shape[-1])
    key = jax.random.PRNGKey(hp.seed)
    init_key, key = jax.random.split(key)
    params = jax.jit(net.init)(init_key)["params"]
    optimizer = optax.chain(optax.add_decayed_weights(hp.weight_decay),
                            optax.sgd(hp.lr, momentum=hp.momentum or None))
    opt_state = optimizer.init(params)
    nodes, labels = jnp.asarray(nodes), jnp.asarray(labels)
    batch = min(hp.batch_size, len(nodes))

    @jax.jit
    def train_step(params, opt_state, key):
        k_pick, k_drop = jax.random.split(key)
        pick = jax.random.choice(k_pick, nodes.shape[0], (batch,), replace=False)
        loss, grads = jax.value_and_grad(universe_loss)(params, net, nodes[pick], labels[pick], k_drop)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = params["embeddings"]
    history = []
    for step in range(hp.steps):
        params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(key, step))
        if (step + 1) % log_every == 0 or step + 1 == hp.steps:
            moved = float(jnp.linalg.norm(params["embeddings"] - start) / jnp.linalg.norm(start))
            history.append({"step": step + 1, "loss": float(loss), "universe_change": moved})
            logging.info("universe: step %d/%d loss %.6f, ‖Δ𝒰‖/‖𝒰₀‖ %.4f", step + 1, hp.steps, float(loss), moved)
    return {"params": jax.device_get(params)}, history
