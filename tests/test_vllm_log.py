"""vllm_log: the startup parser over real log lines, phases, and failure classes on vLLM's exact wording."""

from __future__ import annotations

import pytest

from smartrun.memory import evidence
from smartrun.vllm_log import classify_failure, parse_startup, phase_of

CASES = evidence.load_cases()  # fixtures/reference/vllm_startup_logs.jsonl
# field of the record -> field of StartupFacts
FIELDS = {
    "weights_gib": "weights_gib",
    "kv_cache_gib": "available_kv_cache_gib",
    "kv_cache_tokens": "kv_cache_tokens",
    "max_concurrency": "max_concurrency",
    "max_concurrency_tokens_per_request": "max_concurrency_tokens_per_request",
    "num_gpu_blocks": "num_gpu_blocks",
    "total_gpu_memory_gib": "total_gpu_memory_gib",
    "activation_peak_gib": "activation_peak_gib",
    "non_torch_gib": "non_torch_gib",
}
# posts that compare two builds line by line (the first figure is "current main"), and a case whose
# figures come from the reporter's prose rather than from its log lines
NOT_FROM_LINES = {"vsl-011", "vsl-012", "vsl-013"}
PROSE_FIELDS = {("vsl-019", "kv_cache_gib"), ("vsl-019", "activation_peak_gib"), ("vsl-019", "non_torch_gib")}


def test_every_recorded_figure_is_read_back_from_its_log_lines():
    checked = 0
    for case in CASES:
        if case.id in NOT_FROM_LINES:
            continue
        facts = parse_startup(case.log_lines)
        for src, dst in FIELDS.items():
            if getattr(case, src) is None or (case.id, src) in PROSE_FIELDS:
                continue
            assert getattr(facts, dst) == pytest.approx(getattr(case, src)), (case.id, src)
            checked += 1
    assert checked > 350


def test_033_success_lines_in_order():
    lines = [
        "(APIServer pid=1) INFO 11-25 18:39:00 [startup.py:20] vLLM server version 0.33.0, serving model Qwen/Qwen3-8B",
        "(APIServer pid=1) INFO 11-25 18:39:01 [config/model.py:2170] Using max model len 32768",
        "(APIServer pid=1) INFO 11-25 18:39:01 [config/scheduler.py:309] Chunked prefill is enabled with max_num_batched_tokens=8192.",
        "(EngineCore_DP0 pid=2) INFO 11-25 18:39:20 [gpu_model_runner.py:5088] Model loading took 15.27 GiB memory and 9.123456 seconds",
        "(EngineCore_DP0 pid=2) INFO 11-25 18:39:22 [gpu_worker.py:700] Estimated CUDA graph memory: 0.91 GiB total",
        "(EngineCore_DP0 pid=2) INFO 11-25 18:39:23 [gpu_worker.py:348] Available KV cache memory: 55.44 GiB",
        "(EngineCore_DP0 pid=2) INFO 11-25 18:39:23 [kv_cache_utils.py:1136] GPU KV cache size: 403,712 tokens, Maximum concurrency for 32,768 tokens per request: 12.32x",
        "(EngineCore_DP0 pid=2) INFO 11-25 18:39:30 [gpu_model_runner.py:6516] Graph capturing finished in 7 secs, took 0.88 GiB",
        "(APIServer pid=1) INFO 11-25 18:39:31 [entry.py:139] Starting vLLM server on http://0.0.0.0:8000",
        "(APIServer pid=1) INFO 11-25 18:39:31 [on.py:62] Application startup complete.",
    ]
    f = parse_startup(lines)
    assert (f.version, f.max_model_len, f.max_num_batched_tokens) == ("0.33.0", 32768, 8192)
    assert (f.weights_gib, f.weights_load_s, f.cudagraph_estimate_gib) == (15.27, 9.123456, 0.91)
    assert (f.available_kv_cache_gib, f.kv_cache_tokens, f.max_concurrency) == (55.44, 403712, 12.32)
    assert (f.max_concurrency_tokens_per_request, f.graph_capture_gib) == (32768, 0.88)
    assert f.server_url == "http://0.0.0.0:8000" and f.ready
    assert [phase_of(x) for x in lines[3:]] == ["weights_loaded", "profiling_memory", "kv_cache_allocated",
                                                "kv_cache_allocated", "capturing_cuda_graphs", "ready", "ready"]
    assert phase_of(lines[0]) is None


