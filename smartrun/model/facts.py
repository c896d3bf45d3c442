"""ModelFacts and how config.json becomes them (transformers' defaults, nested text configs, MoE, MLA, quantization)."""

from __future__ import annotations

import math
from typing import Any

from smartrun.errors import ModelError
from smartrun.frozen import Frozen


class MoEFacts(Frozen):
    num_experts: int  # routed experts
    experts_per_token: int
    moe_intermediate_size: int  # of one routed expert
    num_shared_experts: int = 0
    # Intermediate size of the whole shared-expert MLP (all shared experts together):
    # Qwen2-MoE shared_expert_intermediate_size; DeepSeek n_shared_experts * moe_intermediate_size.
    shared_expert_intermediate_size: int | None = None
    first_dense_layers: int = 0  # e.g. DeepSeek first_k_dense_replace
    moe_layer_freq: int = 1  # every n-th layer (after the dense ones) is MoE
    dense_intermediate_size: int | None = None  # MLP size of the non-MoE layers when it differs
    mlp_only_layers: tuple[int, ...] = ()  # Qwen-MoE layers that are dense


class MLAFacts(Frozen):
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None


class QuantFacts(Frozen):
    method: str  # "awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes", "mxfp4", "modelopt", ...
    weight_bits: int | None = None
    activation_bits: int | None = None  # 8 for w8a8, None when weight-only
    group_size: int | None = None  # None: per-channel (-1 in GPTQ) or not stated
    raw: dict[str, Any] = {}


class ModelFacts(Frozen):
    """What the estimator and rules need to know about a model. Sizes are of the text (language) model."""

    name: str  # repo id when known, else directory name
    path: str | None = None  # local directory holding config.json
    architecture: str
    model_type: str  # top-level model_type (what vLLM's hf_config.model_type says)
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
    sliding_window: int | None = None  # effective window (None when the config disables it)
    layer_types: tuple[str, ...] | None = None  # per layer: "full_attention" | "sliding_attention"
    torch_dtype: str = "bfloat16"
    tie_word_embeddings: bool = False
    moe: MoEFacts | None = None
    mla: MLAFacts | None = None
    quantization: QuantFacts | None = None
    is_multimodal: bool = False
    weight_bytes: int | None = None  # exact, from safetensors headers or index
    weight_bytes_source: str | None = None  # "safetensors-headers" | "safetensors-index" | None
    weight_param_count: int | None = None  # from headers: stored elements (packed int4 qweight counts 8 as 1)
    config: dict[str, Any] = {}  # config.json as read (top level)
    text_config: dict[str, Any] = {}  # effective text config, transformers defaults filled in
    # Added by the inspect stage (all defaulted):
    text_model_type: str | None = None  # model_type of the text config, e.g. "gemma3_text"
    max_len_key: str | None = None  # config key the derived max length started from
    weight_files: tuple[str, ...] = ()  # safetensors files the weights were counted from
    dtype_declared: bool = True  # False when config.json names no dtype (torch_dtype is then assumed)


# --- transformers defaults ---------------------------------------------------------------------------
# Keys a config.json may omit take the __init__ defaults of the model type's configuration class.
# Each entry names its transformers file (src/transformers/models/<dir>/configuration_<dir>.py).
_COMMON_DEFAULTS: dict[str, Any] = {"tie_word_embeddings": True, "rope_scaling": None}  # PretrainedConfig

