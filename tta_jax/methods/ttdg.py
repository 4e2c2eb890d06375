"""``ttdg``: test-time domain generalisation by universe learning and multi-graph matching (Lv et al., CVPR 2025).

Paper: X. Lv, X. Dong, L. Wang, J. Yang, L. Zhao, B. Pu, Z. Jin, X. Li, "Test-Time Domain
Generalization via Universe Learning: A Multi-Graph Matching Approach for Medical Image
Segmentation", CVPR 2025 (arXiv 2503.13012); official code github.com/Yore0/TTDG-MGM (a
Detectron2 Mask R-CNN). The paper's text was not available here (only its abstract), so the
equations below are stated from the official code and numbered (T1)–(T9) in this module; they
are not the paper's equation numbers. The source-stage part, (T8)–(T9), is
:mod:`tta_jax.source.universe`.

Notation: an image gives a graph g of n nodes ``X_g ∈ R^{n×C}``; the universe ``𝒰 ∈ R^{d×C}``
(d = 32 points, learned at source time) is the common reference every graph is matched to, so
that the pairwise matchings ``X_ij = U_i U_jᵀ`` it induces are cycle-consistent.

(T1) nodes: the positive locations ``P`` (any channel with σ(z) > 0.5) of the current
     prediction in raster order; ``X_g = F[P[⌊k·|P|/n⌋]]``, k = 0..n−1, ``F`` the decoder's
     last feature map (:func:`stride_positions`).
(T2) pairwise affinity, a learned network adapted at test time (official ``Affinity``):
     ``M_ij[a, b] = w₂ᵀ ReLU(W₁ [P_s x_a ; P_t y_b] + b₁) + b₂``, x ∈ X_i, y ∈ X_j, i ≥ j.
(T3) pairwise soft matching: ``S_ij = Sinkhorn(M_ij / τ_p)``, τ_p = 0.05, 20 alternating
     normalisations (rows first); block (i, j) of the matrix ``W`` is ``S_ij`` for i ≥ j (the
     diagonal ``S_ii`` included) and ``S_jiᵀ`` for i < j (:func:`sinkhorn`, :func:`pairwise_matchings`).
(T4) intra-graph edges: ``A_g = softmax(Q_g K_gᵀ / √C)`` of a randomly initialised attention,
     dropout 0.1, zero diagonal; ``A = blockdiag(A_g)`` (:func:`attention_adjacency`).
(T5) initial multi-matching from the universe: ``U⁰_g = X_g 𝒰ᵀ`` (raw dot products).
(T6) graduated assignment (official ``GA_GM``, one cluster): ``V = (2λ A (U Uᵀ) A U + W U)/G``
     and ``U_g ← Sinkhorn(V_g / τ)`` with dummy rows, τ = 0.1, 0.05, …, 0.00625 (halved while
     above 0.01), each τ until ``‖U − U_prev‖ < 10⁻³``, a 2-cycle, or 200 iterations; then
     ``U_g ← Hungarian(V_g)`` the same way. λ = 0.5; with G = 2 graphs the first is pinned to
     ``U_1 = I`` (:func:`graduated_assignment`, :func:`hungarian`).
(T7) test-time loss: the pairwise soft matchings are trained towards the cycle-consistent
     matchings, ``L = 1/|𝒫| Σ_{(i<j)∈𝒫} mean_ab FL(S_ji[b, a], [U_i U_jᵀ]_ab)`` with the focal
     BCE ``FL(p, t) = −α(1−p)^γ t log p − (1−α) p^γ (1−t) log(1−p)``, α = 0.25, γ = 2,
     p clipped to [10⁻⁶, 1 − 10⁻⁶] (official ``PermutationLoss`` → ``BCEFocalLoss``).

Gradients: U (T6) is a constant (its last projection is a Hungarian assignment; the official
code detaches W and U⁰ too); L reaches the network through the current image's node features
in (T2)–(T3), and the affinity network (T2). SGD (lr 0.005, ``configs/test_segment.yaml``;
momentum 0.9 and weight decay 10⁻⁴, Detectron2's defaults) updates every non-BatchNorm weight of
the segmentor and the affinity network, one step per image; then the image is predicted.

Choices and deviations, where the per-pixel ResUNet, batch size 1 and adapt-then-predict
differ from the official detector:

* **Graphs of one image each, from a queue** (:class:`GraphQueue`). The official graphs are the
  images of a test batch (``TEST.BATCH`` 4); with one image the official code returns no loss
  and does not adapt. Here the pseudo-batch is the current image and the node features of the
  ``queue_size = 3`` previous images (constants, computed with the parameters of their own step,
  as SPEGC's queue), in stream order. Fewer than two graphs, or no foreground in the current
  image: no update (``info["adapted"] = 0``).
* **Nodes (T1).** The official nodes are FPN features (p2–p6, 256 channels) at the locations
  inside the predicted boxes, each level subsampled with a raster-order stride ⌊count/10⌋
  (10–19 nodes per level, a variable number). Here: one level, the decoder's last feature map
  (the segmentation head's input, ``return_features``), the positives of the predicted mask,
  and a fixed ``nodes_per_image`` (16, within the official per-level range) at evenly spaced
  raster ranks, so the step has one shape; with fewer positives than nodes some repeat. The
  labels of the official nodes (box classes) only count nodes at test time, so none are kept.
* **Adapted parameters.** Detectron2's ResNet uses frozen BatchNorm (source statistics, no
  trainable affine), so here the forward uses the source statistics and every BN parameter is
  frozen; all other segmentor weights are adapted. The official backbone also freezes its stem
  and first stage (``FREEZE_AT`` 2); method code does not rely on the segmentor's layer names,
  so those are adapted here. The official RPN/ROI heads receive no gradient (they do not
  depend on the loss); the ResUNet's segmentation head receives none either, but weight decay
  (10⁻⁴ × lr per step) still applies to it, as to every adapted leaf.
* **Attention (T4)** is randomly initialised (PyTorch ``Linear`` default) per stream and never
  trained (the official module gets no gradient through the Hungarian step); only its
  query/key projections matter for ``A``, so its value/output layers are not built. Its
  dropout (the official module runs in train mode) uses the step's RNG.
* **Affinity (T2)** is also initialised at test time (normal, std 0.01; biases 0), as in the
  official checkpoint, where it is never trained at source time; its width follows the
  feature channels C (official: 256). With three layers that small, each layer's gradient is
  scaled by the other two: the pairwise matchings stay uniform (L ≈ 0.0383 for n = 16) and the
  network hardly moves over short streams. ``affinity_init_std`` is the override.
* **Sinkhorn** is OTT-JAX's (:func:`sinkhorn`), unrolled; the official (pygmtools) iteration
  order and dummy rows (log-score −100) are kept exactly, so 20 normalisations are 10 OTT
  iterations. **Hungarian** is an exact O(n²m) shortest-augmenting-path solver in JAX.
* **Online, continual.** The official code adapts over the whole test set, then evaluates it
  with the final weights; here each image is adapted on and then predicted, the stream never
  reset by the method (the runner's policy decides).
* **Universe.** Learned in a separate source stage after the segmentor, the segmentor frozen
  (official: jointly, L_U also shaping the backbone); see :mod:`tta_jax.source.universe`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.bn import forward_source_stats, merge_params, split_bn_params
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, SourceNeeds, check_step_input, keep_if_finite, register

SINKHORN_ITERATIONS = 20       # every official Sinkhorn: max_iter 20 (row and column steps counted apart)
DUMMY_LOG_SCORE = -100.0       # pygmtools' log-score of a dummy row
FOCAL_CLIP = 1e-6


@dataclasses.dataclass(frozen=True)
class TTDGHParams:
    """TTDG's test-time settings; defaults are the official code's (see the module docstring).

    Attributes:
      lr, momentum, weight_decay: SGD on the non-BN segmentor weights and the affinity network.
      nodes_per_image: n, nodes sampled from an image's predicted foreground (T1).
      queue_size: previous images whose graphs join the current one (official test batch − 1).
      pairwise_tau: τ_p of the pairwise Sinkhorn (T3).
      quad_weight: λ of the quadratic term (T6).
      mgm_tau, mgm_min_tau, mgm_tau_decay: the graduated-assignment schedule (T6).
      mgm_max_iter, mgm_tol: iterations per τ and the convergence tolerance on ‖ΔU‖_F (T6).
      focal_alpha, focal_gamma: the focal BCE (T7).
      attention_dropout: dropout on the intra-graph attention (T4).
      affinity_init_std: the standard deviation of (T2)'s initial weights (official 0.01).
    """

    lr: float = bounded(0.005, low=0.0)
    momentum: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    weight_decay: float = bounded(1e-4, low=0.0)
    nodes_per_image: int = bounded(16, low=1)
    queue_size: int = bounded(3, low=1)
    pairwise_tau: float = bounded(0.05, low=0.0, low_open=True)
    quad_weight: float = bounded(0.5, low=0.0)
    mgm_tau: float = bounded(0.1, low=0.0, low_open=True)
    mgm_min_tau: float = bounded(0.01, low=0.0, low_open=True)
    mgm_tau_decay: float = bounded(0.5, low=0.0, high=1.0, low_open=True, high_open=True)
    mgm_max_iter: int = bounded(200, low=1)
    mgm_tol: float = bounded(1e-3, low=0.0)
    focal_alpha: float = bounded(0.25, low=0.0, high=1.0)
    focal_gamma: float = bounded(2.0, low=0.0)
    attention_dropout: float = bounded(0.1, low=0.0, high=1.0, high_open=True)
    affinity_init_std: float = bounded(0.01, low=0.0)


# --------------------------------------------------------------------------- matching primitives

def sinkhorn(log_scores, iterations: int = SINKHORN_ITERATIONS, dummy_row: bool = False):
    """pygmtools' Sinkhorn on ``exp(log_scores)`` (``log_scores = s/τ``), with OTT-JAX.

    The shorter side is normalised first (rows of a wide matrix; a tall one is transposed and
    transposed back), then the two sides alternate, ``iterations`` normalisations in all (even).
    ``dummy_row`` pads the shorter side to a square with log-score −100 first and drops the
    padding after: each entry of the shorter side (a node) then sums to about 1, each of the
    longer side (a universe point) to at most 1. Without dummy rows a non-square matrix is scaled
    the same way (OTT does not normalise the marginals), ending with the longer side summing to
    1. Differentiable (unrolled).
    """
    if iterations % 2:
        raise ValueError(f"sinkhorn: iterations must be even (row and column steps in pairs), got {iterations}")
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    transposed = log_scores.shape[0] > log_scores.shape[1]
    s = log_scores.T if transposed else log_scores
    rows, cols = s.shape
    if dummy_row and rows < cols:
        s = jnp.concatenate([s, jnp.full((cols - rows, cols), DUMMY_LOG_SCORE, s.dtype)])
    # OTT updates the column potential first: solving on sᵀ normalises s's rows first and its
    # columns last, the pygmtools order. Threshold 0 runs every iteration; min_iterations stays
    # below max_iterations (ott-jax 0.6.0's gradient is wrong when they are equal, see spegc).
    geom = geometry.Geometry(cost_matrix=-s.T, epsilon=1.0)
    problem = linear_problem.LinearProblem(geom, jnp.ones((s.shape[1],), s.dtype), jnp.ones((s.shape[0],), s.dtype))
    solver = ott_sinkhorn.Sinkhorn(threshold=0.0, inner_iterations=1, min_iterations=0,
                                   max_iterations=iterations // 2, implicit_diff=None)
    plan = solver(problem).matrix.T[:rows]
    return plan.T if transposed else plan


def _hungarian_wide(cost):
    """Minimum-cost assignment of every row of ``cost`` ``[n, m]`` (n ≤ m) to a distinct column.

    The shortest-augmenting-path Hungarian algorithm with row/column potentials, one row added
    at a time (O(n²m)); indices are 1-based with a virtual column 0, as in its textbook form.
    """
    n, m = cost.shape
    a = jnp.zeros((n + 1, m + 1), cost.dtype).at[1:, 1:].set(cost)
    cols = jnp.arange(m + 1)
    inf = jnp.array(jnp.inf, cost.dtype)

    def add_row(i, carry):
        u, v, p, way = carry
        p = p.at[0].set(i)

        def searching(c):
            _, _, p, _, _, _, j0, k = c
            return (p[j0] != 0) & (k <= m)

        def search(c):
            u, v, p, way, minv, used, j0, k = c
            used = used.at[j0].set(True)
            i0 = p[j0]
            free = (~used) & (cols > 0)
            reduced = a[i0] - u[i0] - v
            better = free & (reduced < minv)
            minv = jnp.where(better, reduced, minv)
            way = jnp.where(better, j0, way)
            candidates = jnp.where(free, minv, inf)
            j1 = jnp.argmin(candidates).astype(jnp.int32)
            delta = candidates[j1]
            u = u.at[p].add(jnp.where(used, delta, 0.0))
            v = v - jnp.where(used, delta, 0.0)
            minv = jnp.where(free, minv - delta, minv)
            return u, v, p, way, minv, used, j1, k + 1

        start = (u, v, p, way, jnp.full((m + 1,), inf), jnp.zeros((m + 1,), bool), jnp.int32(0), jnp.int32(0))
        u, v, p, way, _, _, j0, _ = jax.lax.while_loop(searching, search, start)

        def augment(c):
            p, j0 = c
            j1 = way[j0]
            return p.at[j0].set(p[j1]), j1

        p, _ = jax.lax.while_loop(lambda c: c[1] != 0, augment, (p, j0))
        return u, v, p, way

    start = (jnp.zeros((n + 1,), cost.dtype), jnp.zeros((m + 1,), cost.dtype),
             jnp.zeros((m + 1,), jnp.int32), jnp.zeros((m + 1,), jnp.int32))
    _, _, p, _ = jax.lax.fori_loop(1, n + 1, add_row, start)
    return jnp.zeros((n + 1, m + 1), cost.dtype).at[p, cols].set(1.0)[1:, 1:]


def hungarian(scores):
    """The 0/1 assignment maximising ``Σ scores`` (official ``hungarian``: scipy on ``−scores``).

    ``[n, m]``: every row of the shorter side gets one distinct column of the longer side.
    Non-finite scores count as 0, so a diverged input still terminates (its loss is then
    non-finite and the step is rejected).
    """
    cost = -jnp.where(jnp.isfinite(scores), scores, 0.0)
    if cost.shape[0] > cost.shape[1]:
        return _hungarian_wide(cost.T).T
    return _hungarian_wide(cost)


def stride_positions(positive, num_nodes: int):
    """(T1): flat indices of ``num_nodes`` positives of ``positive`` ``[L]`` at ranks ⌊k·count/n⌋.

    Returns ``(indices [n], count)``. With no positive the indices are meaningless (count 0).
    """
    count = jnp.sum(positive.astype(jnp.int32))
    ranks = (jnp.arange(num_nodes, dtype=jnp.int32) * count) // num_nodes
    cumulative = jnp.cumsum(positive.astype(jnp.int32))
    index = jnp.searchsorted(cumulative, ranks + 1, side="left")
    return jnp.minimum(index, positive.shape[0] - 1), count


def smallest_area_labels(mask):
    """Per-location label (``[H, W]``, 0 = background) of a multi-label mask ``[H, W, C]``.

    A location inside several channels takes the one with the smallest area (1-based), the
    official rule for a location inside several boxes (FCOS target assignment): in fundus the
    cup inside the disc is labelled cup. Used by the source stage's label-equality matrix (T8).
    """
    positive = mask > 0
    area = jnp.sum(positive, axis=(0, 1)).astype(jnp.float32)
    smallest = jnp.argmin(jnp.where(positive, area, jnp.inf), axis=-1)
    return jnp.where(jnp.any(positive, axis=-1), smallest + 1, 0)


def block_diagonal(blocks):
    """``[G, n, n]`` → the ``[G·n, G·n]`` block-diagonal matrix."""
    g, n, _ = blocks.shape
    eye = jnp.eye(g, dtype=blocks.dtype)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(g * n, g * n)


def _torch_linear_init(key, fan_in: int, shape):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def init_attention(rng, channels: int) -> dict:
    """(T4)'s query/key projections with PyTorch ``Linear``'s default initialisation."""
    ks = jax.random.split(rng, 4)
    return {"query": {"kernel": _torch_linear_init(ks[0], channels, (channels, channels)),
                      "bias": _torch_linear_init(ks[1], channels, (channels,))},
            "key": {"kernel": _torch_linear_init(ks[2], channels, (channels, channels)),
                    "bias": _torch_linear_init(ks[3], channels, (channels,))}}


def attention_adjacency(params, nodes, rng, dropout: float):
    """(T4): ``[G, n, C]`` → ``[G, n, n]`` attention weights (dropout applied, diagonal zero)."""
    q = nodes @ params["query"]["kernel"] + params["query"]["bias"]
    k = nodes @ params["key"]["kernel"] + params["key"]["bias"]
    attention = jax.nn.softmax(jnp.einsum("gac,gbc->gab", q, k) / math.sqrt(nodes.shape[-1]), axis=-1)
    if dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, attention.shape)
        attention = jnp.where(keep, attention / (1.0 - dropout), 0.0)
    return attention * (1.0 - jnp.eye(nodes.shape[1], dtype=attention.dtype))


def init_affinity(rng, channels: int, std: float = 0.01) -> dict:
    """(T2)'s network: two bias-free projections C → C, then 2C → 2C → 1; weights N(0, std²), biases 0."""
    ks = jax.random.split(rng, 4)
    normal = lambda k, shape: std * jax.random.normal(k, shape)
    return {"project_source": normal(ks[0], (channels, channels)),
            "project_target": normal(ks[1], (channels, channels)),
            "hidden": {"kernel": normal(ks[2], (2 * channels, 2 * channels)), "bias": jnp.zeros((2 * channels,))},
            "out": {"kernel": normal(ks[3], (2 * channels, 1)), "bias": jnp.zeros((1,))}}


