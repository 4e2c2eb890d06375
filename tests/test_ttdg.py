"""TTDG (Lv et al., CVPR 2025): matching primitives against NumPy/SciPy, the loss and its gradient, the step,
and the source stage that learns the universe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from tta_jax.bn import merge_params
from tta_jax.methods import make_method
from tta_jax.methods import ttdg
from tta_jax.source.universe import UniverseHParams, hippi, train_universe

TAUS = (0.1, 0.05, 0.025, 0.0125, 0.00625)


# --------------------------------------------------------------------------- independent NumPy references

def np_sinkhorn(log_scores, iterations=20, dummy_row=False):
    """pygmtools' log-domain Sinkhorn, written out: shorter side first, dummy rows at −100."""
    s = np.array(log_scores, np.float64)
    transposed = s.shape[0] > s.shape[1]
    if transposed:
        s = s.T
    rows, cols = s.shape
    if dummy_row and rows < cols:
        s = np.vstack([s, np.full((cols - rows, cols), -100.0)])
    for i in range(iterations):
        s = s - logsumexp(s, axis=1 if i % 2 == 0 else 0, keepdims=True)
    out = np.exp(s)[:rows]
    return out.T if transposed else out


def np_hungarian(scores):
    x = np.zeros_like(scores, dtype=np.float64)
    r, c = linear_sum_assignment(-np.asarray(scores, np.float64))
    x[r, c] = 1.0
    return x


def np_graduated_assignment(a, w, u0, num_graphs, n, quad_weight=0.5, taus=TAUS, max_iter=200, tol=1e-3):
    """The official GA_GM.gagm loop (one cluster), on the valid graphs only.

    Returns the assignment and whether its path is robust to float rounding: every step's ‖ΔU‖ at least
    10 % away from tol, no stage stopped on the iteration cap, and no Sinkhorn stage on an exact
    2-cycle (float equality; the Hungarian stage's 0/1 states repeat exactly on any machine)."""
    d = u0.shape[1]

    def project(v, tau):
        blocks = [v[g * n:(g + 1) * n] for g in range(num_graphs)]
        out = np.concatenate([np_hungarian(b) if tau is None else np_sinkhorn(b / tau, dummy_row=True)
                              for b in blocks])
        if num_graphs == 2:
            out[:n] = np.eye(n, d)
        return out

    u, last, robust = u0.copy(), np.zeros_like(u0), True
    for tau in list(taus) + [None]:
        for _ in range(max_iter):
            last2, last = last, u
            v = ((a @ (u @ u.T) @ a @ u) * quad_weight * 2 + w @ u) / num_graphs
            u = project(v, tau)
            step = np.linalg.norm(u - last)
            robust &= not 0.9 * tol <= step <= 1.1 * tol
            if step < tol:
                break
            if np.linalg.norm(u - last2) == 0:
                robust &= tau is None
                break
        else:
            robust = False
    return u, robust


def np_focal(p, t, alpha=0.25, gamma=2.0):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -alpha * (1 - p) ** gamma * t * np.log(p) - (1 - alpha) * p ** gamma * (1 - t) * np.log(1 - p)


