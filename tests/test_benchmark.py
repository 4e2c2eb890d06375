"""Benchmark mode: the pieces that compute numbers (timing itself is not asserted)."""
import jax
import jax.numpy as jnp
import pytest

from tta_jax.benchmark import aot_times, benchmark_table, break_even, measured_peaks, memory_of, roofline, step_cost


def test_break_even_stream_length():
    # JAX: 10 s compile + first, then 0.1 s/image; PyTorch: 0.5 s first, then 0.4 s/image.
    n = break_even(10.0, 0.1, 0.5, 0.4)
    assert n == 1 + 32                                          # ceil(9.5 / 0.3) = 32
    jax_total = 10.0 + (n - 1) * 0.1
    assert jax_total <= 0.5 + (n - 1) * 0.4 and 10.0 + (n - 2) * 0.1 > 0.5 + (n - 2) * 0.4
    assert break_even(10.0, 0.5, 0.5, 0.4) is None             # never catches up
    assert break_even(0.3, 0.5, 0.5, 0.4) == 1


def test_aot_stages_are_timed_and_compiled_function_runs():
    times, compiled = aot_times(lambda x: jnp.sin(x) * 2, jnp.ones(3))
    assert set(times) == {"trace_s", "lower_s", "compile_s"} and all(t >= 0 for t in times.values())
    assert float(compiled(jnp.zeros(3)).sum()) == 0.0



def test_memory_of_reports_the_buffer_sizes():
    """XLA's buffer sizes of a compiled function of a known size: 4 MiB in, 4 MiB out (CPU reports them)."""
    _, compiled = aot_times(lambda x: x * 2.0, jnp.ones((1 << 20,), jnp.float32))
    mem = memory_of(compiled)
    assert mem["argument_mb"] == pytest.approx(4.0) and mem["output_mb"] == pytest.approx(4.0)


@pytest.mark.slow
def test_quick_benchmark_writes_table(tmp_path):
    from configs import benchmark
    from tta_jax.benchmark import run_benchmark
    c = benchmark.get_config("quick")
    c.benchmark.methods, c.benchmark.stream_length, c.benchmark.dgcs_nodes = "bn,tent,adv_ttt", 3, 32
    c.adv_ttt.n_iter, c.benchmark.streams, c.benchmark.dtypes = 2, "1,2", "float32,bfloat16"
    res = run_benchmark(c, str(tmp_path))
    assert set(res["methods"]) == {f"{m}{d}" for m in ("bn", "tent", "adv_ttt") for d in ("", "@bfloat16")}
    assert (tmp_path / "benchmark.md").exists() and res["methods"]["tent"]["roofline"]["gflop_s"] > 0
    assert set(res["loops"]) == {"python", "scan", "scan_unroll4"} and set(res["streams"]) == {"vmap", "map"}
    assert set(res["streams"]["map"]) == {"1", "2"} and res["streams"]["vmap"]["1"]["speedup_vs_sequential"] == 1.0
    assert res["methods"]["tent"]["median_s"] > 0 and res["dgcs"]["edges"] == 32 * 32


def test_table_reports_time_until_the_step_runs():
    from tta_jax.benchmark import ready_s
    cold = {"trace_s": 1.5, "lower_s": 0.5, "compile_s": 10.0}
    warm = {"trace_s": 1.25, "lower_s": 0.25, "compile_s": 2.0}
    assert ready_s(cold) == 12.0 and ready_s(warm) == 3.5
    r = {"device": "cpu:0", "backend": "cpu", "backbone": "resnet34", "width": 1.0, "image_size": 256,
         "stream_length": 12, "process_max_rss_mb": 1.0,
         "methods": {"grata": {"cold": cold, "warm": warm, "first_image_s": 2.0, "median_s": 1.0,
                               "memory": {"temp_mb": 300.0}}}}
    table = benchmark_table(r)
    assert "| ready cold |" in table and "| ready warm |" in table
    assert "| grata | 1.500 | 0.500 | 10.000 | 12.000 | 2.000 | 3.500 | 2.000 | 1.000 |" in table


def test_step_cost_counts_the_taps_a_padded_convolution_computes():
    """XLA's FLOPs of a 3×3 'same' convolution, counted by hand: 2·C_in·C_out per tap that lands inside
    the image (padding taps are not computed), and a matmul's 2·m·k·n with its bytes."""
    h, w, cin, cout = 12, 9, 5, 7
    _, conv = aot_times(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")),
        jnp.ones((1, h, w, cin)), jnp.ones((3, 3, cin, cout)))
    taps = sum(1 for i in range(h) for j in range(w) for di in (-1, 0, 1) for dj in (-1, 0, 1)
               if 0 <= i + di < h and 0 <= j + dj < w)
    assert step_cost(conv)["gflop"] * 1e9 == 2 * cin * cout * taps
    _, mm = aot_times(lambda a, b: a @ b, jnp.ones((6, 4)), jnp.ones((4, 3)))
    cost = step_cost(mm)
    assert cost["gflop"] * 1e9 == 2 * 6 * 4 * 3 and cost["gbytes"] * 1e9 == 4 * (6 * 4 + 4 * 3 + 6 * 3)
    assert not cost["has_loops"]
    # a loop's body is counted once whatever its trip count: flagged, its count a lower bound
    _, loop = aot_times(lambda a, b, n: jax.lax.fori_loop(0, n, lambda i, x: x @ b, a),
                        jnp.ones((6, 4)), jnp.ones((4, 4)), 5)
    assert step_cost(loop)["has_loops"] and step_cost(loop)["gflop"] * 1e9 < 5 * 2 * 6 * 4 * 4


