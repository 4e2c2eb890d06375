"""Benchmark mode: the pieces that compute numbers (timing itself is not asserted)."""
import jax.numpy as jnp
import pytest

from tta_jax.benchmark import aot_times, benchmark_table, break_even, memory_of


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
    c.adv_ttt.n_iter, c.benchmark.streams = 2, "1,2"
    res = run_benchmark(c, str(tmp_path))
    assert set(res["methods"]) == {"bn", "tent", "adv_ttt"} and (tmp_path / "benchmark.md").exists()
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
