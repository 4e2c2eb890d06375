"""Benchmark mode (``mode=benchmark``): compile time and speed of each method, JAX vs eager PyTorch.

For every method in ``benchmark.methods`` (random-init ResUNet of the
configured backbone/width, ``benchmark.image_size``², batch 1):

* ahead-of-time stages of the jitted step, timed separately: ``trace``,
  ``lower``, ``compile`` — first with an empty persistent compilation cache
  (cold), then again after clearing the in-memory caches (warm: served from
  the persistent cache);
* first-image latency (the first call of the compiled step) and the
  steady-state time per image (median over ``benchmark.stream_length`` images
  of one stream, adaptation step + prediction, synchronised per image; JAX and
  PyTorch take turns image by image, so load changes hit both alike);
* memory: XLA's buffer sizes of the compiled step (arguments, outputs,
  temporaries) and, on GPU/TPU, the device's peak bytes in use;
* the eager PyTorch reference (``tent``, ``grata``; needs torch) on the same
  network size: first-image and median time per image, ``torch_threads``
  threads; the ratio PyTorch/JAX of the medians and the break-even stream
  length ``N*`` from which JAX's total (cold compile + first image + (N−1) ×
  median) beats PyTorch's (first + (N−1) × median).

Stream-level measurements with ``benchmark.loop_method`` (default tent),
each timed on a second pass over the stream, after compilation:

* loop forms (``benchmark.loops``): a Python loop over the jitted step, one
  ``lax.scan`` over the stream, and that scan unrolled ``benchmark.scan_unroll``
  steps per iteration — seconds per image side by side;
* throughput (``benchmark.streams``, e.g. ``1,2,4``): K independent streams
  (seeds) in one jitted step, mapped with ``jax.vmap`` and with ``lax.map``
  (``benchmark.stream_maps``), total images/s against K; K = 1 is also the
  rate of K streams run one after another.

``benchmark.dgcs_nodes`` times SPEGC's graph solver alone (Eq. 8–14 at V
nodes, forward and forward+backward). Writes ``benchmark.json`` and
``benchmark.md`` to the workdir; runs unchanged on CPU, GPU or TPU.

Roofline (``benchmark.roofline``): how far each compiled step is from what
the machine can do.

* the machine's measured peaks (:func:`measured_peaks`): GFLOP/s of a large
  jitted matmul and of a large 3×3 convolution per compute dtype (bf16
  inputs accumulate in float32, as ``model.compute_dtype`` does), and the GB/s
  read by a large sum; the peak of a dtype is the faster of the two kernels;
* per step (:func:`step_cost`): FLOPs and bytes accessed from XLA's cost
  analysis of the compiled step (step + prediction; XLA counts the taps a
  padded convolution really computes and one FLOP per element-wise
  operation); achieved GFLOP/s = FLOPs / median; fraction of peak; the
  arithmetic intensity FLOPs/byte and the roofline bound
  min(peak, intensity × bandwidth) (:func:`roofline`);
* convolution forms (:func:`conv_forms`): the encoder's 3×3 convolutions
  timed as one XLA convolution and as tap matmuls per dtype, beside the
  form the library picks on this machine (``fast_ops.use_tap_matmuls``);
* on the PyTorch side the FLOPs of one step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls,
  forward and backward; element-wise operations are not counted, and
  convolutions count their padded taps).

``benchmark.dtypes`` (e.g. ``float32,bfloat16``) times every method once per
``model.compute_dtype``, the dtypes and PyTorch taking turns image by image;
the rows of other dtypes are named ``method@dtype``.
"""
from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tta_jax import checkpoints
from tta_jax.experiment import resolve_method, run_needs
from tta_jax.methods import make_method, method_spec
from tta_jax.methods.spegc.graph_clustering import SinkhornHParams, refined_graph
from tta_jax.models import init_variables
from tta_jax.models.fast_ops import conv_taps, use_tap_matmuls
from tta_jax.models.resunet import COMPUTE_DTYPES, RESNET_STAGES, scaled_channels
from tta_jax.runner import StreamRunner, init_streams
from tta_jax.source import build_model, companions


