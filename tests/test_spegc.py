"""SPEGC: the OT edge selection, SPFE prompts, node sampling, queue, and the step (paper §3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax.methods.spegc.graph_clustering import (SinkhornHParams, edge_selection_cost, graph_consistency_loss,
                                      refined_graph, sinkhorn_edge_selection)
from tta_jax.methods import make_method
from tta_jax.methods.spegc import (NodeQueue, empty_queue, mc_dropout_uncertainty, push_queue,
                                   select_node_locations)
from tta_jax.methods.spegc.prompts import (attention_pool, clustering_loss, commonality_weights, enhance_nodes,
                             heterogeneity_weights)
from tta_jax.runner import StreamRunner

SMALL = {"nodes_per_image": 16, "clusters": 8, "hidden": 32, "num_prompts": 4, "queue_size": 3}


def _edges(n_valid_nodes=20, n_nodes=24, seed=0):
    d = jax.random.uniform(jax.random.PRNGKey(seed), (n_nodes * n_nodes,))
    node_valid = jnp.arange(n_nodes) < n_valid_nodes
    return d, (node_valid[:, None] & node_valid[None, :]).reshape(-1)


def test_sinkhorn_plan_meets_both_marginals():
    d, valid = _edges()
    n_valid, k = int(valid.sum()), 37
    select = sinkhorn_edge_selection(d, valid, k, SinkhornHParams(iterations=50))
    cost = edge_selection_cost(d, valid)
    # Rebuild the full plan: reject = row mass − select.
    assert select.shape == d.shape and float(jnp.max(jnp.abs(jnp.where(valid, 0.0, select)))) == 0.0
    assert float(jnp.min(select)) >= 0 and float(jnp.max(select)) <= 1 + 1e-3
    np.testing.assert_allclose(float(jnp.sum(select)), k, atol=1e-3)          # column marginal of "select"
    assert cost.shape == (d.shape[0], 2)
    np.testing.assert_allclose(np.asarray(cost[valid].sum(1)), 1.0, rtol=1e-6)   # reject + select costs


def test_sinkhorn_rows_and_columns_from_ott_plan():
    """Both marginals of the raw OTT plan (rows 1, columns [E−k, k] after the ×E rescale), tolerance 1e-3."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn
    d, valid = _edges(n_valid_nodes=24)
    e, k = d.shape[0], 50.0
    geom = geometry.Geometry(cost_matrix=edge_selection_cost(d, valid), epsilon=0.05)
    out = sinkhorn.Sinkhorn(threshold=0.0, min_iterations=0, max_iterations=20, inner_iterations=1)(
        linear_problem.LinearProblem(geom, jnp.ones(e) / e, jnp.array([e - k, k]) / e))
    plan = out.matrix * e
    np.testing.assert_allclose(np.asarray(plan.sum(1)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(plan.sum(0)), [e - k, k], atol=1e-3 * e)
    select = sinkhorn_edge_selection(d, valid, k)
    np.testing.assert_allclose(np.asarray(select), np.asarray(plan[:, 1]), atol=1e-5)


def test_refined_graph_mass_is_k_and_ignores_empty_queue_slots():
    nodes = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
    valid = jnp.arange(32) < 24
    refined, k = refined_graph(nodes, valid, jnp.eye(8), jnp.eye(8), num_clusters=6, temperature=0.1,
                               hp=SinkhornHParams(iterations=50))
    assert int(k) == 24 - 6
    np.testing.assert_allclose(float(refined.sum()), 18.0, rtol=1e-3)
    assert float(jnp.abs(refined[24:]).sum() + jnp.abs(refined[:, 24:]).sum()) == 0.0


def test_select_column_concentrates_on_top_k_as_epsilon_shrinks():
    d, valid = _edges(n_valid_nodes=24, n_nodes=24, seed=3)
    k = 40
    top = np.argsort(-np.asarray(d))[:k]
    mass = []
    for eps in (0.05, 0.01, 0.002):
        select = sinkhorn_edge_selection(d, valid, k, SinkhornHParams(epsilon=eps, iterations=500))
        mass.append(float(select[top].sum()) / k)
    assert mass[0] < mass[1] < mass[2] and mass[2] > 0.9


@pytest.mark.integration
def test_selection_gradient_matches_finite_differences():
    with jax.enable_x64():
        d, valid = _edges(n_valid_nodes=8, n_nodes=8, seed=4)
        d = d.astype(jnp.float64)
        weights = jax.random.normal(jax.random.PRNGKey(5), d.shape, jnp.float64)
        f = lambda x: jnp.sum(weights * sinkhorn_edge_selection(x, valid, 12.0, SinkhornHParams(epsilon=0.1)))
        g = jax.grad(f)(d)
        direction = jax.random.normal(jax.random.PRNGKey(6), d.shape, jnp.float64)
        h = 1e-6
        fd = (f(d + h * direction) - f(d - h * direction)) / (2 * h)
        np.testing.assert_allclose(float(jnp.dot(g, direction)), float(fd), rtol=1e-5)


@pytest.mark.slow
def test_implicit_gradient_equals_unrolled_once_converged():
    """Implicit differentiation (ridge-regularised) agrees with the unrolled gradient once converged."""
    with jax.enable_x64():
        d, valid = _edges(n_valid_nodes=8, n_nodes=8, seed=4)
        d = d.astype(jnp.float64)
        weights = jax.random.normal(jax.random.PRNGKey(5), d.shape, jnp.float64)
        f_imp = lambda x: jnp.sum(weights * sinkhorn_edge_selection(
            x, valid, 12.0, SinkhornHParams(epsilon=0.1, iterations=100, implicit=True)))
        f_unr = lambda x: jnp.sum(weights * sinkhorn_edge_selection(
            x, valid, 12.0, SinkhornHParams(epsilon=0.1, iterations=100)))
        np.testing.assert_allclose(np.asarray(jax.grad(f_imp)(d)), np.asarray(jax.grad(f_unr)(d)), atol=1e-5)


def test_graph_consistency_loss_by_hand():
    logits = jnp.array([[2.0], [-1.0], [0.5]])
    refined = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    p = 1 / (1 + np.exp(-np.asarray(logits)[:, 0]))
    kl = lambda a, b: a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
    expected = 1.0 * kl(p[1], p[0]) + 0.5 * kl(p[2], p[1])        # S*_ij · KL(P_j ‖ P_i)
    np.testing.assert_allclose(float(graph_consistency_loss(refined, logits)), expected, rtol=1e-5)
    # Gradient reaches P_j only (sg on P_i): node 0 is only ever an i, so its gradient is 0.
    g = jax.grad(lambda l: graph_consistency_loss(refined, l))(logits)
    assert float(g[0, 0]) == 0.0 and float(g[1, 0]) != 0.0


def test_prompt_retrieval_weights_by_hand():
    rng = np.random.default_rng(0)
    nodes, c_p = rng.normal(size=(5, 4)), rng.normal(size=4)
    pool_co, pool_he = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    scores = nodes @ c_p
    attn = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    q = nodes.T @ attn                                                  # Eq. 2
    cos = lambda pool: pool @ q / (np.linalg.norm(pool, axis=1) * np.linalg.norm(q))
    a_co = np.maximum(-cos(pool_co), 0)                                 # Eq. 3
    a_he = np.exp(cos(pool_he)) / np.exp(cos(pool_he)).sum()            # Eq. 4
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(attention_pool(f32(nodes), f32(c_p))), q, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(commonality_weights(f32(q), f32(pool_co))), a_co, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(heterogeneity_weights(f32(q), f32(pool_he))), a_he, rtol=1e-5)
    enhanced, p_co = enhance_nodes(f32(nodes), f32(c_p), f32(pool_co), f32(pool_he))
    np.testing.assert_allclose(np.asarray(enhanced), nodes + a_co @ pool_co + a_he @ pool_he, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p_co), a_co @ pool_co, rtol=1e-4, atol=1e-6)
    only_he, zero = enhance_nodes(f32(nodes), f32(c_p), None, f32(pool_he))
    np.testing.assert_allclose(np.asarray(only_he), nodes + a_he @ pool_he, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(zero).sum()) == 0.0


