"""Stage 2, inspect: ModelFacts from config.json (nested text_config too) and safetensors headers.

CONTRACT (types below are shared by every later stage; add fields, do not rename).

Nothing here downloads or loads tensors: config.json is read whole, safetensors files only up to
the end of their JSON header (8-byte little-endian length + header), so header-only fixture files
(no tensor data after the header) are read exactly like real checkpoints.
"""

from __future__ import annotations

from smartrun.model.facts import ModelFacts, QuantFacts, derive_max_model_len, facts_from_config
from smartrun.model.files import inspect, resolve_model_dir

__all__ = [
    "ModelFacts",
    "QuantFacts",
    "derive_max_model_len",
    "facts_from_config",
    "inspect",
    "resolve_model_dir",
]
