"""Benchmark mode: compile time (trace/lower/compile, cold and warm cache), first-image latency,
median time per image and memory of each method, against the eager PyTorch reference.

Run (CPU, small default: ResNet-18 ×0.25 at 128², a few minutes)::

  python -m experiments.main --config=configs/benchmark.py --workdir=/tmp/tta_bench

Variants: ``r34_256`` — ResNet-34 at full width, 256², PyTorch with 2
threads (``--config=configs/benchmark.py:r34_256``); ``quick`` — a smoke run (64², 4 images).
Methods and sizes are overrides: ``--config.benchmark.methods=grata --config.benchmark.image_size=512``;
``--config.benchmark.dtypes=float32`` skips the bf16 rows, ``--config.benchmark.roofline=False`` the peaks.
Writes ``benchmark.json`` and ``benchmark.md`` (see ``tta_jax/benchmark.py``).
"""
import ml_collections

from configs import common
from tta_jax.methods import available_methods


def get_config(arg=None):
    c = common.get_base_config()
    c.mode = "benchmark"
    c.methods = ""
    c.benchmark = ml_collections.ConfigDict(dict(
        methods=",".join(available_methods()), image_size=128, stream_length=12, torch=True,
        torch_threads=2, dgcs_nodes=256,
        # every method once per model.compute_dtype, and the roofline (machine peaks, FLOPs, fraction of peak)
        dtypes="float32,bfloat16", roofline=True,
        # also PyTorch with only BN affine parameters requiring gradients (no unused weight gradients)
        torch_bn_grads_only=True,
        # stream-level: loop forms and K vmapped streams, measured with loop_method ("" skips both)
        loop_method="tent", loops=True, scan_unroll=4, streams="1,2,4", stream_maps="vmap,map"))
    for variant in filter(None, (arg or "").split(",")):
        if variant == "r34_256":
            c.model.backbone, c.model.width = "resnet34", 1.0
            c.benchmark.image_size = 256
            c.benchmark.methods, c.benchmark.loop_method = "tent,grata", "grata"
        elif variant == "quick":
            c.benchmark.image_size, c.benchmark.stream_length = 64, 4
        else:
            raise ValueError(f"unknown benchmark variant {variant!r}; use r34_256 or quick")
    return c
