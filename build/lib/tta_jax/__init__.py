"""tta-jax: test-time adaptation for medical image segmentation, in JAX.

Python API (README "Python API"):

* :func:`tta_jax.experiment.run` — a whole experiment from a config;
* :func:`tta_jax.adapt_stream` — one stream of your own arrays, any registered
  method, your own Flax segmentor;
* :func:`tta_jax.methods.make_method` — a method's pure ``init``/``step``.
"""
__version__ = "0.1.0"

from tta_jax.api import AdaptedStream, adapt_stream
from tta_jax.methods import available_methods, make_method

__all__ = ["AdaptedStream", "adapt_stream", "available_methods", "make_method"]