def np_affinity(params, x, y):
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    xp, yp = x @ p["project_source"], y @ p["project_target"]
    cat = np.concatenate([np.repeat(xp[:, None], len(y), 1), np.repeat(yp[None], len(x), 0)], -1)
    h = np.maximum(cat @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    return (h @ p["out"]["kernel"])[..., 0] + p["out"]["bias"][0]


def _mgm_problem(seed, g=3, n=4, c=5, d=7, noise=0.5):
    """A multi-graph matching instance with a planted answer: each graph's n nodes are noisy copies of n
    of d universe points; the pairwise scores favour the planted correspondences, blurred by noise."""
    rng = np.random.default_rng(seed)
    universe = rng.normal(size=(d, c))
    picks = [rng.permutation(d)[:n] for _ in range(g)]
    nodes = np.stack([universe[p] + noise * rng.normal(size=(n, c)) for p in picks])
    att = np.exp(rng.normal(size=(g, n, n)))
    att = att / att.sum(-1, keepdims=True) * (1 - np.eye(n))
    a = np.zeros((g * n, g * n))
    for k in range(g):
        a[k * n:(k + 1) * n, k * n:(k + 1) * n] = att[k]
    w = np.zeros((g * n, g * n))
    for i in range(g):
        for j in range(i + 1):
            agree = (picks[i][:, None] == picks[j][None, :]).astype(float)
            s = np_sinkhorn((agree + noise * rng.normal(size=(n, n))) / 0.05, dummy_row=True)
            w[i * n:(i + 1) * n, j * n:(j + 1) * n] = s
            w[j * n:(j + 1) * n, i * n:(i + 1) * n] = s.T
    return a, w, nodes.reshape(-1, c) @ universe.T


# --------------------------------------------------------------------------- primitives

@pytest.mark.parametrize("shape,dummy", [((5, 5), False), ((4, 7), True), ((7, 4), True), ((9, 3), False)])
def test_sinkhorn_follows_the_pygmtools_iteration(shape, dummy):
    scores = np.random.default_rng(0).normal(size=shape) / 0.3
    got = np.asarray(jax.jit(lambda s: ttdg.sinkhorn(s, dummy_row=dummy))(jnp.asarray(scores, jnp.float32)))
    np.testing.assert_allclose(got, np_sinkhorn(scores, dummy_row=dummy), rtol=2e-4, atol=1e-6)
    totals = got.sum(0 if shape[0] <= shape[1] else 1)   # per entry of the longer side, normalised last
    if dummy:                                              # (shared with the dropped dummy entries)
        assert totals.max() <= 1 + 1e-5
    else:
        np.testing.assert_allclose(totals, 1.0, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (9, 5), (16, 32)])
def test_hungarian_equals_scipy(shape):
    scores = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(ttdg.hungarian)(jnp.asarray(scores)))
    np.testing.assert_array_equal(got, np_hungarian(scores))


def test_hungarian_survives_non_finite_scores():
    scores = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32).at[1, 2].set(jnp.nan)
    out = np.asarray(jax.jit(ttdg.hungarian)(scores))
    assert out.sum() == 4 and (out.sum(0) <= 1).all()


def test_stride_positions_and_labels_equal_numpy():
    rng = np.random.default_rng(2)
    positive = rng.uniform(size=200) < 0.3
    for n in (5, 16):
        index, count = jax.jit(ttdg.stride_positions, static_argnums=1)(jnp.asarray(positive), n)
        ranks = (np.arange(n) * positive.sum()) // n
        assert int(count) == positive.sum()
        np.testing.assert_array_equal(np.asarray(index), np.flatnonzero(positive)[ranks])
    few = np.zeros(200, bool)
    few[[7, 50, 51]] = True                     # fewer positives than nodes: they repeat, in raster order
    index, count = ttdg.stride_positions(jnp.asarray(few), 6)
    np.testing.assert_array_equal(np.asarray(index), [7, 7, 50, 50, 51, 51])
    assert int(ttdg.stride_positions(jnp.zeros(200, bool), 6)[1]) == 0
    mask = np.zeros((8, 8, 2), np.uint8)
    mask[1:7, 1:7, 0] = 1                       # disc
    mask[3:5, 3:5, 1] = 1                       # cup, inside the disc and smaller
    expected = np.where(mask[..., 1] > 0, 2, np.where(mask[..., 0] > 0, 1, 0))
    np.testing.assert_array_equal(np.asarray(ttdg.smallest_area_labels(jnp.asarray(mask))), expected)


@pytest.mark.parametrize("seed,valid", [(0, (True, False, True, True)), (1, (True, False, True, True)),
                                        (0, (False, True, False, True)), (2, (False, True, False, True))])
def test_graduated_assignment_equals_numpy(seed, valid):
    """The official graduated-assignment loop, with empty slots (left out of G); with two valid graphs the
    first one is pinned to the identity. The instances (planted ones, :func:`_mgm_problem`) have a
    reference path robust to rounding (:func:`np_graduated_assignment`, asserted here): purely random
    ones mostly oscillate until the 200-iteration cap or an exact 2-cycle, or stop with ‖ΔU‖ within a
    hair of the tolerance, where float rounding of two implementations (or of one on two CPUs)
    decides the path."""
    g, n = 4, 4
    a, w, u0 = _mgm_problem(seed, g=g, n=n, d=7)
    valid = np.array(valid)
    rows = np.repeat(valid, n)
    expected, robust = np_graduated_assignment(a[np.ix_(rows, rows)], w[np.ix_(rows, rows)], u0[rows],
                                               int(valid.sum()), n)
    assert robust
    with jax.enable_x64():
        got = jax.jit(lambda a, w, u, v: ttdg.graduated_assignment(a, w, u, v, n, taus=TAUS))(
            jnp.asarray(a), jnp.asarray(w), jnp.asarray(u0), jnp.asarray(valid))
        got = np.asarray(got)
    np.testing.assert_array_equal(got[rows], expected)
    assert (got[~rows] == 0).all()
    np.testing.assert_array_equal(got[rows].sum(1), 1.0)          # every node on one universe point
    for k in range(int(valid.sum())):                              # a universe point takes one node per graph
        assert expected[k * n:(k + 1) * n].sum(0).max() == 1.0


