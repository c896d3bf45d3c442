"""KV cache: layer kinds, vLLM's grouping, bytes per token and blocks per request."""

from __future__ import annotations

import math

from smartrun.frozen import Frozen
from smartrun.memory.weights import _tc
from smartrun.model import ModelFacts


class KVGroup(Frozen):
    """A KV-cache group of the hybrid manager: `layers` layers sharing one spec."""

    kind: str  # "full" | "sliding" | "chunked"
    layers: int  # layers in the group (group size, padding included)
    window: int | None = None


def layer_kinds(model: ModelFacts) -> list[tuple[str, int | None]]:
    """Per layer: (full|sliding|chunked, window). Llama-4 style chunked local attention too."""
    tc = _tc(model)
    n = model.num_hidden_layers
    if model.layer_types:
        kinds = []
        for t in model.layer_types:
            if "sliding" in t:
                kinds.append(("sliding", model.sliding_window))
            elif "chunk" in t:
                kinds.append(("chunked", tc.get("attention_chunk_size")))
            else:
                kinds.append(("full", None))
        return kinds
    chunk = tc.get("attention_chunk_size")
    if chunk:
        nope = tc.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(n)]
        return [("chunked", chunk) if nope[i] else ("full", None) for i in range(n)]
    if model.sliding_window and tc.get("use_sliding_window", True) is not False:
        return [("sliding", model.sliding_window)] * n
    return [("full", None)] * n


def kv_groups(kinds: list[tuple[str, int | None]]) -> list[KVGroup]:
    """vLLM's grouping: group size = fewest layers of one type (or the most, when close), pad the rest."""
    by_type: dict[tuple[str, int | None], int] = {}
    for layer in kinds:
        by_type[layer] = by_type.get(layer, 0) + 1
    if len(by_type) == 1:
        (kind, window), count = next(iter(by_type.items()))
        return [KVGroup(kind=kind, layers=count, window=window)]
    smallest, largest = min(by_type.values()), max(by_type.values())
    size = largest if largest < smallest * 1.25 else smallest
    groups: list[KVGroup] = []
    for (kind, window), count in by_type.items():
        groups += [KVGroup(kind=kind, layers=size, window=window)] * math.ceil(count / size)
    return groups


def kv_bytes_per_token_layer(
    model: ModelFacts, kv_elem_bytes: int, tp: int, mla_latent: bool = True, mla_align_elems: int = 0
) -> int:
    """Bytes per token per layer on one GPU: MLA latent (replicated) or K+V of the rank's KV heads.

    Before vLLM 0.7.1 (V0, no MLA backend) DeepSeek's attention cached every head's K and V padded
    to 256 (vllm/model_executor/models/deepseek_v2.py, 0.6.6.post1 l.266-312): 2 x heads/TP x 256.
    `mla_align_elems`: V0 0.7.2-0.7.3 rounds the latent entry up to 256 bytes of the model dtype
    (vllm/worker/cache_engine.py get_cache_block_size, align_to_256bytes; 576 -> 640 for 16-bit).
    """
    if model.mla is not None and not mla_latent:
        return 2 * max(1, model.num_attention_heads // tp) * 256 * kv_elem_bytes
    if model.mla is not None:
        entry = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
        if mla_align_elems:
            entry = -(-entry // mla_align_elems) * mla_align_elems
        return entry * kv_elem_bytes
    heads_rank = max(1, model.num_kv_heads // tp)
    return 2 * heads_rank * model.head_dim * kv_elem_bytes


def blocks_per_request(group: KVGroup, max_model_len: int, block_size: int, mnbt: int, in_flight_batches: int = 2) -> int:
    """Blocks one request at max_model_len takes in a group (sliding/chunked capped by window + in flight).

    `in_flight_batches`: how many max_num_batched_tokens batches beyond the window vLLM counts
    (Profile.sliding_in_flight_batches: 1 in 0.8.4-0.11.0's SlidingWindowSpec.max_memory_usage_bytes)."""
    if group.kind == "full" or not group.window:
        return math.ceil(max_model_len / block_size)
    in_flight = in_flight_batches * mnbt
    span = min(group.window - 1 + in_flight, max_model_len)
    return math.ceil(span / block_size) + 1
