"""Stage 2 (inspect): fixture models, every reference config, vLLM's max-len rule, HF cache, bad files."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from smartrun.cli import main
from smartrun.errors import ModelError
from smartrun.memory import evidence
from smartrun.memory.evidence import config_from_reference
from smartrun.model import derive_max_model_len, facts_from_config, inspect, resolve_model_dir

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "fixtures" / "models"
REFERENCE = REPO / "fixtures" / "reference" / "models.json"


# --- every fixture model, key facts checked by hand against its config.json -------------------------
# (dir, layers, hidden, heads, kv, head_dim, vocab, derived max len, tied, weight bytes, source)
FIXTURE_FACTS = [
    # 896/14 = 64; tied; 494,032,768 params x 2 bytes
    ("qwen2.5-0.5b-instruct", 24, 896, 14, 2, 64, 151936, 32768, True, 988_065_536, "safetensors-headers"),
    # 3584/28 = 128; 7,615,616,512 params x 2
    ("qwen2.5-7b-instruct", 28, 3584, 28, 4, 128, 152064, 32768, False, 15_231_233_024, "safetensors-headers"),
    # llama3 rope: 131072 kept as is; 8,030,261,248 x 2
    ("llama-3.1-8b-instruct", 32, 4096, 32, 8, 128, 128256, 131072, False, 16_060_522_496, "safetensors-headers"),
    # head_dim 256 from config (not 3584/16 = 224); tied by Gemma2Config default; 9,241,705,984 x 2
    ("gemma-2-9b-it", 42, 3584, 16, 8, 256, 256000, 8192, True, 18_483_411_968, "safetensors-headers"),
    ("mixtral-8x7b-v0.1", 32, 4096, 32, 8, 128, 32000, 32768, False, 93_405_585_408, "safetensors-headers"),
    # yarn: original 4096 x factor 40 = 163840
    ("deepseek-v2-lite-chat", 27, 2048, 16, 16, 128, 102400, 163840, False, 31_412_968_448, "safetensors-index"),
    ("qwen3-30b-a3b-fp8", 48, 2048, 32, 4, 128, 151936, 40960, False, 31_174_545_408, "safetensors-index"),
    ("qwen2.5-32b-instruct-gptq-int4", 64, 5120, 40, 8, 128, 152064, 32768, False, 19_343_747_072,
     "safetensors-headers"),
    ("qwen2.5-72b-instruct-awq", 80, 8192, 64, 8, 128, 152064, 32768, False, 41_595_518_976, "safetensors-index"),
    # text_config; vocab 262208 and max 131072 from Gemma3TextConfig defaults; linear x8 not applied (gemma3)
    ("gemma-3-27b-it", 62, 5376, 32, 16, 128, 262208, 131072, True, 54_864_813_280, "safetensors-index"),
    ("qwen2.5-72b-instruct", 80, 8192, 64, 8, 128, 152064, 32768, False, 145_412_407_296, "safetensors-index"),
    # 16384/128 = 128; llama3 rope keeps 131072; 405,853,388,800 params x 2 (the cluster planning fixture)
    ("llama-3.1-405b-instruct", 126, 16384, 128, 8, 128, 128256, 131072, False, 811_706_777_600,
     "safetensors-index"),
]


def test_every_fixture_dir_is_in_the_table():
    dirs = {p.name for p in MODELS.iterdir() if p.is_dir()}
    assert dirs == {row[0] for row in FIXTURE_FACTS}


@pytest.mark.parametrize("row", FIXTURE_FACTS, ids=[r[0] for r in FIXTURE_FACTS])
def test_fixture_model_facts(row):
    name, layers, hidden, heads, kv, head_dim, vocab, max_len, tied, weight_bytes, source = row
    f = inspect(str(MODELS / name))
    assert (f.name, f.path) == (name, str(MODELS / name))
    assert (f.num_hidden_layers, f.hidden_size, f.num_attention_heads, f.num_kv_heads) == (layers, hidden, heads, kv)
    assert (f.head_dim, f.vocab_size, f.derived_max_model_len) == (head_dim, vocab, max_len)
    assert f.tie_word_embeddings is tied
    assert (f.weight_bytes, f.weight_bytes_source) == (weight_bytes, source)
    assert f.text_config["num_key_value_heads"] == kv and f.text_config["head_dim"] == head_dim


def test_header_param_counts_match_hugging_face():
    """weight_param_count sums shapes from the headers; HF's stated totals for unquantized models."""
    assert inspect(str(MODELS / "llama-3.1-8b-instruct")).weight_param_count == 8_030_261_248
    assert inspect(str(MODELS / "gemma-2-9b-it")).weight_param_count == 9_241_705_984
    assert inspect(str(MODELS / "mixtral-8x7b-v0.1")).weight_param_count == 46_702_792_704
    assert inspect(str(MODELS / "qwen2.5-72b-instruct")).weight_param_count is None  # index only