def test_pairwise_blocks_and_matching_loss_equal_numpy():
    g, n, c = 3, 4, 5
    rng = np.random.default_rng(3)
    nodes = rng.normal(size=(g, n, c)).astype(np.float32)
    params = jax.tree.map(lambda v: v * 30.0, ttdg.init_affinity(jax.random.PRNGKey(0), c))   # non-uniform S
    blocks = np.asarray(jax.jit(ttdg.pairwise_matchings, static_argnums=2)(params, jnp.asarray(nodes), 0.05))
    for i in range(g):
        for j in range(g):
            src, tgt = max(i, j), min(i, j)   # the official loop: source index ≥ target index
            s = np_sinkhorn(np_affinity(params, nodes[src].astype(np.float64), nodes[tgt]) / 0.05, dummy_row=True)
            np.testing.assert_allclose(blocks[i, j], s if i >= j else s.T, rtol=1e-3, atol=1e-5)
    assignment = np.stack([np.eye(n, 6)[rng.permutation(n)] for _ in range(g)])
    valid = np.array([True, False, True])
    loss, pairs = ttdg.matching_loss(jnp.asarray(blocks), jnp.asarray(assignment), jnp.asarray(valid))
    expected = np_focal(blocks[0, 2], assignment[0] @ assignment[2].T).mean()   # the one valid pair i < j
    assert int(pairs) == 1
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.integration
def test_matching_loss_gradient_matches_finite_differences():
    """The unrolled OTT Sinkhorn inside the pairwise loss, w.r.t. the affinity network and the nodes."""
    g, n, c, d = 3, 4, 5, 6
    rng = np.random.default_rng(4)
    with jax.enable_x64():
        nodes = jnp.asarray(rng.normal(size=(g, n, c)))
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64) * 30.0,
                              ttdg.init_affinity(jax.random.PRNGKey(1), c))
        assignment = jnp.asarray(np.stack([np.eye(n, d)[rng.permutation(n)] for _ in range(g)]))
        valid = jnp.ones(g, bool)

        def loss(p, x):
            return ttdg.matching_loss(ttdg.pairwise_matchings(p, x, 0.05), assignment, valid)[0]

        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        f = jax.jit(loss)
        _, (gp, gx) = value_and_grad(params, nodes)
        dp = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape)), params)
        dx = jnp.asarray(rng.normal(size=nodes.shape))
        eps = 1e-6
        plus = f(jax.tree.map(lambda a, b: a + eps * b, params, dp), nodes + eps * dx)
        minus = f(jax.tree.map(lambda a, b: a - eps * b, params, dp), nodes - eps * dx)
        fd = float(plus - minus) / (2 * eps)
        analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(dp)))
        analytic += float(jnp.vdot(gx, dx))
    assert abs(analytic) > 1e-4
    np.testing.assert_allclose(analytic, fd, rtol=1e-5)


# --------------------------------------------------------------------------- the method

def _with_universe(model, variables, seed=1):
    _, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), return_features=True), variables)
    net = UniverseHParams().network(features.shape[-1])
    return {**variables, "universe": jax.jit(net.init)(jax.random.PRNGKey(seed))}, net


@pytest.fixture(scope="module")
def micro_ttdg(micro_model, micro_variables):
    """The micro segmentor with a universe, ttdg with its defaults, and one jitted step counting its traces
    (shared by the tests below, so the step compiles once for all of them)."""
    variables, net = _with_universe(micro_model, micro_variables)
    method = make_method("ttdg", micro_model, universe=net)
    traces = []

    def step(state, images, rng):
        traces.append(1)
        return method.step(state, images, rng)

    return micro_model, variables, net, method, jax.jit(step), traces


