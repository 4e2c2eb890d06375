import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax.data import SyntheticFundus
from tta_jax.methods import make_method
from tta_jax.runner import StreamRunner, run_protocol


@pytest.fixture(scope="module")
def targets():
    ds = SyntheticFundus(num_train=0, num_test=3)
    return [ds.load("B", "test", 32), ds.load("C", "test", 32)]


@pytest.fixture(scope="module")
def tent(micro_model):
    return make_method("tent", micro_model, {"lr": 1e-2})


def _state_leaves(results):
    return np.concatenate([r.dice.ravel() for r in results])


def test_auto_loop_resolves_per_backend(tent):
    from tta_jax.runner import default_loop
    assert default_loop("cpu") == "python" and default_loop("gpu") == default_loop("tpu") == "scan"
    assert StreamRunner(tent).loop == default_loop()
    with pytest.raises(ValueError, match="scan_unroll"):
        StreamRunner(tent, "scan", scan_unroll=0)


def test_compiles_once_per_stream_and_across_targets(tent, micro_variables, targets):
    runner = StreamRunner(tent, "python")
    assert runner.trace_count == 0
    results, _ = run_protocol(tent, micro_variables, targets, "per_target", jax.random.PRNGKey(0), runner=runner)
    assert runner.trace_count == 1
    run_protocol(tent, micro_variables, targets, "continual", jax.random.PRNGKey(1), runner=runner)
    assert runner.trace_count == 1
    assert [r.domain for r in results] == ["B", "C"] and results[0].dice.shape == (3, 2)
    assert set(results[0].info) == {"loss", "skipped"}


@pytest.mark.parametrize("unroll", [1, 2])
def test_scan_matches_python_loop_and_compiles_once(tent, micro_variables, targets, unroll):
    py, _ = run_protocol(tent, micro_variables, targets, "continual", jax.random.PRNGKey(0), loop="python")
    # 3 images -> one full and one padded chunk
    runner = StreamRunner(tent, "scan", scan_chunk=2, scan_unroll=unroll)
    sc, _ = run_protocol(tent, micro_variables, targets, "continual", jax.random.PRNGKey(0), runner=runner)
    assert runner.trace_count == 1
    np.testing.assert_allclose(_state_leaves(py), _state_leaves(sc), atol=1e-3)
    np.testing.assert_allclose(py[1].info["loss"], sc[1].info["loss"], rtol=1e-4)


def test_reset_policies(tent, micro_variables, targets):
    key = jax.random.PRNGKey(0)
    runner = StreamRunner(tent)
    per_target, _ = run_protocol(tent, micro_variables, targets, "per_target", key, runner=runner)
    continual, _ = run_protocol(tent, micro_variables, targets, "continual", key, runner=runner)
    episodic, _ = run_protocol(tent, micro_variables, targets, "episodic", key, runner=runner)
    # the first image of the first target sees the same initial state under every policy
    assert per_target[0].info["loss"][0] == pytest.approx(continual[0].info["loss"][0], rel=1e-5)
    # per-target resets at C, continual carries B's adaptation into C
    assert abs(per_target[1].info["loss"][0] - continual[1].info["loss"][0]) > 1e-6
    # episodic: every image starts from the source state, i.e. like a 1-image stream
    for i in range(3):
        single = targets[1]._replace(images=targets[1].images[i:i + 1], masks=targets[1].masks[i:i + 1],
                                     ids=targets[1].ids[i:i + 1])
        alone, _ = run_protocol(tent, micro_variables, [single], "per_target", key, runner=runner)
        assert episodic[1].info["loss"][i] == pytest.approx(alone[0].info["loss"][0], rel=1e-5)