def test_qwen_sliding_window_switched_off():
    f = inspect(str(MODELS / "qwen2.5-7b-instruct"))
    assert f.config["sliding_window"] == 131072 and f.config["use_sliding_window"] is False
    assert f.sliding_window is None and f.layer_types is None
    assert f.moe is None and f.mla is None and f.quantization is None
    assert len(f.weight_files) == 4


def test_gemma2_alternates_starting_with_sliding():
    f = inspect(str(MODELS / "gemma-2-9b-it"))
    assert f.sliding_window == 4096
    assert f.layer_types[:4] == ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    assert f.layer_types.count("full_attention") == 21


def test_gemma3_nested_text_config_and_pattern():
    f = inspect(str(MODELS / "gemma-3-27b-it"))
    assert f.is_multimodal and f.model_type == "gemma3" and f.text_model_type == "gemma3_text"
    assert f.architecture == "Gemma3ForConditionalGeneration"
    assert f.intermediate_size == 21504 and f.sliding_window == 1024
    assert f.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    full = [i for i, t in enumerate(f.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    assert f.text_config["vocab_size"] == 262208 and "vocab_size" not in f.config["text_config"]


def test_moe_facts():
    mixtral = inspect(str(MODELS / "mixtral-8x7b-v0.1")).moe
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_intermediate_size) == (8, 2, 14336)
    assert mixtral.num_shared_experts == 0
    qwen3 = inspect(str(MODELS / "qwen3-30b-a3b-fp8")).moe
    assert (qwen3.num_experts, qwen3.experts_per_token, qwen3.moe_intermediate_size) == (128, 8, 768)
    assert qwen3.dense_intermediate_size == 6144
    deepseek = inspect(str(MODELS / "deepseek-v2-lite-chat")).moe
    assert (deepseek.num_experts, deepseek.experts_per_token, deepseek.moe_intermediate_size) == (64, 6, 1408)
    assert (deepseek.num_shared_experts, deepseek.shared_expert_intermediate_size) == (2, 2 * 1408)
    assert (deepseek.first_dense_layers, deepseek.moe_layer_freq) == (1, 1)


def test_mla_facts():
    mla = inspect(str(MODELS / "deepseek-v2-lite-chat")).mla
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim, mla.v_head_dim) == (512, 64, 128, 128)
    assert mla.q_lora_rank is None


def test_quantized_fixtures():
    awq = inspect(str(MODELS / "qwen2.5-72b-instruct-awq"))
    assert (awq.quantization.method, awq.quantization.weight_bits, awq.quantization.group_size) == ("awq", 4, 128)
    assert awq.quantization.activation_bits is None
    assert awq.intermediate_size == 29696
    gptq = inspect(str(MODELS / "qwen2.5-32b-instruct-gptq-int4"))
    assert (gptq.quantization.method, gptq.quantization.weight_bits, gptq.quantization.group_size) == ("gptq", 4, 128)
    assert gptq.torch_dtype == "float16"
    fp8 = inspect(str(MODELS / "qwen3-30b-a3b-fp8")).quantization
    assert (fp8.method, fp8.weight_bits, fp8.activation_bits) == ("fp8", 8, 8)


