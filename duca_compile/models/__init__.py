"""Models to run duca on without the hub: tiny random-init families and pipelines, full-size specs.

    make_model("flux"), make_inputs("flux", model)        # families.py: one table, 26 families
    make_pipeline("wan"), pipeline_call_kwargs("wan", pipe) # pipelines.py: tiny diffusers pipelines
    meta_model("flux-dev")                                 # full_size.py: real shapes on the meta device
"""
from __future__ import annotations

from .families import FAMILIES, Family, family, make_inputs, make_model, randomize_zero_params
from .full_size import MODELS, STEPS, meta_model, model_inputs
from .pipelines import PIPELINE_FAMILIES, make_pipeline, needs_transformers, pipeline_call_kwargs

__all__ = ["FAMILIES", "Family", "family", "make_model", "make_inputs", "randomize_zero_params", "MODELS", "STEPS",
           "meta_model", "model_inputs", "PIPELINE_FAMILIES", "make_pipeline", "needs_transformers",
           "pipeline_call_kwargs"]