_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # llama/configuration_llama.py (LlamaConfig)
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                  tie_word_embeddings=False, rope_theta=10000.0),
    # mistral/configuration_mistral.py (MistralConfig)
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096, tie_word_embeddings=False, rope_theta=10000.0),
    # mixtral/configuration_mixtral.py (MixtralConfig)
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False, rope_theta=1e6),
    # qwen2/configuration_qwen2.py (Qwen2Config)
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  tie_word_embeddings=False, rope_theta=10000.0),
    # qwen2_moe/configuration_qwen2_moe.py (Qwen2MoeConfig)
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                      use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                      decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                      mlp_only_layers=[], tie_word_embeddings=False, rope_theta=10000.0),
    # qwen3/configuration_qwen3.py (Qwen3Config)
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  tie_word_embeddings=False, rope_theta=10000.0),
    # qwen3_moe/configuration_qwen3_moe.py (Qwen3MoeConfig)
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
                      use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                      decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8,
                      num_experts=128, mlp_only_layers=[], tie_word_embeddings=False, rope_theta=10000.0),
    # gemma/configuration_gemma.py (GemmaConfig)
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  tie_word_embeddings=True, rope_theta=10000.0),
    # gemma2/configuration_gemma2.py (Gemma2Config)
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   sliding_window=4096, tie_word_embeddings=True, rope_theta=10000.0),
    # gemma3/configuration_gemma3.py (Gemma3TextConfig)
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, sliding_window=4096, sliding_window_pattern=6,
                        rope_scaling=None, tie_word_embeddings=True, rope_theta=1e6,
                        rope_local_base_freq=10000.0),
    # phi3/configuration_phi3.py (Phi3Config)
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                 sliding_window=None, tie_word_embeddings=False, rope_theta=10000.0),
    # deepseek_v2/configuration_deepseek_v2.py (DeepseekV2Config)
    "deepseek_v2": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1407, num_hidden_layers=30, num_attention_heads=32,
                        num_key_value_heads=32, n_shared_experts=None, n_routed_experts=None,
                        num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0,
                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                        qk_nope_head_dim=128, max_position_embeddings=2048, tie_word_embeddings=False),
    # deepseek_v3/configuration_deepseek_v3.py (DeepseekV3Config)
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                        num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3,
                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                        qk_nope_head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False),
}
_TYPE_DEFAULTS["qwen2_5_vl_text"] = _TYPE_DEFAULTS["qwen2"]

# Multimodal wrappers whose nested text config may omit model_type (transformers' defaults).
_NESTED_TEXT_TYPE = {"gemma3": "gemma3_text", "llava": "llama", "mistral3": "mistral",
                     "llama4": "llama4_text", "qwen2_5_vl": "qwen2_5_vl_text"}
_NESTED_TEXT_KEYS = ("text_config", "llm_config", "language_config")
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size")

# vLLM's keys for the model's own length limit (model_arch_config_convertor / _get_and_verify_max_len).
MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
VLLM_DEFAULT_MAX_LEN = 2048  # vLLM's assumption when none of MAX_LEN_KEYS is present


