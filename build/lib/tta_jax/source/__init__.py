"""The source stage: training, the adversarial stage, weight conversion and the model's lifecycle."""
from tta_jax.source.lifecycle import (build_model, companions, get_source_model, merge_needs, segmentor_variables,
                                      source_settings)

__all__ = ["build_model", "companions", "get_source_model", "merge_needs", "segmentor_variables",
           "source_settings"]
