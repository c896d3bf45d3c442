"""The knob catalogue: parsing vLLM syntax into typed pins, and building argv back."""

from __future__ import annotations

import pytest

from smartrun.argv import parse_user_args
from smartrun.errors import InputError
from smartrun.knobs import AUTO_MAX_MODEL_LEN, CATALOGUE, TUNING_KNOBS, build_argv


def test_catalogue_has_the_tuning_knobs_and_user_only_ones():
    for name in ("max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "pipeline_parallel_size",
                 "max_num_seqs", "max_num_batched_tokens", "dtype", "kv_cache_dtype", "enforce_eager",
                 "optimization_level", "disable_custom_all_reduce", "enable_prefix_caching",
                 "enable_chunked_prefill"):
        assert CATALOGUE[name].llm_may_change, name
        assert name in TUNING_KNOBS
    for name in ("host", "port", "api_key", "trust_remote_code", "served_model_name", "download_dir",
                 "chat_template", "worker_cls"):
        assert not CATALOGUE[name].llm_may_change, name
    assert CATALOGUE["trust_remote_code"].security
    assert CATALOGUE["gpu_memory_utilization"].default == 0.92
    assert CATALOGUE["optimization_level"].default == 2


@pytest.mark.parametrize(
    ("argv", "knob", "value"),
    [
        (["--max-model-len", "8192"], "max_model_len", 8192),
        (["--max_model_len=32k"], "max_model_len", 32000),
        (["--max-model-len", "32K"], "max_model_len", 32768),
        (["--max-model-len", "25.6k"], "max_model_len", 25600),
        (["--max-model-len", "auto"], "max_model_len", AUTO_MAX_MODEL_LEN),
        (["--max-model-len", "-1"], "max_model_len", AUTO_MAX_MODEL_LEN),
        (["--gpu-memory-utilization=0.9"], "gpu_memory_utilization", 0.9),
        (["--device-memory-utilization", "0.85"], "gpu_memory_utilization", 0.85),
        (["-tp", "2"], "tensor_parallel_size", 2),
        (["-tp=4"], "tensor_parallel_size", 4),
        (["-pp", "2"], "pipeline_parallel_size", 2),
        (["-O2"], "optimization_level", 2),
        (["-O", "1"], "optimization_level", 1),
        (["-O=0"], "optimization_level", 0),
        (["--optimization-level", "3"], "optimization_level", 3),
        (["--max-num-batched-tokens", "8192"], "max_num_batched_tokens", 8192),
        (["--max-num-batched-tokens", "16k"], "max_num_batched_tokens", 16000),
        (["--dtype", "half"], "dtype", "float16"),
        (["--enforce-eager"], "enforce_eager", True),
        (["--no-enforce-eager"], "enforce_eager", False),
        (["--disable-prefix-caching"], "enable_prefix_caching", False),
        (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
        (["--enable-custom-all-reduce"], "disable_custom_all_reduce", False),
        (["--trust-remote-code"], "trust_remote_code", True),
        (["--served-model-name", "a", "b"], "served_model_name", ("a", "b")),
        (["--port", "9000"], "port", 9000),
    ],
)
def test_parse_user_args_types_each_spelling(argv, knob, value):
    assert parse_user_args(argv).pins == {knob: value}


def test_unknown_flags_pass_through_in_order_and_last_pin_wins():
    args = parse_user_args(["--seed", "3", "--max-model-len", "4096", "--load-format", "dummy",
                            "--max-model-len", "8192", "--disable-log-stats"])
    assert args.pins == {"max_model_len": 8192}
    assert args.passthrough == ("--seed", "3", "--load-format", "dummy", "--disable-log-stats")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--gpu-memory-utilization", "0.9x"], "--gpu-memory-utilization"),
        (["--max-model-len", "4096; rm -rf ~"], "--max-model-len"),
        (["--max-model-len", "2.5K"], "--max-model-len"),
        (["--dtype", "bf16"], "--dtype"),
        (["-O4"], "-O"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
        (["-tp", "0"], "-tp"),
        (["--max-num-seqs"], "--max-num-seqs"),
        (["--enforce-eager=true"], "--enforce-eager"),
    ],
)
def test_malformed_value_of_known_flag_is_one_line_input_error(argv, needle):
    with pytest.raises(InputError) as err:
        parse_user_args(argv)
    assert needle in err.value.message and "\n" not in err.value.message


def test_build_argv_catalogue_order_canonical_flags_and_passthrough_last():
    params = {"max_num_seqs": 4, "dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.88,
              "tensor_parallel_size": 1, "enforce_eager": False, "disable_custom_all_reduce": True,
              "enable_prefix_caching": False, "host": "127.0.0.1"}
    argv = build_argv("/models/q", params, ("--seed", "1"))
    assert argv == ["vllm", "serve", "/models/q", "--max-model-len", "4096", "--gpu-memory-utilization", "0.88",
                    "--tensor-parallel-size", "1", "--max-num-seqs", "4", "--dtype", "bfloat16",
                    "--disable-custom-all-reduce", "--disable-prefix-caching", "--host", "127.0.0.1",
                    "--seed", "1"]


def test_build_argv_writes_auto_and_refuses_unknown_knobs():
    assert build_argv("m", {"max_model_len": -1})[3:] == ["--max-model-len", "auto"]
    with pytest.raises(InputError, match="bogus"):
        build_argv("m", {"bogus": 1})


def test_parse_then_build_round_trips_pins():
    argv = ["--max-model-len", "8192", "-tp", "2", "--enforce-eager", "--api-key", "k1", "k2", "--seed", "0"]
    args = parse_user_args(argv)
    again = parse_user_args(build_argv("m", args.pins, args.passthrough)[3:])
    assert again == parse_user_args(build_argv("m", again.pins, again.passthrough)[3:])
    assert again.pins == args.pins and again.passthrough == args.passthrough
