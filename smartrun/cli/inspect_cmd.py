"""`localaistack model inspect MODEL [--json] [--verbose]`: print what smartrun knows about a model."""

from __future__ import annotations

import json
from typing import Any

from smartrun.model import inspect

GIB = 1024**3


def register(subparsers) -> None:
    """Add `inspect` to the `model` group."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's facts (config.json, safetensors headers)",
        description="Read config.json and safetensors headers of a local model dir or a cached HF repo id.",
        allow_abbrev=False,
    )
    parser.add_argument("model", metavar="MODEL", help="model directory or Hugging Face repo id (cache only)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.add_argument("--verbose", action="store_true", help="with --json: include the raw config.json")
    parser.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    facts = inspect(args.model)
    if args.json:
        exclude = None if args.verbose else {"config", "text_config"}
        print(json.dumps(facts.model_dump(mode="json", exclude=exclude), indent=2))
    else:
        print(summary(facts))
    return 0


def _layer_pattern(types: tuple[str, ...] | None, window: int | None) -> str:
    if not window:
        return "none"
    if not types:
        return f"{window} tokens"
    sliding = sum(t == "sliding_attention" for t in types)
    full = [i for i, t in enumerate(types) if t != "sliding_attention"]
    shown = ", ".join(map(str, full[:8])) + (", ..." if len(full) > 8 else "")
    where = f"; full attention on layers {shown}" if full else " (all layers)"
    return f"{window} tokens on {sliding}/{len(types)} layers{where}"


def _quant(q: Any) -> str:
    if q is None:
        return "none"
    parts = [q.method]
    if q.weight_bits:
        parts.append(f"w{q.weight_bits}" + (f"a{q.activation_bits}" if q.activation_bits else ""))
    if q.group_size:
        parts.append(f"group {q.group_size}")
    return ", ".join(parts)


def summary(f: Any) -> str:
    """A readable multi-line summary of ModelFacts (no decisions, only formatting)."""
    rope = "none"
    if f.rope_scaling:
        kind = f.rope_scaling.get("rope_type") or f.rope_scaling.get("type")
        factor = f.rope_scaling.get("factor")
        rope = f"{kind}" + (f" x{factor:g}" if isinstance(factor, int | float) else "")
    moe = "no"
    if f.moe:
        m = f.moe
        moe = f"{m.num_experts} experts, {m.experts_per_token} per token, expert size {m.moe_intermediate_size}"
        if m.num_shared_experts:
            moe += f", {m.num_shared_experts} shared ({m.shared_expert_intermediate_size})"
        if m.first_dense_layers:
            moe += f", {m.first_dense_layers} dense layer(s) first"
    mla = "no"
    if f.mla:
        a = f.mla
        mla = (f"kv_lora_rank {a.kv_lora_rank}, rope {a.qk_rope_head_dim}, nope {a.qk_nope_head_dim}, "
               f"v {a.v_head_dim}, q_lora_rank {a.q_lora_rank}")
    if f.weight_bytes is not None:
        weights = f"{f.weight_bytes / GIB:.2f} GiB ({f.weight_bytes:,} bytes, {f.weight_bytes_source})"
        if f.weight_param_count:
            weights += f", {f.weight_param_count:,} stored elements"
    else:
        weights = "no safetensors found (estimate from config)"
    max_len = f"{f.derived_max_model_len}"
    if f.max_len_key:
        max_len += f" (from {f.max_len_key}={f.text_config.get(f.max_len_key, '?')}, as vLLM derives it)"
    dtype = f.torch_dtype + ("" if f.dtype_declared else " (not in config.json; assumed)")
    rows = [
        ("model", f.name),
        ("path", f.path or "-"),
        ("architecture", f"{f.architecture} (model_type {f.model_type}"
         + (f", text {f.text_model_type})" if f.text_model_type != f.model_type else ")")),
        ("multimodal", "yes" if f.is_multimodal else "no"),
        ("layers", f.num_hidden_layers),
        ("hidden size", f"{f.hidden_size} (MLP {f.intermediate_size})"),
        ("heads", f"{f.num_attention_heads} query / {f.num_kv_heads} kv, head_dim {f.head_dim}"),
        ("vocab", f"{f.vocab_size}" + (" (tied embeddings)" if f.tie_word_embeddings else "")),
        ("max model len", max_len),
        ("rope scaling", rope),
        ("sliding window", _layer_pattern(f.layer_types, f.sliding_window)),
        ("MoE", moe),
        ("MLA", mla),
        ("dtype", dtype),
        ("quantization", _quant(f.quantization)),
        ("weights", weights),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