def test_compiles_once_fills_the_queue_and_guards_non_finite_steps(micro_ttdg):
    model, variables, net, method, step, traces = micro_ttdg
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 1, 32, 32, 3))
    state = method.init(variables, jax.random.PRNGKey(0))
    infos = []
    for k in range(4):
        state, logits, info = step(state, images[k], jax.random.PRNGKey(k))
        infos.append(jax.device_get(info))
        assert np.isfinite(np.asarray(logits)).all()
    assert len(traces) == 1
    np.testing.assert_array_equal([i["graphs"] for i in infos], [1, 2, 3, 4])
    np.testing.assert_array_equal([i["adapted"] for i in infos], [0, 1, 1, 1])
    np.testing.assert_array_equal([i["pairs"] for i in infos], [0, 1, 3, 6])
    assert bool(state.queue.valid.all()) and all(np.isfinite(i["loss"]) for i in infos)
    before = jax.tree.map(np.asarray, state)
    after, _, info = step(state, images[0].at[0, 5, 5, 0].set(jnp.nan), jax.random.PRNGKey(9))
    assert len(traces) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)
    assert float(info["skipped"]) == 1.0 and float(info["adapted"]) == 0.0


def test_step_loss_and_sgd_update(micro_ttdg):
    """One step = the focal loss of the current graph against the cycle-consistent matching of the
    pseudo-batch (recomputed here from the network's forward, the step's RNG feeding the attention
    dropout), then one SGD step (momentum, weight decay) on it; then the prediction of the updated
    network."""
    model, variables, net, method, step, traces = micro_ttdg
    hp = ttdg.TTDGHParams()
    images = jax.random.uniform(jax.random.PRNGKey(3), (2, 1, 32, 32, 3))
    state0 = method.init(variables, jax.random.PRNGKey(0))
    state0 = state0._replace(trainable={**state0.trainable,   # a non-uniform pairwise matching
                                        "affinity": jax.tree.map(lambda v: 30.0 * v, state0.trainable["affinity"])})
    state1, _, info1 = step(state0, images[0], jax.random.PRNGKey(5))
    assert float(info1["adapted"]) == 0.0 and np.asarray(state1.queue.valid).tolist() == [False, False, True]
    jax.tree.map(np.testing.assert_array_equal, state1.trainable, state0.trainable)   # one graph: queued only
    rng = jax.random.PRNGKey(6)
    state2, logits, info = step(state1, images[1], rng)
    assert float(info["adapted"]) == 1.0 and float(info["pairs"]) == 1.0

    forward = jax.jit(lambda net_params, x: model.apply(
        {"params": merge_params(net_params, state1.bn_params), "batch_stats": state1.batch_stats}, x,
        return_features=True))
    out, _ = forward(state1.trainable["net"], images[1])
    positive = np.asarray(out[0]).reshape(-1, 2).max(-1) > 0
    n = hp.nodes_per_image
    assert positive.sum() >= n
    index = jnp.asarray(np.flatnonzero(positive)[(np.arange(n) * positive.sum()) // n])
    valid = jnp.asarray([False, False, True, True])

    @jax.jit
    def recompute(trainable0):
        def nodes_of(trainable):
            features = forward(trainable["net"], images[1])[1][0].reshape(-1, 8)
            return jnp.concatenate([state1.queue.nodes, features[index][None]])

        nodes = nodes_of(trainable0)
        blocks = ttdg.pairwise_matchings(trainable0["affinity"], nodes, hp.pairwise_tau)
        adjacency = ttdg.block_diagonal(ttdg.attention_adjacency(state1.attention, nodes, rng, hp.attention_dropout))
        assignment = ttdg.graduated_assignment(adjacency, ttdg.blocks_to_matrix(blocks),
                                               nodes.reshape(-1, 8) @ state1.universe.T, valid, n,
                                               taus=TAUS).reshape(4, n, -1)

        def loss(trainable):
            pairwise = ttdg.pairwise_matchings(trainable["affinity"], nodes_of(trainable), hp.pairwise_tau)
            return ttdg.matching_loss(pairwise, assignment, valid)[0]

        return jax.value_and_grad(loss)(trainable0)

    value, grads = recompute(state1.trainable)
    np.testing.assert_allclose(float(info["loss"]), float(value), rtol=1e-5)
    expected = jax.tree.map(lambda p, g: -hp.lr * (g + hp.weight_decay * p), state1.trainable, grads)
    actual = jax.tree.map(lambda a, b: a - b, state2.trainable, state1.trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=3e-7),
                 actual, expected)
    assert max(float(jnp.abs(e).max()) for e in jax.tree.leaves(expected["net"])) > 1e-5   # the network moved
    after, _ = forward(state2.trainable["net"], images[1])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(after), rtol=1e-5, atol=1e-5)   # adapt, then predict
    assert len(traces) == 1


