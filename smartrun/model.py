"""Stage 2, inspect: ModelFacts from config.json (nested text_config too) and safetensors headers.

CONTRACT (types below are shared by every later stage; add fields, do not rename).
TODO(helper-model): resolve_model_dir(), inspect(), facts_from_config().
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smartrun.plan import Frozen


class MoEFacts(Frozen):
    num_experts: int  # routed experts
    experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    first_dense_layers: int = 0  # e.g. DeepSeek first_k_dense_replace
    moe_layer_freq: int = 1


class MLAFacts(Frozen):
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None


class QuantFacts(Frozen):
    method: str  # "awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes", "mxfp4", ...
    weight_bits: int | None = None
    activation_bits: int | None = None  # 8 for w8a8, None when weight-only
    group_size: int | None = None
    raw: dict[str, Any] = {}


class ModelFacts(Frozen):
    """What the estimator and rules need to know about a model. Sizes are of the text (language) model."""

    name: str  # repo id when known, else directory name
    path: str | None = None  # local directory holding config.json
    architecture: str
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None = None
    derived_max_model_len: int  # as vLLM derives it (rope factor etc.), the upper bound for --max-model-len
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer: "full_attention" | "sliding_attention"
    torch_dtype: str = "bfloat16"
    tie_word_embeddings: bool = False
    moe: MoEFacts | None = None
    mla: MLAFacts | None = None
    quantization: QuantFacts | None = None
    is_multimodal: bool = False
    weight_bytes: int | None = None  # exact, from safetensors headers or index
    weight_bytes_source: str | None = None  # "safetensors-headers" | "safetensors-index" | None
    weight_param_count: int | None = None  # from headers, when present
    config: dict[str, Any] = {}  # config.json as read (top level)
    text_config: dict[str, Any] = {}  # effective text config, transformers defaults filled in


def resolve_model_dir(model: str) -> Path:
    """A local dir, or a HF repo id found in the local HF cache (HF_HUB_CACHE / HF_HOME). Never downloads."""
    raise NotImplementedError


def inspect(model: str) -> ModelFacts:
    """Read the model at `model` (path or cached repo id). ModelError names the file and the problem."""
    raise NotImplementedError


def facts_from_config(config: dict[str, Any], name: str, path: str | None = None) -> ModelFacts:
    """ModelFacts from a config dict alone (no weights): used by inspect and by the estimator benchmark."""
    raise NotImplementedError