# --- every reference config ---------------------------------------------------------------------------


def _reference_entries():
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("entry", _reference_entries(), ids=lambda e: e["model_id"])
def test_facts_from_every_reference_config(entry):
    config = config_from_reference(entry)
    f = facts_from_config(config, entry["model_id"], hf_quant_config=entry.get("hf_quant_config"))
    text = entry.get("text_config") or entry
    assert f.num_hidden_layers == text["num_hidden_layers"]
    assert f.hidden_size == text["hidden_size"]
    assert f.num_kv_heads == (text.get("num_key_value_heads") or text["num_attention_heads"])
    assert f.head_dim == (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    assert (f.moe is not None) == bool(entry.get("moe"))
    assert (f.mla is not None) == bool(entry.get("mla"))
    quantized = bool(entry.get("quantization_config") or entry.get("hf_quant_config"))
    assert (f.quantization is not None) == quantized
    assert f.derived_max_model_len >= 4096


def test_the_estimator_evidence_reads_each_reference_config_as_the_model_ships_it():
    # one reader for the fixtures and the estimator's evidence: a fixture's config.json is what it gives, and an
    # explicit null is kept (Mistral-7B-v0.3 has no sliding window; without the null its type's 4096 applies)
    configs = evidence.reference_configs()
    for entry in _reference_entries():
        side = {"hf_quant_config": entry["hf_quant_config"]} if entry.get("hf_quant_config") else {}
        assert configs[entry["model_id"].lower()] == {**config_from_reference(entry), **side}, entry["model_id"]
    shipped = json.loads((MODELS / "qwen2.5-0.5b-instruct" / "config.json").read_text())
    entry = next(e for e in _reference_entries() if e["model_id"] == "Qwen/Qwen2.5-0.5B-Instruct")
    assert shipped == config_from_reference(entry) and shipped["sliding_window"] is None
    mistral = evidence.facts_for(configs["mistralai/mistral-7b-instruct-v0.3"], "mistral")
    assert mistral.sliding_window is None and mistral.layer_types is None


def test_modelopt_quantization_from_hf_quant_config(tmp_path):
    entry = next(e for e in _reference_entries() if e["model_id"] == "nvidia/Llama-3.1-70B-Instruct-FP8")
    (tmp_path / "config.json").write_text(json.dumps(config_from_reference(entry)))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(entry["hf_quant_config"]))
    q = inspect(str(tmp_path)).quantization
    assert (q.method, q.weight_bits, q.activation_bits) == ("modelopt", 8, 8)


# --- quantization_config shapes ------------------------------------------------------------------------

LLAMA_SMALL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("qc", "expected"),
    [
        ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "dynamic": True}}}},
         ("compressed-tensors", 8, 8, None)),
        ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "weights": {"num_bits": 4, "group_size": 128, "strategy": "group"}, "input_activations": None}}},
         ("compressed-tensors", 4, None, 128)),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
         ("bitsandbytes", 4, None, None)),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, ("bitsandbytes", 8, None, None)),
        ({"quant_method": "mxfp4"}, ("mxfp4", 4, None, 32)),
        ({"quant_method": "gptq", "bits": 8, "group_size": -1}, ("gptq", 8, None, None)),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, ("fp8", 8, 8, None)),
    ],
    ids=["w8a8", "w4a16", "bnb4", "bnb8", "mxfp4", "gptq-channel", "fp8"],
)
def test_quantization_config_forms(qc, expected):
    q = facts_from_config({**LLAMA_SMALL, "quantization_config": qc}, "m").quantization
    assert (q.method, q.weight_bits, q.activation_bits, q.group_size) == expected
    assert q.raw == qc