def _block(tree):
    return jax.block_until_ready(tree)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def aot_times(fn, *args) -> tuple[dict, object]:
    """Trace, lower and compile ``jax.jit(fn)`` on ``args``, each timed; returns (times, compiled)."""
    jitted = jax.jit(fn)
    traced, t_trace = _timed(lambda: jitted.trace(*args))
    lowered, t_lower = _timed(traced.lower)
    compiled, t_compile = _timed(lowered.compile)
    return {"trace_s": t_trace, "lower_s": t_lower, "compile_s": t_compile}, compiled


def ready_s(times: dict) -> float:
    """Seconds until the step can run: trace + lower + compile (as :func:`aot_times` measures them)."""
    return times["trace_s"] + times["lower_s"] + times["compile_s"]


def memory_of(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        return {"argument_mb": m.argument_size_in_bytes / 2**20, "output_mb": m.output_size_in_bytes / 2**20,
                "temp_mb": m.temp_size_in_bytes / 2**20}
    except Exception as err:  # not every backend reports it
        return {"memory_analysis": f"unavailable: {err}"}


def step_cost(compiled) -> dict:
    """GFLOP and GB accessed of one call of ``compiled``, from XLA's cost analysis (None where not reported).

    XLA counts the body of a ``while`` loop once, whatever its trip count: ``has_loops`` flags a
    compiled function with one (adv_ttt's tuning iterations, Sinkhorn iterations), whose counts are
    then lower bounds.
    """
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return {"gflop": cost["flops"] / 1e9, "gbytes": cost["bytes accessed"] / 1e9,
                "has_loops": " while(" in compiled.as_text()}
    except Exception as err:  # not every backend reports it
        logging.warning("XLA cost analysis unavailable: %s", err)
        return {"gflop": None, "gbytes": None, "has_loops": None}


def _median_seconds(compiled, *args, repeats: int = 5) -> float:
    _block(compiled(*args))
    return float(np.median([_timed(lambda: _block(compiled(*args)))[1] for _ in range(repeats)]))


# a 3×3 'same' convolution, NHWC/HWIO, float32 accumulation whatever the input dtype
_conv3x3_same = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32))


