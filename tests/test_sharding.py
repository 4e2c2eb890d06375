"""Streams sharded over 4 (fake) CPU devices give the single-device results."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# float64: sharding changes the shapes of the per-device convolutions and so the
# float summation order; in float32 that noise, on BN parameters whose gradient
# is analytically ~0, becomes a +-lr step under Adam's sign-like first update
# (measured: identical losses, parameters 2*lr apart).  In float64 the noise is
# far below Adam's eps and the two runs agree exactly.
SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4, jax.devices()
    from tta_jax.data import SyntheticFundus
    from tta_jax.methods import make_method
    from tta_jax.runner import StreamRunner, run_protocol
    from conftest import MicroSegmentor
    model = MicroSegmentor()
    variables = jax.tree.map(lambda x: x.astype(np.float64),
                             jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))))
    targets = [SyntheticFundus(num_train=0, num_test=3).load(d, "test", 32) for d in ("B", "C")]
    targets = [t._replace(images=t.images.astype(np.float64)) for t in targets]
    method = make_method("tent", model, {"lr": 1e-2})
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    try:
        StreamRunner(method, batched=True, shard=True) and run_protocol(
            method, variables, targets, "continual", keys[:3], runner=StreamRunner(method, batched=True, shard=True))
        raise SystemExit("3 streams over 4 devices must be refused")
    except ValueError as err:
        assert "do not split evenly" in str(err), err
    # streams must differ (tent ignores its key), so each starts from its own perturbed BN affine
    # parameters; the frozen weights are one copy shared by all streams (Method.stream_axes)
    from tta_jax.runner import init_streams
    init = init_streams(method, variables, keys)
    assert init.frozen_params["conv1"]["kernel"].ndim == 4 and init.bn_params["bn1"]["scale"].shape[0] == 4
    scale = lambda x: (x * (1 + 0.05 * np.arange(4).reshape((4,) + (1,) * (x.ndim - 1)))).astype(x.dtype)
    init = init._replace(bn_params=jax.tree.map(scale, init.bn_params))
    images = np.concatenate([t.images for t in targets])
    masks = np.concatenate([t.masks for t in targets])
    out = {}
    for shard in (False, True):
        runner = StreamRunner(method, batched=True, shard=shard)
        state, scores = runner.run_stream(init, images, masks, keys)
        out[shard] = (scores["dice"], state)
        assert runner.trace_count == 1
    assert len(jax.tree.leaves(out[True][1])[0].sharding.device_set) == 4   # the state lives on all 4 devices
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-9), out[True][1], out[False][1])
    assert out[True][0].shape == (6, 4, 2) and np.ptp(out[True][0], axis=1).max() > 0   # streams differ
    print("SHARDED_OK")
""")


@pytest.mark.integration
def test_four_fake_devices_match_single_device():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]