def _text_section(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The dict holding the language model's fields, and whether it was nested."""
    for key in _NESTED_TEXT_KEYS:
        sub = config.get(key)
        if isinstance(sub, dict):
            return sub, True
    return config, False


def effective_text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config with transformers' defaults for its model_type filled in."""
    section, nested = _text_section(config)
    top_type = str(config.get("model_type", ""))
    text_type = section.get("model_type") or (_NESTED_TEXT_TYPE.get(top_type, top_type) if nested else top_type)
    defaults = {**_COMMON_DEFAULTS, **_TYPE_DEFAULTS.get(text_type, {})}
    merged = {**defaults, **section, "model_type": text_type}
    if nested:  # wrappers carry dtype / tying at the top level; the text config wins where it has them
        for key in ("torch_dtype", "dtype", "tie_word_embeddings"):
            if key not in section and key in config:
                merged[key] = config[key]
    return merged


def _need(cfg: dict[str, Any], key: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise ModelError(f"config.json: missing required key '{key}' (model_type {cfg.get('model_type')!r})")
    return value


# Far above any real model; past them a config is garbage, and the estimator's per-layer loops would hang.
MAX_LAYERS_OR_HEADS = 100_000
MAX_SIZE = 2**40


def _int(value: Any, key: str, limit: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value <= 0:
        raise ModelError(f"config.json: '{key}' must be a positive integer, got {value!r}")
    if value > limit:
        raise ModelError(f"config.json: '{key}' = {value!r} is absurdly large (limit {limit:,})")
    return int(value)


_VISION_SIZES = ("hidden_size", "embed_dim", "width", "intermediate_size", "num_hidden_layers", "depth",
                 "num_layers", "patch_size", "num_channels", "in_channels", "image_size")


def _check_strings_and_vision(config: dict[str, Any]) -> None:
    """model_type must be text, and the vision sizes the estimator counts must be sane integers."""
    for where, section in (("", config), ("text_config.", config.get("text_config"))):
        kind = section.get("model_type") if isinstance(section, dict) else None
        if kind is not None and not isinstance(kind, str):
            raise ModelError(f"config.json: '{where}model_type' must be a string, got {kind!r}")
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return
    for key in _VISION_SIZES:
        value = vision.get(key)
        if isinstance(value, list) and key == "image_size":  # [height, width] in some configs
            value = value[0] if value else None
        if value is not None:
            limit = MAX_LAYERS_OR_HEADS if key in ("num_hidden_layers", "depth", "num_layers") else MAX_SIZE
            _int(value, f"vision_config.{key}", limit)


def _check_rope_and_positions(text: dict[str, Any]) -> None:
    """Refuse what vLLM would refuse and the estimator would trip on: a rope_scaling that is not a table,
    a factor that is not a finite positive number, a max_position_embeddings that is not a sane integer."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key)
        if rope is not None and not isinstance(rope, dict):
            raise ModelError(f"config.json: '{key}' must be a JSON object, got {rope!r}")
        factors = [rope.get("factor")] if isinstance(rope, dict) else []
        if isinstance(rope, dict):  # transformers v5: one rope dict per layer type
            factors += [r.get("factor") for r in rope.values() if isinstance(r, dict)]
        for factor in factors:
            ok = isinstance(factor, int | float) and not isinstance(factor, bool) and 0 < factor <= 1e6
            if factor is not None and not ok:
                raise ModelError(f"config.json: '{key}.factor' must be a positive number, got {factor!r}")
    if text.get("max_position_embeddings") is not None:
        _int(text["max_position_embeddings"], "max_position_embeddings")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str | None:
    """The rope type, whichever key spells it ('rope_type' in new configs, 'type' in old ones)."""
    if not rope_scaling:
        return None
    return str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")


def derive_max_model_len(
    text: dict[str, Any], model_type: str, tokenizer_max_length: int | None = None
) -> tuple[int, str | None]:
    """vLLM's derived max_model_len (config/model.py `_get_and_verify_max_len`), and the key it came from.

    1. D = the smallest value among MAX_LEN_KEYS present (not None) in the text config; none -> 2048.
    2. D = min(D, tokenizer_config.json model_max_length) when that is given.
    3. RoPE (rope_scaling, or transformers v5 rope_parameters): skipped entirely when "gemma3" is in the
       model_type (Gemma 3's 128K is already scaled). Types su / longrope / llama3 leave D as is (their
       max_position_embeddings is final). Any other type (linear, dynamic, yarn, default/mrope...)
       multiplies D by its "factor" (1 when absent); for yarn D first becomes its
       "original_max_position_embeddings" when given. So yarn gives original x factor, not D x factor.
    """
    derived: float = math.inf
    key_used: str | None = None
    for key in MAX_LEN_KEYS:
        value = text.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < derived:
            derived, key_used = value, key
    if tokenizer_max_length is not None and tokenizer_max_length < derived:
        derived, key_used = tokenizer_max_length, "tokenizer model_max_length"
    if derived == math.inf:
        derived = VLLM_DEFAULT_MAX_LEN
    ropes = _rope_dicts(text)
    if ropes and "gemma3" not in model_type:
        factor = 1.0
        for rope in ropes:  # transformers v5 may give one rope dict per layer type; vLLM uses the last factor
            rope_type = rope_type_of(rope)
            if rope_type not in ("su", "longrope", "llama3"):
                factor = rope.get("factor", factor)
                if rope_type == "yarn" and rope.get("original_max_position_embeddings") is not None:
                    derived = rope["original_max_position_embeddings"]
        derived *= factor
    return int(derived), key_used


def _rope_dicts(text: dict[str, Any]) -> list[dict[str, Any]]:
    """rope_scaling, or transformers v5 rope_parameters (flat, or one dict per layer type), as a list."""
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return []
    if all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def _rope_scaling_fact(text: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling to report: rope_scaling, or rope_parameters when they scale (not plain default)."""
    if isinstance(text.get("rope_scaling"), dict):
        return text["rope_scaling"]
    params = text.get("rope_parameters")
    if isinstance(params, dict) and any(rope_type_of(r) != "default" for r in _rope_dicts(text)):
        return params
    return None


def _layer_types(text: dict[str, Any], num_layers: int) -> tuple[tuple[str, ...] | None, int | None]:
    """Per-layer attention kinds and the effective sliding window, following transformers' configs."""
    window = text.get("sliding_window")
    kind = text.get("model_type", "")
    if "use_sliding_window" in text and not text.get("use_sliding_window"):
        window = None  # Qwen2-family: window listed but switched off
    declared = text.get("layer_types")
    if isinstance(declared, list) and len(declared) == num_layers:
        types = tuple(str(t) for t in declared)
        return types, (window if "sliding_attention" in types else None)
    if not window:
        return None, None
    if kind in ("gemma2", "cohere2") or (kind == "gemma3_text" and text.get("sliding_window_pattern") is None):
        pattern = 2 if kind == "gemma2" else 6
    elif kind == "gemma3_text":
        pattern = int(text["sliding_window_pattern"])
    elif "max_window_layers" in text and "use_sliding_window" in text:
        # Qwen2/Qwen3: layers from max_window_layers on use the window (transformers' Qwen2Config).
        start = int(text.get("max_window_layers") or 0)
        return tuple("sliding_attention" if i >= start else "full_attention" for i in range(num_layers)), window
    else:  # Mistral, Phi-3 ...: one window on every layer
        return ("sliding_attention",) * num_layers, window
    # Gemma 2/3: every pattern-th layer (1-based) is full, the rest slide (layer 0 slides).
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)), window


def _moe_facts(text: dict[str, Any]) -> MoEFacts | None:
    """Routed/shared expert facts, whichever family's key names the config uses."""
    routed = text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts")
    if not routed:
        return None
    per_token = text.get("num_experts_per_tok") or text.get("experts_per_token") or text.get("moe_topk")
    if not per_token:
        raise ModelError("config.json: MoE model without 'num_experts_per_tok'")
    kind = text.get("model_type", "")
    if kind.startswith("llama4"):  # every interleave_moe_layer_step-th layer is MoE, with one shared expert
        return MoEFacts(num_experts=int(routed), experts_per_token=int(per_token),
                        moe_intermediate_size=int(_need(text, "intermediate_size")), num_shared_experts=1,
                        shared_expert_intermediate_size=int(text["intermediate_size"]),
                        moe_layer_freq=int(text.get("interleave_moe_layer_step") or 1),
                        dense_intermediate_size=text.get("intermediate_size_mlp"))
    expert_size = int(text.get("moe_intermediate_size") or _need(text, "intermediate_size"))
    n_shared = int(text.get("n_shared_experts") or 0)
    shared_size = text.get("shared_expert_intermediate_size")
    if shared_size:
        n_shared = max(n_shared, 1)
    elif n_shared:
        shared_size = n_shared * expert_size
    dense = text.get("intermediate_size")
    return MoEFacts(
        num_experts=int(routed),
        experts_per_token=int(per_token),
        moe_intermediate_size=expert_size,
        num_shared_experts=n_shared,
        shared_expert_intermediate_size=int(shared_size) if shared_size else None,
        first_dense_layers=int(text.get("first_k_dense_replace") or 0),
        moe_layer_freq=int(text.get("moe_layer_freq") or text.get("decoder_sparse_step") or 1),
        dense_intermediate_size=int(dense) if dense and dense != expert_size else None,
        mlp_only_layers=tuple(int(i) for i in text.get("mlp_only_layers") or ()),
    )


def _mla_facts(text: dict[str, Any]) -> MLAFacts | None:
    if not text.get("kv_lora_rank"):
        return None
    return MLAFacts(
        kv_lora_rank=int(text["kv_lora_rank"]),
        qk_rope_head_dim=int(_need(text, "qk_rope_head_dim")),
        qk_nope_head_dim=int(_need(text, "qk_nope_head_dim")),
        v_head_dim=int(_need(text, "v_head_dim")),
        q_lora_rank=int(text["q_lora_rank"]) if text.get("q_lora_rank") else None,
    )


def quant_facts(qc: dict[str, Any] | None) -> QuantFacts | None:
    """QuantFacts from a config.json `quantization_config` block (None when the model is not quantized)."""
    if not isinstance(qc, dict) or not qc:
        return None
    method = str(qc.get("quant_method") or qc.get("quant_algo") or "unknown").lower()
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    act_bits = None
    if method == "compressed-tensors":
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        first = groups[0] if groups else {}
        weights = first.get("weights") or {}
        inputs = first.get("input_activations") or {}
        bits, group = weights.get("num_bits"), weights.get("group_size")
        act_bits = inputs.get("num_bits")
    elif method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else bits
    elif method in ("fp8", "fbgemm_fp8"):
        bits = 8
        act_bits = 8 if qc.get("activation_scheme") or method == "fbgemm_fp8" else None
    elif method == "mxfp4":
        bits, group = 4, group or 32
    elif method in ("modelopt", "fp8_modelopt") or "quant_algo" in qc:
        algo = str(qc.get("quant_algo", "")).upper()
        method = "modelopt"
        if "FP8" in algo:
            bits, act_bits = 8, 8
        elif "NVFP4" in algo or "FP4" in algo:
            bits, act_bits, group = 4, 4, group or 16
    if group is not None and int(group) <= 0:
        group = None  # GPTQ -1: per-channel
    return QuantFacts(
        method=method,
        weight_bits=int(bits) if bits else None,
        activation_bits=int(act_bits) if act_bits else None,
        group_size=int(group) if group else None,
        raw=qc,
    )


def facts_from_config(
    config: dict[str, Any],
    name: str,
    path: str | None = None,
    *,
    tokenizer_max_length: int | None = None,
    hf_quant_config: dict[str, Any] | None = None,
) -> ModelFacts:
    """ModelFacts from a config dict alone (no weights): used by inspect and by the estimator benchmark.

    `tokenizer_max_length` (tokenizer_config.json model_max_length) caps the derived length as in vLLM;
    `hf_quant_config` (hf_quant_config.json, ModelOpt) names the quantization when config.json does not.
    """
    if not isinstance(config, dict):
        raise ModelError(f"config.json: expected a JSON object, got {type(config).__name__}")
    try:
        return _facts(config, name, path, tokenizer_max_length, hf_quant_config)
    except (TypeError, ValueError, KeyError, IndexError) as err:  # odd value types, e.g. a string for a size
        detail = " ".join(str(err).split())[:200]
        raise ModelError(f"config.json: unexpected value ({type(err).__name__}: {detail})") from None


def _facts(
    config: dict[str, Any],
    name: str,
    path: str | None,
    tokenizer_max_length: int | None,
    hf_quant_config: dict[str, Any] | None,
) -> ModelFacts:
    _check_strings_and_vision(config)
    text = effective_text_config(config)
    nested = _text_section(config)[1]
    model_type = str(config.get("model_type") or text.get("model_type") or "unknown")
    layers = _int(_need(text, "num_hidden_layers"), "num_hidden_layers", MAX_LAYERS_OR_HEADS)
    hidden = _int(_need(text, "hidden_size"), "hidden_size")
    heads = _int(_need(text, "num_attention_heads"), "num_attention_heads", MAX_LAYERS_OR_HEADS)
    for key in _REQUIRED:
        _need(text, key)
    _check_rope_and_positions(text)
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or 0
    if not head_dim or head_dim <= 0:
        head_dim = hidden // heads
    text = {**text, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    layer_types, window = _layer_types(text, layers)
    derived, key_used = derive_max_model_len(text, model_type, tokenizer_max_length)
    dtype = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")
    qc = config.get("quantization_config") or text.get("quantization_config")
    if not qc and isinstance(hf_quant_config, dict):
        qc = {"quant_method": "modelopt", **(hf_quant_config.get("quantization") or {})}
    archs = config.get("architectures") or text.get("architectures") or [model_type]
    return ModelFacts(
        name=name,
        path=path,
        architecture=str(archs[0]),
        model_type=model_type,
        text_model_type=str(text.get("model_type") or model_type),
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=_int(text["intermediate_size"], "intermediate_size"),
        num_attention_heads=heads,
        num_kv_heads=_int(kv_heads, "num_key_value_heads", MAX_LAYERS_OR_HEADS),
        head_dim=_int(head_dim, "head_dim"),
        vocab_size=_int(text["vocab_size"], "vocab_size"),
        max_position_embeddings=text.get("max_position_embeddings"),
        derived_max_model_len=derived,
        max_len_key=key_used,
        rope_scaling=_rope_scaling_fact(text),
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        torch_dtype=str(dtype).removeprefix("torch.") if dtype else "bfloat16",
        dtype_declared=bool(dtype),
        tie_word_embeddings=bool(text.get("tie_word_embeddings")),
        moe=_moe_facts(text),
        mla=_mla_facts(text),
        quantization=quant_facts(qc),
        is_multimodal=nested or any(k in config for k in ("vision_config", "audio_config", "vision_tower")),
        config=config,
        text_config=text,
    )