def test_unknown_protocol_and_loop(tent, micro_variables, targets):
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol(tent, micro_variables, targets, "sometimes", jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown loop"):
        StreamRunner(tent, "while")


def test_long_term_and_mixed(tent, micro_variables, targets):
    runner = StreamRunner(tent, keep_predictions=True)
    key = jax.random.PRNGKey(0)
    lt, _ = run_protocol(tent, micro_variables, targets, "long_term", key, runner=runner, rounds=2)
    assert [(r.domain, r.round) for r in lt] == [("B", 0), ("C", 0), ("B", 1), ("C", 1)]
    assert lt[2].info["loss"][0] != pytest.approx(lt[0].info["loss"][0], rel=1e-6)   # state carried on
    assert list(lt[3].positions) == [9, 10, 11]
    pred = lt[0].predictions
    assert pred["pred"].shape == (3, 32, 32, 2) and pred["prob"].dtype == np.uint8
    mixed, _ = run_protocol(tent, micro_variables, targets, "mixed", key, runner=runner, mixed_seed=2026)
    order = np.random.default_rng(2026).permutation(6)
    pos = np.concatenate([r.positions for r in mixed])
    assert sorted(pos) == list(range(6))
    ids = {p: i for r in mixed for p, i in zip(r.positions, r.ids)}
    all_ids = list(targets[0].ids) + list(targets[1].ids)
    assert [ids[p] for p in range(6)] == [all_ids[k] for k in order]
    assert runner.trace_count == 1
    with pytest.raises(ValueError, match="rounds >= 1"):
        run_protocol(tent, micro_variables, targets, "long_term", key, runner=runner, rounds=0)


def _noisy_method(model, shared_weights=False):
    """A cheap stateful method whose step uses its key: the running shift is a sum of draws.

    ``shared_weights``: the streams of a batch share one copy of the weights (``stream_axes``).
    """
    from tta_jax.bn import forward_source_stats
    from tta_jax.methods.base import Method

    def init(variables, rng):
        return {"variables": variables, "shift": jnp.zeros(())}

    def step(state, images, rng):
        shift = state["shift"] + jax.random.normal(rng)
        logits = forward_source_stats(model, state["variables"]["params"], state["variables"]["batch_stats"],
                                      images) + shift
        return {**state, "shift": shift}, logits, {"shift": shift}

    return Method("noisy", init, step, stream_axes={"variables": None, "shift": 0} if shared_weights else 0)


@pytest.mark.parametrize("loop,stream_map", [("python", "vmap"), ("scan", "vmap"), ("python", "map")])
@pytest.mark.parametrize("protocol", ["continual", "per_target", "mixed"])
def test_vmapped_seeds_route_keys_and_states(micro_model, micro_variables, targets, loop, stream_map, protocol):
    _check_batched_seeds(_noisy_method(micro_model), micro_variables, targets, loop, stream_map, protocol)


@pytest.mark.parametrize("loop,stream_map", [("python", "vmap"), ("scan", "vmap"), ("python", "map")])
def test_batched_seeds_share_declared_state(micro_model, micro_variables, targets, loop, stream_map):
    """Leaves declared shared (stream_axes None) stay one unbatched copy, and results are unchanged."""
    from tta_jax.runner import init_streams
    method = _noisy_method(micro_model, shared_weights=True)
    state = init_streams(method, micro_variables, jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2)]))
    assert state["shift"].shape == (3,)
    assert state["variables"]["params"]["conv1"]["kernel"].shape == micro_variables["params"]["conv1"]["kernel"].shape
    runner = StreamRunner(method, loop, scan_chunk=2, batched=True, stream_map=stream_map)
    new, _ = runner.run_stream(state, targets[0].images, targets[0].masks, jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2)]))
    assert new["variables"]["params"]["conv1"]["kernel"].shape == micro_variables["params"]["conv1"]["kernel"].shape
    _check_batched_seeds(method, micro_variables, targets, loop, stream_map, "continual")


def _check_batched_seeds(method, micro_variables, targets, loop, stream_map, protocol):
    from tta_jax.runner import split_seeds
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2)])
    batched = StreamRunner(method, loop, scan_chunk=2, batched=True, stream_map=stream_map)
    per_seed = split_seeds(run_protocol(method, micro_variables, targets, protocol, keys, runner=batched)[0], 3)
    single = StreamRunner(method, loop, scan_chunk=2)
    for s in range(3):
        ref, _ = run_protocol(method, micro_variables, targets, protocol, jax.random.PRNGKey(s), runner=single)
        for a, b in zip(per_seed[s], ref):
            np.testing.assert_allclose(a.info["shift"], b.info["shift"], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(a.dice, b.dice, atol=1e-4)
    assert batched.trace_count == 1 and single.trace_count == 1
    assert not np.allclose(per_seed[0][0].info["shift"], per_seed[1][0].info["shift"])


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["python", "scan"])
def test_vmapped_seeds_match_sequential_runs(micro_model, micro_variables, targets, loop):
    """S seeds in one vmapped step = S sequential runs.  In float64: a GraTa step at a random
    init is ill-conditioned in float32 (the unit look-ahead step), so a different reduction
    order under vmap moves cos by up to ~1e-2 there, while float64 agrees to rounding."""
    from tta_jax.runner import split_seeds
    with jax.enable_x64():
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), micro_variables)
        data = [t._replace(images=t.images.astype(np.float64)) for t in targets[:1]]
        grata = make_method("grata", micro_model, {"lr": 1e-3})
        seeds = [0, 1, 2]
        keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
        batched = StreamRunner(grata, loop, scan_chunk=2, batched=True)
        res, _ = run_protocol(grata, variables, data, "continual", keys, runner=batched)
        assert batched.trace_count == 1
        per_seed = split_seeds(res, len(seeds))
        single = StreamRunner(grata, loop, scan_chunk=2)
        for s, seed in enumerate(seeds):
            ref, _ = run_protocol(grata, variables, data, "continual", jax.random.PRNGKey(seed), runner=single)
            for a, b in zip(per_seed[s], ref):
                np.testing.assert_allclose(a.info["cos"], b.info["cos"], atol=1e-8)
                np.testing.assert_allclose(a.dice, b.dice, atol=1e-6)
        assert single.trace_count == 1
        # different seeds draw different strong views
        assert not np.allclose(per_seed[0][0].info["cos"], per_seed[1][0].info["cos"])
