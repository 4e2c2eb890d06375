import jax
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
def tent(tiny_model):
    return make_method("tent", tiny_model, {"lr": 1e-2})


def _state_leaves(results):
    return np.concatenate([r.dice.ravel() for r in results])


def test_compiles_once_per_stream_and_across_targets(tent, tiny_variables, targets):
    runner = StreamRunner(tent, "python")
    assert runner.trace_count == 0
    results, _ = run_protocol(tent, tiny_variables, targets, "per_target", jax.random.PRNGKey(0), runner=runner)
    assert runner.trace_count == 1
    run_protocol(tent, tiny_variables, targets, "continual", jax.random.PRNGKey(1), runner=runner)
    assert runner.trace_count == 1
    assert [r.domain for r in results] == ["B", "C"] and results[0].dice.shape == (3, 2)
    assert set(results[0].info) == {"loss", "skipped"}


def test_scan_matches_python_loop_and_compiles_once(tent, tiny_variables, targets):
    py, _ = run_protocol(tent, tiny_variables, targets, "continual", jax.random.PRNGKey(0), loop="python")
    runner = StreamRunner(tent, "scan", scan_chunk=2)   # 3 images -> one full and one padded chunk
    sc, _ = run_protocol(tent, tiny_variables, targets, "continual", jax.random.PRNGKey(0), runner=runner)
    assert runner.trace_count == 1
    np.testing.assert_allclose(_state_leaves(py), _state_leaves(sc), atol=1e-3)
    np.testing.assert_allclose(py[1].info["loss"], sc[1].info["loss"], rtol=1e-4)


def test_reset_policies(tent, tiny_variables, targets):
    key = jax.random.PRNGKey(0)
    runner = StreamRunner(tent)
    per_target, _ = run_protocol(tent, tiny_variables, targets, "per_target", key, runner=runner)
    continual, _ = run_protocol(tent, tiny_variables, targets, "continual", key, runner=runner)
    episodic, _ = run_protocol(tent, tiny_variables, targets, "episodic", key, runner=runner)
    # the first image of the first target sees the same initial state under every policy
    assert per_target[0].info["loss"][0] == pytest.approx(continual[0].info["loss"][0], rel=1e-5)
    # per-target resets at C, continual carries B's adaptation into C
    assert abs(per_target[1].info["loss"][0] - continual[1].info["loss"][0]) > 1e-6
    # episodic: every image starts from the source state, i.e. like a 1-image stream
    for i in range(3):
        single = targets[1]._replace(images=targets[1].images[i:i + 1], masks=targets[1].masks[i:i + 1],
                                     ids=targets[1].ids[i:i + 1])
        alone, _ = run_protocol(tent, tiny_variables, [single], "per_target", key, runner=runner)
        assert episodic[1].info["loss"][i] == pytest.approx(alone[0].info["loss"][0], rel=1e-5)


def test_unknown_protocol_and_loop(tent, tiny_variables, targets):
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol(tent, tiny_variables, targets, "sometimes", jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown loop"):
        StreamRunner(tent, "while")


def test_long_term_and_mixed(tent, tiny_variables, targets):
    runner = StreamRunner(tent, keep_predictions=True)
    key = jax.random.PRNGKey(0)
    lt, _ = run_protocol(tent, tiny_variables, targets, "long_term", key, runner=runner, rounds=2)
    assert [(r.domain, r.round) for r in lt] == [("B", 0), ("C", 0), ("B", 1), ("C", 1)]
    assert lt[2].info["loss"][0] != pytest.approx(lt[0].info["loss"][0], rel=1e-6)   # state carried on
    assert list(lt[3].positions) == [9, 10, 11]
    pred = lt[0].predictions
    assert pred["pred"].shape == (3, 32, 32, 2) and pred["prob_u8"].dtype == np.uint8
    mixed, _ = run_protocol(tent, tiny_variables, targets, "mixed", key, runner=runner, mixed_seed=2026)
    order = np.random.default_rng(2026).permutation(6)
    pos = np.concatenate([r.positions for r in mixed])
    assert sorted(pos) == list(range(6))
    ids = {p: i for r in mixed for p, i in zip(r.positions, r.ids)}
    all_ids = list(targets[0].ids) + list(targets[1].ids)
    assert [ids[p] for p in range(6)] == [all_ids[k] for k in order]
    assert runner.trace_count == 1
    with pytest.raises(ValueError, match="rounds >= 1"):
        run_protocol(tent, tiny_variables, targets, "long_term", key, runner=runner, rounds=0)