def affinity(params, x, y):
    """(T2): ``[n_x, C]``, ``[n_y, C]`` → ``M [n_x, n_y]``; the MLP on the concatenation, split by halves."""
    xp, yp = x @ params["project_source"], y @ params["project_target"]
    w1 = params["hidden"]["kernel"]
    c = xp.shape[-1]
    h = jax.nn.relu((xp @ w1[:c])[:, None, :] + (yp @ w1[c:])[None, :, :] + params["hidden"]["bias"])
    return (h @ params["out"]["kernel"])[..., 0] + params["out"]["bias"][0]


def pairwise_matchings(params, nodes, tau: float):
    """(T2)–(T3): ``[G, n, C]`` → the blocks ``W4 [G, G, n, n]`` of the pairwise soft matchings.

    As the official loop: for every ordered pair with i ≥ j, ``S = Sinkhorn(M(X_i, X_j)/τ)``
    (dummy rows) goes to block (i, j) and ``Sᵀ`` to block (j, i).
    """
    g = nodes.shape[0]
    src, tgt = (jnp.array(ix) for ix in zip(*[(i, j) for i in range(g) for j in range(i + 1)]))
    blocks = jax.vmap(lambda i, j: sinkhorn(affinity(params, nodes[i], nodes[j]) / tau, dummy_row=True))(src, tgt)
    out = jnp.zeros((g, g) + blocks.shape[1:], blocks.dtype)
    out = out.at[tgt, src].set(jnp.swapaxes(blocks, 1, 2))
    return out.at[src, tgt].set(blocks)