def test_clustering_loss_by_hand():
    p = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    valid = jnp.array([True, True, True, False])
    cos = np.array([[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]])
    np.testing.assert_allclose(float(clustering_loss(p, valid)), np.sum(1 - cos) / 3, rtol=1e-5)


def test_uncertainty_and_node_sampling():
    passes = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 3))
    expected = np.mean(np.sum((np.asarray(passes) - np.asarray(passes).mean(0)) ** 2, -1), 0)   # Eq. 1
    np.testing.assert_allclose(np.asarray(mc_dropout_uncertainty(passes)), expected, rtol=1e-5)
    foreground = jnp.arange(100) < 40                  # 40 foreground locations
    uncertainty = jnp.arange(100.0)[::-1]              # foreground 60..99 → the 20 lowest are 20..39
    idx = np.asarray(select_node_locations(foreground, uncertainty, jax.random.PRNGKey(1), 10, 0.5))
    assert len(set(idx)) == 10 and np.all((idx >= 20) & (idx < 40))
    idx2 = np.asarray(select_node_locations(foreground, uncertainty, jax.random.PRNGKey(2), 10, 0.5))
    assert set(idx) != set(idx2)                       # uniform draw, seeded
    # Fewer stable nodes than asked: the rest of the foreground first, then low-uncertainty background.
    idx = np.asarray(select_node_locations(foreground, uncertainty, jax.random.PRNGKey(1), 30, 0.5))
    assert np.all(idx < 40) and set(range(20, 40)) <= set(idx)
    empty = np.asarray(select_node_locations(jnp.zeros(100, bool), uncertainty, jax.random.PRNGKey(1), 5, 0.5))
    np.testing.assert_array_equal(np.sort(empty), np.arange(95, 100))
    uniform = np.asarray(select_node_locations(foreground, None, jax.random.PRNGKey(1), 30, 0.5))
    assert np.all(uniform < 40)