def test_defaults_dtype_key_and_missing_key():
    f = facts_from_config({**{k: v for k, v in LLAMA_SMALL.items() if k != "torch_dtype"}, "dtype": "float16"}, "m")
    assert f.torch_dtype == "float16" and f.dtype_declared
    bare = facts_from_config({k: v for k, v in LLAMA_SMALL.items() if k != "torch_dtype"}, "m")
    assert not bare.dtype_declared and not bare.tie_word_embeddings  # LlamaConfig default: untied
    with pytest.raises(ModelError, match=r"config\.json: missing required key 'hidden_size'"):
        facts_from_config({"model_type": "mystery", "num_hidden_layers": 2, "num_attention_heads": 2}, "m")


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
     ({"hidden_size": "big"}, "'hidden_size' must be a positive integer"),
     ({"num_local_experts": "eight", "num_experts_per_tok": 2}, "unexpected value (ValueError")],
    ids=["zero-heads", "string-size", "string-experts"],
)
def test_odd_values_are_model_errors(change, needle):
    with pytest.raises(ModelError) as err:
        facts_from_config({**LLAMA_SMALL, **change}, "m")
    assert err.value.message.startswith("config.json: ") and needle in err.value.message


def test_qwen2_sliding_window_on_upper_layers():
    config = {**LLAMA_SMALL, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096,
              "max_window_layers": 12}
    f = facts_from_config(config, "m")
    assert f.sliding_window == 4096
    assert f.layer_types == ("full_attention",) * 12 + ("sliding_attention",) * 4


def test_declared_layer_types_win():
    types = ["sliding_attention", "full_attention"] * 8
    f = facts_from_config({**LLAMA_SMALL, "sliding_window": 128, "layer_types": types}, "m")
    assert f.layer_types == tuple(types) and f.sliding_window == 128


@pytest.mark.parametrize("key", ["llm_config", "language_config"])
def test_other_nesting_keys(key):
    f = facts_from_config({"architectures": ["X"], "model_type": "wrapper", key: LLAMA_SMALL,
                           "vision_config": {"hidden_size": 1024}}, "m")
    assert f.is_multimodal and f.hidden_size == 2048 and f.text_model_type == "llama"


# --- vLLM's derived max model len ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "model_type", "expected"),
    [
        ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
          "original_max_position_embeddings": 8192}}, "llama", 131072),
        ({"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 32768}}, "qwen2", 131072),
        ({"max_position_embeddings": 163840, "rope_scaling": {"type": "yarn", "factor": 40,
          "original_max_position_embeddings": 4096}}, "deepseek_v2", 163840),
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 8.0}}, "llama", 32768),
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "llama", 8192),
        ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
         "gemma3_text", 131072),
        ({"max_position_embeddings": 131072, "rope_scaling": {"type": "longrope", "long_factor": [1.0]}},
         "phi3", 131072),
        ({"max_position_embeddings": 32768, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
         "qwen2_vl", 32768),
        ({"max_position_embeddings": 4096, "seq_length": 2048}, "chatglm", 2048),
        ({"hidden_size": 10}, "mystery", 2048),
        ({"max_position_embeddings": 32768, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 32768, "rope_theta": 1e6}}, "qwen3", 131072),
        ({"max_position_embeddings": 8192, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "mystery", 16384),
    ],
    ids=["llama3-as-is", "yarn-from-original", "yarn-deepseek", "linear-x8", "dynamic-x2", "gemma3-skipped",
         "longrope-as-is", "mrope-no-factor", "smallest-key", "no-key-2048", "v5-rope-parameters",
         "v5-per-layer-type"],
)
def test_derived_max_model_len(text, model_type, expected):
    assert derive_max_model_len(text, model_type)[0] == expected