def blocks_to_matrix(blocks):
    """``[G, G, n, m]`` → ``[G·n, G·m]``."""
    g, _, n, m = blocks.shape
    return blocks.transpose(0, 2, 1, 3).reshape(g * n, g * m)


def mgm_taus(tau: float, min_tau: float, decay: float) -> list[float]:
    """(T6)'s Sinkhorn temperatures: τ, then ×decay while the last one exceeds ``min_tau``."""
    taus = [tau]
    while taus[-1] > min_tau:
        taus.append(taus[-1] * decay)
    return taus


def graduated_assignment(adjacency, pairwise, initial, graph_valid, num_nodes: int, *, quad_weight: float = 0.5,
                         taus=(0.1, 0.05, 0.025, 0.0125, 0.00625), max_iter: int = 200, tol: float = 1e-3):
    """(T6): the official ``GA_GM.gagm`` with one cluster (all cluster weights 1).

    Args:
      adjacency: ``A`` ``[G·n, G·n]``; pairwise: ``W`` ``[G·n, G·n]``; initial: ``U⁰`` ``[G·n, d]``.
      graph_valid: ``[G]``, which graph slots hold a graph (the others are left out: their rows
        and columns are zeroed and they do not count in G).
    Returns ``U`` ``[G·n, d]``: per valid graph a 0/1 node-to-universe assignment (zero rows for
    empty slots).
    """
    g = graph_valid.shape[0]
    d = initial.shape[1]
    node_valid = jnp.repeat(graph_valid, num_nodes)
    pair_valid = node_valid[:, None] & node_valid[None, :]
    a = jnp.where(pair_valid, adjacency, 0.0)
    w = jnp.where(pair_valid, pairwise, 0.0)
    num_graphs = jnp.sum(graph_valid)
    first_rows = (jnp.arange(g * num_nodes) // num_nodes == jnp.argmax(graph_valid))[:, None]
    pin = first_rows & (num_graphs == 2)
    identity = jnp.tile(jnp.eye(num_nodes, d, dtype=initial.dtype), (g, 1))
    keep_rows = node_valid[:, None]

    def direction(u):
        return ((2.0 * quad_weight) * (a @ ((u @ u.T) @ (a @ u))) + w @ u) / jnp.maximum(num_graphs, 1)

    def finish(u):
        return jnp.where(keep_rows, jnp.where(pin, identity, u), 0.0)

    def by_sinkhorn(v, tau):
        blocks = v.reshape(g, num_nodes, d)
        return jax.vmap(lambda b: sinkhorn(b / tau, dummy_row=True))(blocks).reshape(g * num_nodes, d)

    def by_hungarian(v):
        return jax.vmap(hungarian)(v.reshape(g, num_nodes, d)).reshape(g * num_nodes, d)

    def converged(u_new, u, prev):
        return (jnp.linalg.norm(u_new - u) < tol) | (jnp.linalg.norm(u_new - prev) == 0)

    tau_table = jnp.asarray(taus, initial.dtype)

    def sinkhorn_stage(c):
        stage, it, u, prev = c
        u_new = finish(by_sinkhorn(direction(u), tau_table[stage]))
        done = converged(u_new, u, prev) | (it + 1 >= max_iter)
        return stage + done.astype(jnp.int32), jnp.where(done, 0, it + 1), u_new, u

    u0 = jnp.where(keep_rows, initial, 0.0)
    _, _, u, prev = jax.lax.while_loop(lambda c: c[0] < len(taus), sinkhorn_stage,
                                       (jnp.int32(0), jnp.int32(0), u0, jnp.zeros_like(u0)))

    def hungarian_stage(c):
        it, u, prev, _ = c
        u_new = finish(by_hungarian(direction(u)))
        return it + 1, u_new, u, converged(u_new, u, prev)

    _, u, _, _ = jax.lax.while_loop(lambda c: (~c[3]) & (c[0] < max_iter), hungarian_stage,
                                    (jnp.int32(0), u, prev, jnp.array(False)))
    return u


def focal_bce(p, target, alpha: float = 0.25, gamma: float = 2.0):
    """(T7)'s elementwise focal BCE of a probability ``p`` against a 0/1 ``target``."""
    p = jnp.clip(p, FOCAL_CLIP, 1.0 - FOCAL_CLIP)
    return (-alpha * (1.0 - p) ** gamma * target * jnp.log(p)
            - (1.0 - alpha) * p ** gamma * (1.0 - target) * jnp.log(1.0 - p))


def matching_loss(pairwise_blocks, assignment, graph_valid, alpha: float = 0.25, gamma: float = 2.0):
    """(T7): mean over valid pairs i < j of the mean focal BCE of block (i, j) against ``U_i U_jᵀ``.

    ``pairwise_blocks`` ``[G, G, n, n]``, ``assignment`` ``[G, n, d]``. Returns ``(loss, pairs)``.
    """
    g = graph_valid.shape[0]
    targets = jnp.einsum("iad,jbd->ijab", assignment, assignment)
    per_pair = jnp.mean(focal_bce(pairwise_blocks, targets, alpha, gamma), axis=(2, 3))
    upper = jnp.triu(jnp.ones((g, g), bool), k=1) & graph_valid[:, None] & graph_valid[None, :]
    pairs = jnp.sum(upper)
    return jnp.sum(jnp.where(upper, per_pair, 0.0)) / jnp.maximum(pairs, 1), pairs


# --------------------------------------------------------------------------- the method

class GraphQueue(NamedTuple):
    """Node features of the previous images, oldest first (constants); ``valid`` marks filled slots."""

    nodes: jax.Array     # [Q, n, C]
    valid: jax.Array     # [Q]


def push_graph(queue: GraphQueue, nodes, push) -> GraphQueue:
    """Append ``nodes`` (stop-gradient) as the newest graph when ``push``; the oldest falls out."""
    shifted = GraphQueue(jnp.concatenate([queue.nodes[1:], jax.lax.stop_gradient(nodes)[None]]),
                         jnp.concatenate([queue.valid[1:], jnp.ones((1,), bool)]))
    return jax.tree.map(lambda new, old: jnp.where(push, new, old), shifted, queue)


class TTDGState(NamedTuple):
    trainable: Any       # {"net": non-BN segmentor params, "affinity": (T2)}
    bn_params: Any       # frozen BN affine parameters
    batch_stats: Any     # source statistics
    universe: Any        # 𝒰 [d, C] from the source stage
    attention: Any       # (T4)'s fixed random projections
    opt_state: Any
    queue: GraphQueue


STREAM_AXES = TTDGState(trainable=0, bn_params=None, batch_stats=None, universe=None, attention=0, opt_state=0,
                        queue=0)


@register("ttdg", TTDGHParams, needs=lambda hp: SourceNeeds(companions=("universe",)))
def make(model, hp: TTDGHParams, universe=None) -> Method:
    """``universe``: the source stage's universe network (:class:`tta_jax.source.universe.UniverseNet`);
    the step reads only its learned points, ``variables["universe"]["params"]["embeddings"]``."""
    del universe
    n = hp.nodes_per_image
    taus = tuple(mgm_taus(hp.mgm_tau, hp.mgm_min_tau, hp.mgm_tau_decay))
    optimizer = optax.chain(optax.add_decayed_weights(hp.weight_decay), optax.sgd(hp.lr, momentum=hp.momentum or None))

    def forward(net_params, state, images):
        return forward_source_stats(model, merge_params(net_params, state.bn_params), state.batch_stats, images,
                                    return_features=True)

    def total_loss(trainable, state, images, rng):
        logits, features = forward(trainable["net"], state, images)
        logits, features = logits[0].reshape(-1, logits.shape[-1]), features[0].reshape(-1, features.shape[-1])
        positive = jnp.any(jax.lax.stop_gradient(logits) > 0.0, axis=-1)
        index, count = stride_positions(positive, n)
        nodes = features[index]
        has_graph = count > 0
        queue = state.queue
        all_nodes = jnp.concatenate([queue.nodes, nodes[None]])
        graph_valid = jnp.concatenate([queue.valid, has_graph[None]])
        blocks = pairwise_matchings(trainable["affinity"], all_nodes, hp.pairwise_tau)
        fixed_nodes = jax.lax.stop_gradient(all_nodes)
        adjacency = block_diagonal(attention_adjacency(state.attention, fixed_nodes, rng, hp.attention_dropout))
        initial = fixed_nodes.reshape(-1, fixed_nodes.shape[-1]) @ state.universe.T
        assignment = jax.lax.stop_gradient(graduated_assignment(
            adjacency, jax.lax.stop_gradient(blocks_to_matrix(blocks)), initial, graph_valid, n,
            quad_weight=hp.quad_weight, taus=taus, max_iter=hp.mgm_max_iter, tol=hp.mgm_tol))
        loss, pairs = matching_loss(blocks, assignment.reshape(graph_valid.shape[0], n, -1), graph_valid,
                                    hp.focal_alpha, hp.focal_gamma)
        adapt = has_graph & (jnp.sum(graph_valid) >= 2)
        aux = {"nodes": nodes, "has_graph": has_graph, "adapt": adapt,
               "info": {"graphs": jnp.sum(graph_valid).astype(jnp.float32), "pairs": pairs.astype(jnp.float32),
                        "foreground": jnp.mean(positive.astype(jnp.float32))}}
        return loss, aux

    def init(variables, rng):
        if "universe" not in variables:
            raise ValueError("ttdg needs the universe learned at source time: variables['universe'] is missing "
                             "(the source stage learns it when a method needs it)")
        rng = jax.random.PRNGKey(0) if rng is None else rng
        points = jnp.asarray(variables["universe"]["params"]["embeddings"])
        _, features = jax.eval_shape(
            lambda v: forward_source_stats(model, v["params"], v["batch_stats"], jnp.zeros((1, 32, 32, 3)),
                                           return_features=True), variables)
        channels = features.shape[-1]
        if points.ndim != 2 or points.shape[1] != channels:
            raise ValueError(f"ttdg: the universe has shape {points.shape}, the segmentor's features have "
                             f"{channels} channels")
        bn, rest = split_bn_params(variables["params"], variables["batch_stats"])
        k_affinity, k_attention = jax.random.split(rng)
        trainable = {"net": rest, "affinity": init_affinity(k_affinity, channels, hp.affinity_init_std)}
        queue = GraphQueue(jnp.zeros((hp.queue_size, n, channels), features.dtype), jnp.zeros((hp.queue_size,), bool))
        return TTDGState(trainable, bn, variables["batch_stats"], points, init_attention(k_attention, channels),
                         optimizer.init(trainable), queue)

    def step(state, images, rng):
        check_step_input(images)
        (loss, aux), grads = jax.value_and_grad(total_loss, has_aux=True)(state.trainable, state, images, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        stepped = (optax.apply_updates(state.trainable, updates), opt_state)
        trainable, opt_state = jax.lax.cond(aux["adapt"], lambda: stepped, lambda: (state.trainable, state.opt_state))
        new = state._replace(trainable=trainable, opt_state=opt_state,
                             queue=push_graph(state.queue, aux["nodes"], aux["has_graph"]))
        new, ok = keep_if_finite(new, state, loss)
        logits, _ = forward(new.trainable["net"], new, images)
        adapted = (aux["adapt"] & ok).astype(jnp.float32)
        return new, logits, {"loss": loss, "skipped": 1.0 - ok.astype(jnp.float32), "adapted": adapted,
                             **aux["info"]}

    return Method("ttdg", init, step, stream_axes=STREAM_AXES)