def measured_peaks(dtypes=("float32",), matmul_sizes=(1024, 2048), conv_shapes=((1, 64, 64, 256), (6, 32, 32, 128)),
                   stream_mb: int = 256) -> dict:
    """This machine's attainable rates, measured with jitted XLA kernels.

    For each dtype: the best GFLOP/s over square matmuls of ``matmul_sizes``
    and over 3×3 'same' convolutions of input shapes ``conv_shapes`` (NHWC,
    as many output channels as input channels), all multiplying in the dtype
    and accumulating in float32 (the kernels of ``model.compute_dtype``);
    FLOPs from XLA's cost analysis, median of 5 calls; ``peak`` is the faster
    of the two kinds. The best over a few shapes, because XLA:CPU's rate
    depends on the shape (a batch of views can beat one large image).
    ``bandwidth_gb_s``: bytes read per second by a jitted sum over a float32
    array of ``stream_mb`` MB, larger than the caches (a read-only stream: an
    element-wise op that writes a fresh output measures the page faults of
    its new buffer).
    """
    key = jax.random.PRNGKey(0)
    matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))

    def rate(fn, *args):
        compiled = fn.lower(*args).compile()
        return step_cost(compiled)["gflop"] / _median_seconds(compiled, *args)

    out = {}
    for dtype in dtypes:
        low = jnp.dtype(dtype)
        rates = {"matmul_gflop_s": max(rate(matmul, jax.random.normal(key, (n, n)).astype(low))
                                       for n in matmul_sizes),
                 "conv3x3_gflop_s": max(rate(_conv3x3_same, jax.random.normal(key, shape).astype(low),
                                             jax.random.normal(key, (3, 3, shape[-1], shape[-1])).astype(low))
                                        for shape in conv_shapes)}
        rates["peak_gflop_s"] = max(rates.values())
        out[str(low)] = rates
    stream = jnp.ones((stream_mb * 2**20 // 4,), jnp.float32)
    compiled = jax.jit(jnp.sum).lower(stream).compile()
    out["bandwidth_gb_s"] = step_cost(compiled)["gbytes"] / _median_seconds(compiled, stream)
    return out


def encoder_conv_shapes(backbone: str, width: float, image_size: int) -> list[tuple[int, ...]]:
    """Input shapes (NHWC, batch 1) of the ResNet encoder's stride-1 3×3 convolutions, one per stage."""
    return [(1, image_size // 2 ** (i + 2), image_size // 2 ** (i + 2), scaled_channels(64 * 2**i, width))
            for i in range(len(RESNET_STAGES[backbone][1]))]


def conv_forms(shapes, dtypes=("float32",)) -> list[dict]:
    """Each 3×3 'same' convolution of input ``shapes`` (as many output channels), forward, timed as
    ``lax.conv_general_dilated`` and as :func:`~tta_jax.models.fast_ops.conv_taps` (9 channel
    matmuls) per dtype (float32 accumulation), with the form :func:`use_tap_matmuls` picks on
    this machine: the evidence for that choice, measured wherever the benchmark runs."""
    key = jax.random.PRNGKey(0)
    taps = jax.jit(lambda x, k: conv_taps(x, k, 1, 1, jnp.float32))
    rows = []
    for shape in shapes:
        gflop = 2 * math.prod(shape) * 9 * shape[-1] / 1e9
        for dtype in dtypes:
            low = jnp.dtype(dtype)
            args = (jax.random.normal(key, shape).astype(low),
                    jax.random.normal(key, (3, 3, shape[-1], shape[-1])).astype(low))
            seconds = {form: _median_seconds(fn.lower(*args).compile(), *args) for form, fn in
                       (("conv", _conv3x3_same), ("taps", taps))}
            rows.append({"shape": list(shape), "dtype": str(low), "gflop": gflop,
                         **{f"{form}_s": t for form, t in seconds.items()},
                         "uses": "taps" if use_tap_matmuls(shape[-1], COMPUTE_DTYPES[str(low)]) else "conv"})
    return rows


def roofline(gflop: float | None, gbytes: float | None, seconds: float, peak_gflop_s: float,
             bandwidth_gb_s: float) -> dict:
    """Achieved rate of a step of ``gflop`` GFLOP and ``gbytes`` GB taking ``seconds``, against the roofline.

    ``gflop_s`` = gflop / seconds; ``fraction_of_peak`` = gflop_s / peak;
    ``intensity`` = FLOPs per byte; ``bound_gflop_s`` = min(peak, intensity ×
    bandwidth), the fastest the roofline model allows at that intensity;
    ``fraction_of_bound`` = gflop_s / bound.
    """
    if gflop is None:
        return {}
    rate = gflop / seconds
    out = {"gflop_s": rate, "fraction_of_peak": rate / peak_gflop_s}
    if gbytes:
        intensity = gflop / gbytes
        bound = min(peak_gflop_s, intensity * bandwidth_gb_s)
        out.update(intensity=intensity, bound_gflop_s=bound, fraction_of_bound=rate / bound)
    return out


def device_peak_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def break_even(jax_total_first: float, jax_median: float, torch_first: float, torch_median: float):
    """Smallest stream length N with JAX total ≤ PyTorch total, or None if JAX never catches up."""
    if jax_total_first <= torch_first:
        return 1
    if jax_median >= torch_median:
        return None
    return 1 + math.ceil((jax_total_first - torch_first) / (torch_median - jax_median))


def bench_method(method, variables, images, key) -> tuple[dict, object]:
    """Compile times, first image and memory of ``method``; and a ``step(i)`` for :func:`steady_state`."""
    state = method.init(variables, key)
    keys = jax.random.split(key, len(images))
    cache_dir = tempfile.mkdtemp(prefix="tta_jax_bench_cache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.clear_caches()
    cold, compiled = aot_times(method.step, state, images[0], keys[0])
    jax.clear_caches()
    warm, _ = aot_times(method.step, state, images[0], keys[0])
    st, first = _timed(lambda: _block(compiled(state, images[0], keys[0])))
    carry = {"state": st[0]}

    def step(i):
        carry["state"] = _block(compiled(carry["state"], images[i], keys[i]))[0]

    return {"cold": cold, "warm": warm, "first_image_s": first, "cost": step_cost(compiled),
            "memory": memory_of(compiled), "device_peak_mb": device_peak_mb()}, step


def steady_state(steps: dict, n: int) -> dict:
    """Median seconds per image of each ``steps[name](i)`` over images 1..n−1, interleaved.

    The steps take turns image by image (JAX, PyTorch, JAX, ...) so that a
    change in the machine's load during the run hits every contender alike:
    their ratio is what this benchmark reports.
    """
    times = {name: [] for name in steps}
    for i in range(1, n):
        for name, step in steps.items():
            times[name].append(_timed(lambda: step(i))[1])
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_torch(name, hp, config, images_np) -> dict:
    """The eager PyTorch reference of ``name`` (if it has one): ``{label: (row, step(i))}``.

    ``torch``: the reference as the official code runs it (every parameter
    requires a gradient, so backward also computes the convolution weights'
    gradients that a BN-only method discards); with ``benchmark.torch_bn_grads_only``
    also ``torch_bn_grads_only``: the same step with only the BatchNorm affine
    parameters requiring gradients (:func:`tta_jax.torch_reference.freeze_all_but_bn`),
    the fastest eager form of the same computation.
    """
    try:
        import torch
        from tta_jax import torch_reference as ref
    except ImportError as err:
        logging.warning("PyTorch reference skipped: %s", err)
        return {}
    b = config.benchmark
    torch.set_num_threads(int(b.torch_threads))
    xs = [torch.from_numpy(np.ascontiguousarray(im.transpose(0, 3, 1, 2))) for im in images_np]
    out = {}
    for label in ("torch", "torch_bn_grads_only")[:1 + bool(b.get("torch_bn_grads_only", False))]:
        torch.manual_seed(0)
        model = ref.TorchResUNet(config.model.backbone, 2, config.model.width).train()
        if label == "torch_bn_grads_only":
            ref.freeze_all_but_bn(model)
        step = ref.make_step(name, model, hp)
        if step is None:
            return {}
        _, first = _timed(lambda: step(xs[0]))
        out[label] = ({"first_image_s": first, "threads": int(b.torch_threads), "gflop": torch_gflop(step, xs[0])},
                      lambda i, step=step: step(xs[i]))
    return out


def torch_gflop(step, x) -> float | None:
    """GFLOP of one eager PyTorch ``step(x)``: convolutions and matmuls, forward and backward."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return counter.get_total_flops() / 1e9


def _stream_seconds(runner: StreamRunner, state, images, masks, keys) -> tuple[float, float]:
    """(first pass incl. compilation, second pass) wall seconds of ``runner`` over one stream."""
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        _block(runner.run_stream(state, images, masks, keys))
        passes.append(time.perf_counter() - t0)
    return passes[0], passes[1]


def bench_loops(method, variables, images, masks, key, unroll: int) -> dict:
    """Seconds per image of the loop forms over one stream of ``len(images)``."""
    n = len(images)
    out = {}
    for label, loop, u in (("python", "python", 1), ("scan", "scan", 1), (f"scan_unroll{unroll}", "scan", unroll)):
        runner = StreamRunner(method, loop, scan_chunk=n, scan_unroll=u)
        first, second = _stream_seconds(runner, method.init(variables, key), images, masks, key)
        out[label] = {"first_pass_s": first, "per_image_s": second / n}
    return out


def bench_streams(method, variables, images, masks, key, ks, stream_map: str = "vmap") -> dict:
    """Images/s of K streams in one batched step (``stream_map``: vmap or lax.map), for each K in ``ks``."""
    n, out = len(images), {}
    for k in ks:
        if k == 1:
            runner, state, keys = StreamRunner(method), method.init(variables, key), key
        else:
            keys = jax.random.split(key, k)
            runner = StreamRunner(method, batched=True, stream_map=stream_map)
            state = init_streams(method, variables, keys)
        first, second = _stream_seconds(runner, state, images, masks, keys)
        out[str(k)] = {"first_pass_s": first, "seconds": second, "images_per_s": k * n / second}
    base = out.get("1", {}).get("images_per_s")
    for row in out.values():
        row["speedup_vs_sequential"] = row["images_per_s"] / base if base else None
    return out


def bench_dgcs(nodes: int, hidden: int, clusters: int, key) -> dict:
    feats = jax.random.normal(key, (nodes, hidden))
    valid = jnp.ones((nodes,), bool)
    w = jnp.eye(hidden)
    hp = SinkhornHParams()

    def forward(v):
        return refined_graph(v, valid, w, w, clusters, 0.1, hp)[0]

    def loss_and_grad(v):
        return jax.value_and_grad(lambda u: jnp.sum(forward(u) * (u @ u.T)))(v)

    out = {"nodes": nodes, "edges": nodes * nodes}
    for label, fn in (("forward", forward), ("forward_backward", loss_and_grad)):
        times, compiled = aot_times(fn, feats)
        _block(compiled(feats))
        runs = [_timed(lambda: _block(compiled(feats)))[1] for _ in range(10)]
        out[label] = {"compile_s": times["compile_s"], "median_s": float(np.median(runs))}
    return out


def run_benchmark(config, workdir: str) -> dict:
    b = config.benchmark
    size = int(b.image_size)
    methods = [m for m in b.methods.split(",") if m]
    needs = run_needs(config, methods)
    # one network with every auxiliary branch a benchmarked method needs (DeTTA's decoder); a method
    # that does not ask for a branch never computes it
    model = build_model(config, 2, needs)
    key = jax.random.PRNGKey(config.seed)
    variables = init_variables(model, key, size)
    # companions (adv_ttt's Δ) with random weights: a method's cost does not depend on them
    nets = companions(config, needs)
    for name, net in nets.items():
        variables = {**variables, name: jax.jit(net.init)(jax.random.PRNGKey(config.seed + 1), jnp.zeros((1, size, size, 2)))}

    def build(base, hp, net=model):
        return make_method(base, net, hp, **{c: nets[c] for c in method_spec(base).needs(hp).companions})

    dtypes = [d for d in str(b.get("dtypes", config.model.compute_dtype)).split(",") if d]
    models = {d: model.clone(compute_dtype=d) for d in dtypes}
    rng = np.random.default_rng(config.seed)
    images_np = [rng.uniform(size=(1, size, size, 3)).astype(np.float32) for _ in range(int(b.stream_length))]
    images = [jnp.asarray(x) for x in images_np]
    results = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "image_size": size,
               "backbone": config.model.backbone, "width": float(config.model.width),
               "stream_length": int(b.stream_length), "dtypes": dtypes, "methods": {}}
    if b.get("roofline", True):
        logging.info("benchmark: this machine's peaks")
        results["peaks"] = measured_peaks(dtypes)
        results["conv_forms"] = conv_forms(
            encoder_conv_shapes(config.model.backbone, float(config.model.width), size), dtypes)
    for name in methods:
        base, hp = resolve_method(config, name)
        rows, steps = {}, {}
        for dtype in dtypes:
            label = name if dtype == "float32" else f"{name}@{dtype}"
            logging.info("benchmark: %s", label)
            rows[label], steps[label] = bench_method(build(base, hp, models[dtype]), variables, images, key)
            rows[label]["compute_dtype"] = dtype
        torch_rows = bench_torch(base, hp, config, images_np) if b.torch else {}
        steps.update({label: step for label, (_, step) in torch_rows.items()})
        medians = steady_state(steps, len(images))
        for label, (reference, _) in torch_rows.items():
            reference["median_s"] = medians[label]
        torch_row = torch_rows.get("torch", (None,))[0]
        for label, row in rows.items():
            if "torch_bn_grads_only" in torch_rows:
                row["torch_bn_grads_only"] = torch_rows["torch_bn_grads_only"][0]
                row["ratio_torch_bn_grads_only_over_jax"] = row["torch_bn_grads_only"]["median_s"] / medians[label]
            row["median_s"] = medians[label]
            if "peaks" in results:
                row["roofline"] = roofline(row["cost"]["gflop"], row["cost"]["gbytes"], row["median_s"],
                                           results["peaks"][row["compute_dtype"]]["peak_gflop_s"],
                                           results["peaks"]["bandwidth_gb_s"])
            if torch_row:
                # the reference is float32 eager PyTorch whatever dtype the JAX row computes in
                row["torch"] = dict(torch_row)
                row["ratio_torch_over_jax"] = torch_row["median_s"] / row["median_s"]
                row["break_even_images"] = break_even(
                    ready_s(row["cold"]) + row["first_image_s"],
                    row["median_s"], torch_row["first_image_s"], torch_row["median_s"])
                if torch_row.get("gflop") and "peaks" in results:
                    row["torch"]["roofline"] = roofline(torch_row["gflop"], None, torch_row["median_s"],
                                                        results["peaks"]["float32"]["peak_gflop_s"], 0.0)
            results["methods"][label] = row
            logging.info("benchmark %s: %s", label, json.dumps(row))
    masks = (rng.uniform(size=(len(images_np), size, size, 2)) > 0.5).astype(np.uint8)
    stream = np.concatenate(images_np)
    if b.loop_method and (b.loops or b.streams):
        method = build(*resolve_method(config, b.loop_method))
        results["loop_method"] = b.loop_method
        if b.loops:
            logging.info("benchmark: loop forms (%s)", b.loop_method)
            results["loops"] = bench_loops(method, variables, stream, masks, key, int(b.scan_unroll))
        if b.streams:
            logging.info("benchmark: vmapped streams (%s)", b.loop_method)
            ks = [int(k) for k in str(b.streams).split(",") if k]
            results["streams"] = {m: bench_streams(method, variables, stream, masks, key, ks, m)
                                  for m in str(b.stream_maps).split(",") if m}
    if int(b.dgcs_nodes):
        spegc = resolve_method(config, "spegc")[1]
        results["dgcs"] = bench_dgcs(int(b.dgcs_nodes), spegc.hidden, spegc.clusters, key)
    results["process_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write_text(out / "benchmark.json", json.dumps(results, indent=1))
    table = benchmark_table(results)
    checkpoints.atomic_write_text(out / "benchmark.md", table)
    print(table)
    return results


def _f(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f} %"


def benchmark_table(r: dict) -> str:
    lines = [f"# Benchmark on {r['device']} ({r['backend']}): {r['backbone']} ×{r['width']}, "
             f"{r['image_size']}², batch 1, stream of {r['stream_length']}",
             "", "Seconds. cold = empty persistent cache; warm = served from it. ready = trace + lower + "
             "compile: the time until the step can run. median = adaptation step + prediction per image. "
             "Rows `method@dtype` multiply in that `model.compute_dtype`; PyTorch is float32 eager.", "",
             "| method | trace | lower | compile cold | ready cold | compile warm | ready warm | first image | "
             "median/image | XLA temp MB | PyTorch first | PyTorch median | PyTorch/JAX | break-even N |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        t = m.get("torch") or {}
        lines.append(
            f"| {name} | {_f(m['cold']['trace_s'])} | {_f(m['cold']['lower_s'])} | {_f(m['cold']['compile_s'])} | "
            f"{_f(ready_s(m['cold']))} | {_f(m['warm']['compile_s'])} | {_f(ready_s(m['warm']))} | "
            f"{_f(m['first_image_s'])} | {_f(m['median_s'])} | "
            f"{_f(m['memory'].get('temp_mb'), 1)} | {_f(t.get('first_image_s'))} | {_f(t.get('median_s'))} | "
            f"{_f(m.get('ratio_torch_over_jax'), 2)} | {m.get('break_even_images', '–') if t else '–'} |")
    frozen = {name: m for name, m in r["methods"].items() if "torch_bn_grads_only" in m}
    if frozen:
        lines += ["", "PyTorch with only the BatchNorm affine parameters requiring gradients (no weight gradients "
                  "computed; the official flow above computes them), timed in the same turns:", "",
                  "| method | JAX median | PyTorch BN-grads-only median | PyTorch BN-grads-only/JAX |", "|---|---|---|---|"]
        lines += [f"| {name} | {_f(m['median_s'])} | {_f(m['torch_bn_grads_only']['median_s'])} | "
                  f"{_f(m['ratio_torch_bn_grads_only_over_jax'], 2)} |" for name, m in frozen.items()]
    if "peaks" in r:
        p = r["peaks"]
        lines += ["", "Roofline. This machine's measured peaks (jitted XLA kernels, float32 accumulation): " + "; ".join(
            f"{d}: matmul {p[d]['matmul_gflop_s']:.1f}, 3×3 conv {p[d]['conv3x3_gflop_s']:.1f} GFLOP/s"
            for d in r.get("dtypes", ["float32"])) + f"; read bandwidth {p['bandwidth_gb_s']:.1f} GB/s. "
            "FLOPs and bytes per step + prediction from XLA's cost analysis; ≥ marks a step with a loop, whose "
            "body XLA counts once (so its counts and rates are lower bounds). PyTorch's FLOPs (convolutions and "
            "matmuls only) from its FlopCounterMode, its rate against the float32 peak.", "",
            "| method | GFLOP/step | GB/step | FLOP/byte | GFLOP/s | of peak | of roofline bound | "
            "PyTorch GFLOP/step | PyTorch GFLOP/s | PyTorch of peak |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in r["methods"].items():
            c, f = m.get("cost", {}), m.get("roofline", {})
            t = m.get("torch") or {}
            tf = t.get("roofline", {})
            at_least = "≥ " if c.get("has_loops") else ""
            lines.append(f"| {name} | {at_least}{_f(c.get('gflop'), 2)} | {at_least}{_f(c.get('gbytes'), 3)} | "
                         f"{_f(f.get('intensity'), 1)} | {at_least}{_f(f.get('gflop_s'), 1)} | "
                         f"{at_least}{_pct(f.get('fraction_of_peak'))} | "
                         f"{_pct(f.get('fraction_of_bound'))} | {_f(t.get('gflop'), 2)} | {_f(tf.get('gflop_s'), 1)} | "
                         f"{_pct(tf.get('fraction_of_peak'))} |")
    if r.get("conv_forms"):
        lines += ["", "Convolution forms: the encoder's stride-1 3×3 convolutions (one per stage, forward), as "
                  "one XLA convolution and as 9 tap matmuls (`conv_taps`); `uses` is the form "
                  "`model.compute_dtype` takes on this machine (`use_tap_matmuls`).", "",
                  "| input | dtype | GFLOP | conv ms | taps ms | conv GFLOP/s | taps GFLOP/s | uses |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {'×'.join(map(str, c['shape']))} | {c['dtype']} | {c['gflop']:.3g} | {1e3 * c['conv_s']:.2f} | "
                  f"{1e3 * c['taps_s']:.2f} | {c['gflop'] / c['conv_s']:.0f} | {c['gflop'] / c['taps_s']:.0f} | "
                  f"{c['uses']} |" for c in r["conv_forms"]]
    if "loops" in r:
        lines += ["", f"Loop forms ({r['loop_method']}, stream of {r['stream_length']}, second pass): "
                  "seconds per image", "", "| loop | per image | first pass (incl. compile) |", "|---|---|---|"]
        lines += [f"| {k} | {_f(v['per_image_s'])} | {_f(v['first_pass_s'], 1)} |" for k, v in r["loops"].items()]
    if "streams" in r:
        maps = list(r["streams"])
        lines += ["", f"K independent streams in one jitted step ({r['loop_method']}, second pass), mapped "
                  "with jax.vmap or lax.map; K = 1 is also the rate of K streams run one after another", "",
                  "| K | " + " | ".join(f"{m} images/s | {m} × sequential" for m in maps) + " |",
                  "|---|" + "---|---|" * len(maps)]
        for k in r["streams"][maps[0]]:
            lines.append(f"| {k} | " + " | ".join(
                f"{r['streams'][m][k]['images_per_s']:.2f} | {_f(r['streams'][m][k]['speedup_vs_sequential'], 2)}"
                for m in maps) + " |")
    if "dgcs" in r:
        d = r["dgcs"]
        lines += ["", f"SPEGC DGCS alone (Eq. 8–14, V = {d['nodes']} nodes, E = {d['edges']} edges, "
                  f"20 Sinkhorn iterations): forward {1e3 * d['forward']['median_s']:.1f} ms, "
                  f"forward+backward {1e3 * d['forward_backward']['median_s']:.1f} ms (median of 10)."]
    lines.append(f"\nProcess peak RSS: {r['process_max_rss_mb']:.0f} MB.")
    return "\n".join(lines) + "\n"
