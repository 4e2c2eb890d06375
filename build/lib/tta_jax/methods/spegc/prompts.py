"""SPEGC's Semantic Prompt Feature Enhancement (SPFE, paper §3.2, Eq. 2–7) and clustering loss (Eq. 17).

Node features ``V`` (``[n, h]``, one image) are pooled into a query ``q̂`` with
a learnable vector ``c_p`` (Eq. 2). The query retrieves from two pools of
``M`` learnable prompts: the *commonality* pool by reverse attention
``ReLU(−cos)`` (Eq. 3, 5) and the *heterogeneity* pool by ``softmax(cos)``
(Eq. 4, 6). Both prompts are added to every node (Eq. 7). The clustering loss
pulls the commonality prompts of the images of a pseudo-batch together
(Eq. 17).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

COSINE_EPS = 1e-8


def _safe_norm(x: jax.Array) -> jax.Array:
    # ‖x‖ has an infinite gradient at 0 (a commonality prompt is exactly 0 when every
    # reverse-attention weight is cut by the ReLU); the eps inside the root keeps it finite.
    return jnp.sqrt(jnp.sum(x * x, axis=-1) + COSINE_EPS**2)


def cosine_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
    """γ(x, y): cosine similarity of the last axes, broadcasting; a zero vector has cosine 0 with anything."""
    return jnp.sum(x * y, axis=-1) / (_safe_norm(x) * _safe_norm(y))


def attention_pool(nodes: jax.Array, pool_vector: jax.Array) -> jax.Array:
    """Eq. 2: q̂ = Vᵀ softmax(V c_p) — attention pooling of ``[n, h]`` nodes into a ``[h]`` query."""
    return nodes.T @ jax.nn.softmax(nodes @ pool_vector)


def commonality_weights(query: jax.Array, pool: jax.Array) -> jax.Array:
    """Eq. 3: α_CO = ReLU(−γ(q̂, P_CO)) — reverse attention, only prompts that *mismatch* the query."""
    return jax.nn.relu(-cosine_similarity(query[None, :], pool))


def heterogeneity_weights(query: jax.Array, pool: jax.Array) -> jax.Array:
    """Eq. 4: α_HE = softmax(γ(q̂, P_HE)) — standard attention over the heterogeneity pool."""
    return jax.nn.softmax(cosine_similarity(query[None, :], pool))


def retrieve_prompt(weights: jax.Array, pool: jax.Array) -> jax.Array:
    """Eq. 5–6: p = Σ_j α_j P_j over the ``M`` prompts of a pool."""
    return weights @ pool


def enhance_nodes(nodes, pool_vector, commonality_pool=None, heterogeneity_pool=None):
    """Eq. 7: V* = V + p_CO + p_HE. A pool given as ``None`` is switched off (Table 4 ablations).

    Returns ``(V*, p_CO)``; ``p_CO`` is zeros when the commonality pool is off.
    """
    query = attention_pool(nodes, pool_vector)
    p_co = jnp.zeros_like(query)
    enhanced = nodes
    if commonality_pool is not None:
        p_co = retrieve_prompt(commonality_weights(query, commonality_pool), commonality_pool)
        enhanced = enhanced + p_co
    if heterogeneity_pool is not None:
        enhanced = enhanced + retrieve_prompt(heterogeneity_weights(query, heterogeneity_pool), heterogeneity_pool)
    return enhanced, p_co


def clustering_loss(commonality_prompts: jax.Array, valid: jax.Array) -> jax.Array:
    """Eq. 17: L_C = 1/|B| Σ_{i,j∈B} (1 − cos(p_CO(i), p_CO(j))).

    ``commonality_prompts``: ``[B, h]`` (current image and queue); ``valid``:
    ``[B]`` booleans, the queue entries already filled. Normalised by |B| as in
    the paper (not |B|²).
    """
    pair = (valid[:, None] & valid[None, :]).astype(commonality_prompts.dtype)
    cos = cosine_similarity(commonality_prompts[:, None, :], commonality_prompts[None, :, :])
    return jnp.sum(pair * (1 - cos)) / jnp.maximum(jnp.sum(valid), 1)