def test_tokenizer_model_max_length_caps(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_SMALL))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    f = inspect(str(tmp_path))
    assert f.derived_max_model_len == 4096 and f.max_len_key == "tokenizer model_max_length"
    assert f.weight_bytes is None and f.weight_bytes_source is None and f.weight_param_count is None


# --- Hugging Face cache ----------------------------------------------------------------------------------


def _cache_repo(hub: Path, repo: str, revs: list[str], main: str | None) -> Path:
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    for rev in revs:
        snap = repo_dir / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(json.dumps({**LLAMA_SMALL, "_rev": rev}))
    if main:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(main + "\n")
    return repo_dir


def test_hf_cache_via_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    repo_dir = _cache_repo(tmp_path / "hf" / "hub", "acme/tiny", ["aaa", "bbb"], main="aaa")
    assert resolve_model_dir("acme/tiny") == repo_dir / "snapshots" / "aaa"
    f = inspect("acme/tiny")
    assert f.name == "acme/tiny" and f.config["_rev"] == "aaa"


def test_hf_hub_cache_wins_and_newest_snapshot_without_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "unused"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    repo_dir = _cache_repo(tmp_path / "hub", "acme/tiny", ["old", "new"], main=None)
    import os

    os.utime(repo_dir / "snapshots" / "old", (1_000_000, 1_000_000))
    assert resolve_model_dir("acme/tiny").name == "new"


def test_not_found_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hf" / "hub"
    with pytest.raises(ModelError) as err:
        resolve_model_dir("acme/missing")
    assert err.value.message == (
        f"model 'acme/missing' not found: not a directory and not in the Hugging Face cache at {hub}"
    )


# --- bad files: ModelError naming the file; the CLI prints one line and exits 2 --------------------------


def _header_file(path: Path, header: bytes, declared: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header)
    return path


def _model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_SMALL))
    return tmp_path


def _bad_short(d):
    (d / "model.safetensors").write_bytes(b"\x01\x02\x03")


def _bad_past_end(d):
    _header_file(d / "model.safetensors", b'{"a": 1}', declared=4096)


def _bad_absurd(d):
    _header_file(d / "model.safetensors", b"{}", declared=200 * 1024 * 1024)


def _bad_not_json(d):
    _header_file(d / "model.safetensors", b"not json at all!")


def _bad_deep(d):  # once a RecursionError traceback out of json
    _header_file(d / "model.safetensors", b"[" * 200_000)


def _bad_offsets(d):
    header = {"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 16]}}
    _header_file(d / "model.safetensors", json.dumps(header).encode())


@pytest.mark.parametrize(
    ("make_bad", "needle"),
    [
        (_bad_short, "shorter than 8"),
        (_bad_past_end, "runs past the file end"),
        (_bad_absurd, "exceeds 100 MiB"),
        (_bad_not_json, "header is not JSON"),
        (_bad_offsets, "needs 32 bytes, offsets give 16"),
        (_bad_deep, "nested too deeply"),
    ],
    ids=["short", "past-end", "absurd", "not-json", "offsets", "deep"],
)
def test_corrupt_safetensors(tmp_path, make_bad, needle):
    d = _model_dir(tmp_path)
    make_bad(d)
    with pytest.raises(ModelError) as err:
        inspect(str(d))
    assert err.value.message.startswith(f"corrupt safetensors header in {d / 'model.safetensors'}: ")
    assert needle in err.value.message


def test_header_only_file_is_accepted(tmp_path):
    """Offsets may point past the end of the file: only the header is read."""
    d = _model_dir(tmp_path)
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [1024, 1024],
                                                       "data_offsets": [0, 4 * 1024 * 1024]}}
    _header_file(d / "model.safetensors", json.dumps(header).encode())
    f = inspect(str(d))
    assert (f.weight_bytes, f.weight_param_count, f.weight_bytes_source) == (4 * 1024 * 1024, 1024 * 1024,
                                                                              "safetensors-headers")