def test_v0_multiline_profile_and_blocks():
    f = parse_startup([
        "INFO 12-22 10:55:34 worker.py:241] the current vLLM instance can use total_gpu_memory (79.25GiB) x gpu_memory_utilization (0.15) = 11.89GiB",
        "INFO 12-22 10:55:34 worker.py:241] model weights take 8.51GiB; non_torch_memory takes 0.26GiB; PyTorch activation peak memory takes 0.94GiB; the rest of the memory reserved for KV Cache is 2.18GiB.",
        "INFO 12-22 10:55:35 gpu_executor.py:76] # GPU blocks: 715, # CPU blocks: 1310",
    ])
    assert (f.total_gpu_memory_gib, f.gpu_memory_utilization, f.requested_memory_gib) == (79.25, 0.15, 11.89)
    assert (f.weights_gib, f.non_torch_gib, f.activation_peak_gib, f.available_kv_cache_gib) == (8.51, 0.26, 0.94, 2.18)
    assert (f.num_gpu_blocks, f.num_cpu_blocks) == (715, 1310)


KV_033 = ("ValueError: To serve at least one request with the model's max seq len (131072), (16.00 GiB KV cache is "
          "needed, which is larger than the available KV cache memory (6.13 GiB). Based on the available memory, the "
          "estimated maximum model length is 50192. Try increasing `gpu_memory_utilization` (which also controls CPU "
          "memory on the CPU backend) or decreasing `max_model_len` when initializing the engine. See "
          "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.")
KV_021 = ("ValueError: To serve at least one request with the models's max seq len (32768), (4.00 GiB KV cache is "
          "needed, which is larger than the available KV cache memory (2.50 GiB). Based on the available memory, the "
          "estimated maximum model length is 20464. Try increasing `gpu_memory_utilization` or decreasing "
          "`max_model_len` when initializing the engine. See "
          "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.")
KV_085 = ("ValueError: To serve at least one request with the models's max seq len (32768), (4.00 GiB KV cache is "
          "needed, which is larger than the available KV cache memory (2.50 GiB). Try increasing "
          "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.")


@pytest.mark.parametrize(("text", "klass", "estimate", "details"), [
    (KV_033, "kv_cache_too_small", 50192, {"max_model_len": 131072, "needed_gib": 16.0, "available_gib": 6.13}),
    (KV_021, "kv_cache_too_small", 20464, {"max_model_len": 32768}),
    (KV_085, "kv_cache_too_small", None, {"max_model_len": 32768}),
    (CASES[17].log_lines[0], "kv_cache_too_small", 24320, {"max_model_len": 32768, "kv_cache_tokens": 24320}),
    ("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
     "initializing the engine.", "no_kv_cache_memory", None, {}),
    ("Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single token. Try increasing "
     "`gpu_memory_utilization`.", "no_kv_cache_memory", None, {}),
    ("ValueError: Free memory on device cuda:0 (7.5/79.18 GiB) on startup is less than desired GPU memory utilization "
     "(0.92, 72.85 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
     "insufficient_free_memory", None,
     {"device": "cuda:0", "free_gib": 7.5, "total_gib": 79.18, "gpu_memory_utilization": 0.92, "requested_gib": 72.85}),
    ("ValueError: Free memory on device (70.7/79.18 GiB) on startup is less than desired GPU memory utilization "
     "(0.9, 71.26 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
     "insufficient_free_memory", None, {"free_gib": 70.7, "total_gib": 79.18}),
    ("ValueError: Total number of attention heads (28) must be divisible by tensor parallel size (8).",
     "tp_not_divisible", None, {"num_heads": 28, "tensor_parallel_size": 8}),
    ("ValueError: World size (4) is larger than the number of available GPUs (2) in this node. If this is "
     "intentional and you are using:", "not_enough_gpus", None, {"world_size": 4, "available_gpus": 2}),
    ("Tensor parallel size (4) cannot be larger than the number of available GPUs (1).", "not_enough_gpus", None,
     {"world_size": 4, "available_gpus": 1}),
    ("ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your Tesla T4 GPU has "
     "compute capability 7.5. You can use float16 instead by explicitly setting the `dtype` flag in CLI, for "
     "example: --dtype=half.", "dtype_unsupported", None, {}),
    ("ValueError: User-specified max_model_len (200000) is greater than the derived max_model_len "
     "(max_position_embeddings=131072 or model_max_length=None in model's config.json). To allow overriding this "
     "maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.", "max_model_len_too_large", 131072,
     {"max_model_len": 200000, "derived_max_model_len": 131072}),
    ("RuntimeError: CUDA out of memory occurred when warming up sampler with 1024 dummy requests. Please try "
     "lowering `max_num_seqs` or `gpu_memory_utilization` when initializing the engine.", "oom_sampler", None,
     {"num_dummy_requests": 1024}),
    ("OSError: [Errno 98] error while attempting to bind on address ('0.0.0.0', 8000): address already in use",
     "port_in_use", None, {}),
    ("OSError: [Errno 98] Address already in use", "port_in_use", None, {}),
    ("huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. Repository Not Found for url: "
     "https://huggingface.co/api/models/nobody/nothing", "model_not_found", None, {}),
    ("ValueError: Invalid repository ID or local directory specified: '/models/missing'.", "model_not_found", None, {}),
    ("OSError: /models/x does not appear to have a file named config.json.", "model_not_found", None, {}),
    ("vllm serve: error: unrecognized arguments: --swap-space 4", "bad_argument", None,
     {"arguments": ["--swap-space", "4"]}),
    ("vllm serve: error: argument --dtype: invalid choice: 'bf16' (choose from 'auto', 'bfloat16')", "bad_argument",
     None, {"arguments": ["--dtype"]}),
    ("RuntimeError: NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO for details)", "nccl_error", None, {}),
    ("RuntimeError: CustomAllreduce failed: NCCL error: unhandled system error", "nccl_error", None, {}),
    ("torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised: ...", "compile_error", None, {}),
    ("RuntimeError: CUDA error: operation not permitted when stream is capturing", "compile_error", None, {}),
])
def test_failure_classes_from_vllms_wording(text, klass, estimate, details):
    failure = classify_failure(["(EngineCore pid=9) INFO noise before", text,
                                "RuntimeError: Engine core initialization failed. See root cause above."], 1)
    assert failure is not None
    assert (failure.klass, failure.estimated_max_model_len) == (klass, estimate)
    assert failure.evidence == text.strip()[:500]
    assert {k: failure.details.get(k) for k in details} == details


OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 "
       "GiB of which 1.06 GiB is free.")


@pytest.mark.parametrize(("before", "klass"), [
    (["INFO Starting to load model /m..."], "oom_loading"),
    ([], "oom_loading"),
    (["INFO Model loading took 15.0 GiB memory and 1.0 seconds"], "oom_profiling"),
    (["INFO Model loading took 15.0 GiB memory and 1.0 seconds", "INFO Available KV cache memory: 50 GiB",
      "INFO GPU KV cache size: 1,000 tokens, Maximum concurrency for 100 tokens per request: 10.00x",
      "INFO Capturing CUDA graphs (decode, FULL): 50%"], "oom_cuda_graph"),
])
def test_oom_phase_is_read_from_the_lines_before_it(before, klass):
    assert classify_failure([*before, OOM], 1).klass == klass


def test_weights_oom_wrapper_is_loading_even_after_other_lines():
    lines = ["ERROR Failed to load model - not enough GPU memory. Try lowering --gpu-memory-utilization to free "
             "memory for weights, increasing --tensor-parallel-size, or using --quantization.", OOM]
    assert classify_failure(lines, 1).klass == "oom_loading"


def test_nothing_failed_and_unknown_failures():
    assert classify_failure("INFO all fine\nINFO Application startup complete.", 0) is None
    unknown = classify_failure("INFO x\nKeyError: 'rope_scaling'\nRuntimeError: Engine core initialization failed.", 1)
    assert (unknown.klass, unknown.evidence) == ("unknown", "KeyError: 'rope_scaling'")
    assert classify_failure("", 137).evidence == "exit status 137 with no output"


def test_unknown_failure_prefers_the_root_cause_over_warnings_and_wrappers():
    lines = ["(EngineCore pid=3) WARNING 11-25 [x.py:1] flash_attn unavailable: ImportError: no module named x",
             "(EngineCore pid=3) ERROR 11-25 [core.py:1584] EngineCore failed to start.",
             "(EngineCore pid=3) AttributeError: 'NoneType' object has no attribute 'shape'",
             "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"]
    failure = classify_failure(lines, 1)
    assert (failure.klass, failure.evidence) == ("unknown", lines[2])


def test_a_long_run_of_digits_is_scanned_once_and_pydantic_errors_still_classified():
    # "(\d+) validation errors? for" once retried from every digit of a run: quadratic, ~100 s on a
    # 100k-digit line in a log tail; anchored on a word boundary it is linear and reads the same lines
    noise = "max seq len (" + "9" * 20000
    lines = [noise, "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig"]
    failure = classify_failure(lines, 1)
    assert failure is not None and failure.klass == "bad_argument"
    assert classify_failure([noise], 1).klass != "bad_argument"