def test_queue_is_fifo():
    q = empty_queue(3, 2, 4, 1)
    for i in range(1, 5):
        q = push_queue(q, jnp.full((2, 4), float(i)), jnp.full((2, 1), float(i)), jnp.full((4,), float(i)))
        filled = min(i, 3)
        np.testing.assert_array_equal(np.asarray(q.valid), [True] * filled + [False] * (3 - filled))
        np.testing.assert_array_equal(np.asarray(q.commonality[:filled, 0]), np.arange(i, i - filled, -1))
    assert isinstance(q, NodeQueue) and float(q.nodes[2, 0, 0]) == 2.0


def test_step_changes_predictions_fills_queue_and_compiles_once(micro_model, micro_variables):
    """Adapt-then-predict reaches the prediction; the queue fills FIFO; a stream of 5 images compiles
    the step once (the one-image and five-image streams share the compiled step)."""
    from tta_jax.bn import forward_test_stats
    from tta_jax.data import SyntheticFundus
    data = SyntheticFundus(num_train=0, num_test=5).load("C", "test", 32)
    image = jnp.asarray(data.images[:1])
    before = jax.nn.sigmoid(forward_test_stats(micro_model, micro_variables["params"],
                                               micro_variables["batch_stats"], image))[0]
    # untrained net: tiny KLs, so a large step
    method = make_method("spegc", micro_model, {**SMALL, "sinkhorn_iterations": 5, "mc_passes": 2, "lr": 1.0})
    runner = StreamRunner(method, keep_predictions=True, probabilities_u8=False)
    state = method.init(micro_variables, jax.random.PRNGKey(0))
    first, one = runner.run_stream(state, data.images[:1], data.masks[:1], jax.random.PRNGKey(1))
    final, stream = runner.run_stream(state, data.images, data.masks, jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(one["predictions"]["prob"][0] - before))) > 1e-4   # adaptation reaches it
    assert float(one["info"]["skipped"][0]) == 0.0 and np.isfinite(one["info"]["loss"][0])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), first.params["net"], state.params["net"])
    assert all(jax.tree.leaves(changed["seg_head"])) and any(jax.tree.leaves(changed["layer1_0"]))
    assert np.asarray(first.queue.valid).tolist() == [True, False, False]
    assert runner.trace_count == 1
    assert np.asarray(final.queue.valid).all()
    np.testing.assert_array_equal(stream["info"]["k"], [16 - 8, 32 - 8, 48 - 8, 64 - 8, 64 - 8])


def test_nonfinite_step_keeps_state_and_bad_options(micro_model, micro_variables):
    method = make_method("spegc", micro_model, {**SMALL, "sinkhorn_iterations": 5, "mc_passes": 2})
    state = method.init(micro_variables, jax.random.PRNGKey(0))
    bad = jnp.full((1, 32, 32, 3), jnp.nan)
    new, _, info = jax.jit(method.step)(state, bad, jax.random.PRNGKey(1))
    assert float(info["skipped"]) == 1.0
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new.params, state.params)))
    assert not bool(new.queue.valid.any())
    for bad_hp, msg in [({"prompt_pool": "both"}, "spegc: unknown hyperparameter prompt_pool; valid keys"),
                        ({"sampling": "random"}, "spegc.sampling=.random. is not one of"),
                        ({"prompt_pools": "all"}, "spegc.prompt_pools=.all. is not one of"),
                        ({"keep_fraction": 0.0}, "keep_fraction")]:
        with pytest.raises(ValueError, match=msg):
            make_method("spegc", micro_model, bad_hp)