def test_index_without_total_size_reads_its_shards(tmp_path):
    d = _model_dir(tmp_path)
    header = {"w": {"dtype": "BF16", "shape": [8, 8], "data_offsets": [0, 128]}}
    _header_file(d / "a.safetensors", json.dumps(header).encode())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    f = inspect(str(d))
    assert (f.weight_bytes, f.weight_bytes_source, f.weight_files) == (128, "safetensors-headers", ("a.safetensors",))
    (d / "a.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no metadata\.total_size"):
        inspect(str(d))


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "config.json not found"), ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
     ('{"a":' * 100_000, "nested too deeply")],
    ids=["missing", "invalid-json", "not-object", "deep"],
)
def test_bad_config_json(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelError) as err:
        inspect(str(tmp_path))
    assert str(tmp_path / "config.json") in err.value.message and needle in err.value.message


@pytest.mark.parametrize("key", ["num_hidden_layers", "num_attention_heads", "intermediate_size"])
def test_absurd_sizes_are_refused_not_estimated_forever(tmp_path, key):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
              "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps({**config, key: 10**13}))
    with pytest.raises(ModelError) as err:
        inspect(str(tmp_path))
    assert key in err.value.message and "absurdly large" in err.value.message


@pytest.mark.parametrize(("extra", "words"), [
    ({"rope_scaling": "yarn"}, "'rope_scaling' must be a JSON object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "'rope_scaling.factor' must be a positive number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e308}}, "'rope_scaling.factor' must be a positive number"),
    ({"max_position_embeddings": -1}, "'max_position_embeddings' must be a positive integer"),
    ({"model_type": 5}, "'model_type' must be a string"),
    ({"vision_config": {"hidden_size": "x"}}, "'vision_config.hidden_size' must be a positive integer"),
    ({"vision_config": {"hidden_size": 1152, "image_size": 1e30}}, "'vision_config.image_size' = 1e+30 is absurdly"),
])
def test_rope_and_positions_the_estimator_would_trip_on_are_refused(tmp_path, extra, words):
    """Once inspect passed these and `model estimate` / `model run` crashed with a traceback."""
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_SMALL, **extra}))
    with pytest.raises(ModelError, match=re.escape(words)):
        inspect(str(tmp_path))


def test_index_metadata_that_is_not_an_object_is_named(tmp_path):
    d = _model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": [1], "weight_map": {}}))
    with pytest.raises(ModelError, match="'metadata' must be a JSON object, got list"):
        inspect(str(d))


def test_config_json_that_is_a_directory_is_not_called_missing(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ModelError, match=r"config\.json: not a regular file$"):
        inspect(str(tmp_path))


def test_missing_key_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 64}))
    with pytest.raises(ModelError) as err:
        inspect(str(tmp_path))
    assert err.value.message.startswith(f"{tmp_path / 'config.json'}: missing required key")


def test_cli_bad_input_one_line_exit_2(tmp_path):
    d = _model_dir(tmp_path)
    _bad_absurd(d)
    run = subprocess.run([sys.executable, "-m", "smartrun", "model", "inspect", str(d)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"localaistack: corrupt safetensors header in {d / 'model.safetensors'}")


def test_cli_missing_model_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["model", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localaistack: model '") and err.count("\n") == 1


def test_cli_summary_and_json(capsys):
    assert main(["model", "inspect", str(MODELS / "deepseek-v2-lite-chat")]) == 0
    out = capsys.readouterr().out
    assert "MLA             kv_lora_rank 512" in out and "163840" in out and "29.26 GiB" in out
    assert main(["model", "inspect", str(MODELS / "gemma-3-27b-it"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["derived_max_model_len"] == 131072 and data["is_multimodal"] is True and "config" not in data
    assert main(["model", "inspect", str(MODELS / "gemma-3-27b-it"), "--json", "--verbose"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["model_type"] == "gemma3"