def test_roofline_arithmetic():
    # 10 GFLOP over 2 GB in 0.5 s: 20 GFLOP/s at 5 FLOP/byte; with 8 GB/s the bound is min(100, 40)
    r = roofline(10.0, 2.0, 0.5, peak_gflop_s=100.0, bandwidth_gb_s=8.0)
    assert r == pytest.approx({"gflop_s": 20.0, "fraction_of_peak": 0.2, "intensity": 5.0,
                               "bound_gflop_s": 40.0, "fraction_of_bound": 0.5})
    assert roofline(10.0, 0.01, 0.5, 100.0, 8.0)["bound_gflop_s"] == 100.0      # compute-bound
    assert roofline(10.0, None, 0.5, 100.0, 8.0) == {"gflop_s": 20.0, "fraction_of_peak": 0.2}
    assert roofline(None, None, 0.5, 100.0, 8.0) == {}


def test_measured_peaks_have_every_dtype_and_the_bandwidth():
    p = measured_peaks(("float32", "bfloat16"), matmul_sizes=(32, 64), conv_shapes=((1, 8, 8, 8), (2, 4, 4, 8)),
                       stream_mb=1)
    for dtype in ("float32", "bfloat16"):
        rates = p[dtype]
        assert rates["peak_gflop_s"] == max(rates["matmul_gflop_s"], rates["conv3x3_gflop_s"]) > 0
    assert p["bandwidth_gb_s"] > 0


def test_conv_forms_time_both_forms_of_the_encoder_convolutions(monkeypatch):
    from tta_jax import benchmark
    assert benchmark.encoder_conv_shapes("resnet34", 1.0, 256) == [
        (1, 64, 64, 64), (1, 32, 32, 128), (1, 16, 16, 256), (1, 8, 8, 512)]
    assert benchmark.encoder_conv_shapes("resnet18", 0.25, 128)[-1] == (1, 4, 4, 128)
    monkeypatch.setattr(benchmark, "use_tap_matmuls", lambda channels, dtype: dtype is not None)
    rows = benchmark.conv_forms([(1, 6, 6, 8)], ("float32", "bfloat16"))
    assert [(r["dtype"], r["uses"]) for r in rows] == [("float32", "conv"), ("bfloat16", "taps")]
    assert rows[0]["gflop"] == pytest.approx(2 * 36 * 9 * 8 * 8 / 1e9) and min(r["taps_s"] for r in rows) > 0
    table = benchmark_table({"device": "cpu:0", "backend": "cpu", "backbone": "resnet18", "width": 0.25,
                             "image_size": 32, "stream_length": 1, "process_max_rss_mb": 1.0, "methods": {},
                             "conv_forms": [{**rows[1], "conv_s": 2e-3, "taps_s": 1e-3, "gflop": 0.5}]})
    assert "| 1×6×6×8 | bfloat16 | 0.5 | 2.00 | 1.00 | 250 | 500 | taps |" in table


def test_torch_flops_of_a_step():
    torch = pytest.importorskip("torch")
    from tta_jax.benchmark import torch_gflop
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.ones(1, 4, 10, 8, requires_grad=True)
    # forward 2·C_in·C_out·9 per output pixel (PyTorch counts padding taps); backward: input and weight
    assert torch_gflop(lambda x: conv(x).sum().backward(), x) * 1e9 == 3 * 2 * 4 * 6 * 9 * 10 * 8


def test_table_has_a_roofline_row_per_method():
    r = {"device": "cpu:0", "backend": "cpu", "backbone": "resnet34", "width": 1.0, "image_size": 256,
         "stream_length": 12, "process_max_rss_mb": 1.0, "dtypes": ["float32", "bfloat16"],
         "peaks": {"float32": {"matmul_gflop_s": 100.0, "conv3x3_gflop_s": 80.0, "peak_gflop_s": 100.0},
                   "bfloat16": {"matmul_gflop_s": 50.0, "conv3x3_gflop_s": 60.0, "peak_gflop_s": 60.0},
                   "bandwidth_gb_s": 10.0}, "methods": {}}
    times = {"trace_s": 1.0, "lower_s": 1.0, "compile_s": 1.0}
    for name, dtype, seconds in (("grata", "float32", 0.5), ("grata@bfloat16", "bfloat16", 1.0)):
        r["methods"][name] = {"cold": times, "warm": times, "first_image_s": 1.0, "median_s": seconds,
                              "memory": {}, "compute_dtype": dtype, "cost": {"gflop": 20.0, "gbytes": 4.0},
                              "roofline": roofline(20.0, 4.0, seconds, r["peaks"][dtype]["peak_gflop_s"], 10.0)}
    table = benchmark_table(r)
    assert "bfloat16: matmul 50.0, 3×3 conv 60.0 GFLOP/s" in table
    assert "| grata | 20.00 | 4.000 | 5.0 | 40.0 | 40.0 % | 80.0 % |" in table
    r["methods"]["grata"]["cost"]["has_loops"] = True
    assert "| grata | ≥ 20.00 | ≥ 4.000 | 5.0 | ≥ 40.0 | ≥ 40.0 % | 80.0 % |" in benchmark_table(r)
    assert "| grata@bfloat16 | 20.00 | 4.000 | 5.0 | 20.0 | 33.3 % | 40.0 % |" in table