def test_needs_the_universe(micro_ttdg):
    model, variables, net, _, _, _ = micro_ttdg
    from tta_jax.hparams import HParamError
    with pytest.raises(HParamError, match="needs universe"):
        make_method("ttdg", model)
    method = make_method("ttdg", model, universe=net)
    with pytest.raises(ValueError, match="variables\\['universe'\\] is missing"):
        method.init({k: v for k, v in variables.items() if k != "universe"}, jax.random.PRNGKey(0))
    wrong = {**variables, "universe": {"params": {"embeddings": jnp.zeros((32, 5))}}}
    with pytest.raises(ValueError, match="8 channels"):
        method.init(wrong, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_vmapped_seeds_equal_sequential_runs(micro_ttdg):
    from tta_jax.runner import StreamRunner, init_streams
    _, variables, _, method, _, _ = micro_ttdg
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3)))
    masks = (images[..., :2] > 0.5).astype(np.uint8)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1)])
    _, scores = StreamRunner(method, "python", batched=True).run_stream(
        init_streams(method, variables, keys), images, masks, keys)
    for s in (0, 1):
        _, ref = StreamRunner(method, "python").run_stream(method.init(variables, keys[s]), images, masks, keys[s])
        np.testing.assert_allclose(np.asarray(scores["dice"])[:, s], np.asarray(ref["dice"]), atol=1e-3)


# --------------------------------------------------------------------------- the source stage

def test_hippi_equals_numpy():
    g, n, d = 3, 4, 6
    rng = np.random.default_rng(5)
    b = np.abs(rng.normal(size=(g * n, g * n)))
    u0 = np.concatenate([np_sinkhorn(rng.normal(size=(n, d)), dummy_row=True) for _ in range(g)])
    u, last = u0.copy(), None
    for _ in range(50):
        last = u
        bu = b @ u
        v = bu @ u.T @ bu
        u = np.concatenate([np_sinkhorn(v[k * n:(k + 1) * n] * 200.0, dummy_row=True) for k in range(g)])
        if np.linalg.norm(u - last) < 1e-5:
            break
    with jax.enable_x64():
        got = np.asarray(jax.jit(lambda b, u: hippi(b, u, g, n))(jnp.asarray(b), jnp.asarray(u0)))
    np.testing.assert_allclose(got, u, rtol=1e-6, atol=1e-9)


def test_universe_is_learned_on_source_images_with_foreground(micro_model, micro_variables):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((5, 32, 32, 2), np.uint8)
    for i in range(4):
        masks[i, 4 + i:20 + i, 6:22, 0] = 1
        masks[i, 8 + i:14 + i, 10:16, 1] = 1
    hp = UniverseHParams(size=10, nodes_per_image=6, batch_size=3, steps=3, lr=1.0)
    variables, history = train_universe(micro_model, micro_variables, images, masks, hp, log_every=1)
    start = jax.jit(hp.network(8).init)(jax.random.split(jax.random.PRNGKey(hp.seed))[0])["params"]
    assert variables["params"]["embeddings"].shape == (10, 8)
    assert [h["step"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["universe_change"] > 0
    assert np.abs(variables["params"]["embeddings"] - start["embeddings"]).max() > 0
    with pytest.raises(ValueError, match="every source mask is empty"):
        train_universe(micro_model, micro_variables, images, np.zeros_like(masks), hp)


def test_source_stage_declares_and_builds_the_universe():
    from configs import common
    from tta_jax.methods import method_spec
    from tta_jax.source.lifecycle import companions, merge_needs, source_settings
    needs = merge_needs([method_spec("ttdg").needs(ttdg.TTDGHParams())])
    assert needs.companions == ("universe",)
    config = common.get_base_config()
    config.model.width = 0.25
    net = companions(config, needs)["universe"]
    assert (net.size, net.features) == (32, 8)                 # the ResUNet's last decoder map: 32 × width
    assert source_settings(config, needs)["universe"]["size"] == 32
    assert "universe" not in source_settings(config)
