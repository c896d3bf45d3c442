"""The one parser of vLLM's log lines: startup figures, progress phases and failure classes.

vLLM's wording changes between versions, so every pattern lists the
variants seen in real logs. Lines carry process prefixes such as `(EngineCore pid=1) INFO ... [file.py:12]`;
all patterns match on substrings. Launch uses this for progress and diagnosis, the estimator benchmark
and the saved-parameters cache use `parse_startup` to learn what vLLM really did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from smartrun.frozen import Frozen

Phase = Literal[
    "loading_weights",
    "weights_loaded",
    "profiling_memory",
    "kv_cache_allocated",
    "capturing_cuda_graphs",
    "ready",
]

FailureClass = Literal[
    "kv_cache_too_small",
    "no_kv_cache_memory",
    "oom_loading",
    "oom_profiling",
    "oom_cuda_graph",
    "oom_sampler",
    "insufficient_free_memory",
    "tp_not_divisible",
    "not_enough_gpus",
    "dtype_unsupported",
    "max_model_len_too_large",
    "compile_error",
    "nccl_error",
    "ray_not_running",
    "ray_placement_group_timeout",
    "ray_node_died",
    "port_in_use",
    "model_not_found",
    "bad_argument",
    "startup_timeout",
    "died_after_ready",
    "unknown",
]

_NUM = r"([\d.]+)"
_INT = r"([\d,]+)"


class StartupFacts(Frozen):
    """Figures vLLM printed while starting; None where this log (or this version) does not say."""

    version: str | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    weights_gib: float | None = None
    weights_load_s: float | None = None
    total_gpu_memory_gib: float | None = None
    gpu_memory_utilization: float | None = None
    requested_memory_gib: float | None = None
    initial_free_memory_gib: float | None = None
    activation_peak_gib: float | None = None
    non_torch_gib: float | None = None
    non_kv_cache_gib: float | None = None
    available_kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    num_gpu_blocks: int | None = None
    num_cpu_blocks: int | None = None
    max_concurrency: float | None = None
    max_concurrency_tokens_per_request: int | None = None
    cudagraph_estimate_gib: float | None = None
    graph_capture_gib: float | None = None
    auto_fit_max_model_len: int | None = None
    server_url: str | None = None
    ready: bool = False


class Failure(Frozen):
    """A classified startup failure: the class, the line that proves it, and figures read from it."""

    klass: FailureClass
    evidence: str
    estimated_max_model_len: int | None = None  # vLLM's own estimate of the largest length that fits
    details: dict[str, Any] = Field(default_factory=dict)
    exit_code: int | None = None


def _f(text: str) -> float:
    return float(text.replace(",", ""))


def _i(text: str) -> int:
    return int(text.replace(",", ""))


# (field, pattern, converter): the first line that matches a field wins (rank 0 prints first).
_FACT_PATTERNS: tuple[tuple[str, re.Pattern[str], Any], ...] = tuple(
    (field, re.compile(pattern), conv)
    for field, pattern, conv in (
        ("version", r"vLLM server version ([\w.+-]+?),", str),
        ("version", r"vLLM API server version ([\w.+-]+)", str),
        ("version", r"█ version ([\w.+-]+)", str),
        ("version", r"Initializing an? (?:V1 )?LLM engine \(v([\w.+-]+)\)", str),
        ("auto_fit_max_model_len", r"Auto-fit max_model_len: reduced from \d+ to (\d+)", int),
        ("max_model_len", r"Auto-fit max_model_len: reduced from \d+ to (\d+)", int),
        ("max_model_len", r"Using max model len (\d+)", int),
        ("max_model_len", r"max_seq_len=(\d+)", int),
        ("max_num_batched_tokens", r"Chunked prefill is enabled with max_num_batched_tokens=(\d+)", int),
        ("max_num_batched_tokens", r"Defaulting max_num_batched_tokens to (\d+)", int),
        ("max_num_seqs", r"Defaulting max_num_seqs to (\d+)", int),
        ("weights_gib", r"Model loading took " + _NUM + r" ?GiB", _f),
        ("weights_gib", r"Loading model weights took " + _NUM + r" ?GB", _f),
        ("weights_gib", r"model weights take\s+" + _NUM + r" ?GiB", _f),
        ("weights_gib", r"weights memory: " + _NUM + r" ?GiB", _f),
        ("weights_load_s", r"Model loading took [\d.]+ GiB (?:memory )?and " + _NUM + " seconds", _f),
        ("total_gpu_memory_gib", r"total_gpu_memory \(" + _NUM + r" ?GiB\)", _f),
        ("total_gpu_memory_gib", r"total_gpu_memory[= ]\s*" + _NUM + r" ?GiB", _f),
        ("total_gpu_memory_gib", r"total_memory=" + _NUM + r" ?GiB", _f),
        ("gpu_memory_utilization", r"gpu_memory_utilization \(" + _NUM + r"\)", _f),
        ("gpu_memory_utilization", r"gpu_memory_utilization[= ]\s*" + _NUM + r"\s*$", _f),
        ("gpu_memory_utilization", r"Requested memory: " + _NUM + r" \(util\)", _f),
        ("requested_memory_gib", r"Requested memory: [\d.]+ \(util\), " + _NUM + r" ?GiB", _f),
        ("requested_memory_gib", r"\) = " + _NUM + r" ?GiB", _f),
        ("requested_memory_gib", r"the current vLLM instance can use\s+" + _NUM + r" ?GiB", _f),
        ("initial_free_memory_gib", r"Initial free memory: " + _NUM + r" ?GiB", _f),
        ("activation_peak_gib", r"PyTorch activation peak memory(?: takes)?\s+" + _NUM + r" ?GiB", _f),
        ("activation_peak_gib", r"torch peak memory increase: " + _NUM + r" ?GiB", _f),
        ("non_torch_gib", r"non-torch forward increase memory: " + _NUM + r" ?GiB", _f),
        ("non_torch_gib", r"non_torch_memory(?: takes)?\s+" + _NUM + r" ?GiB", _f),
        ("non_torch_gib", r"Memory profiling results:.*non_torch_memory=" + _NUM + r" ?GiB", _f),
        ("non_kv_cache_gib", r"Total non KV cache memory: " + _NUM + r" ?GiB", _f),
        ("available_kv_cache_gib", r"Available KV cache memory: " + _NUM + r" ?GiB", _f),
        ("available_kv_cache_gib", r"kv_cache_size=" + _NUM + r" ?GiB", _f),
        ("available_kv_cache_gib", r"available_kv_cache_memory\s+" + _NUM + r" ?GiB", _f),
        ("available_kv_cache_gib", r"reserved for KV Cache is " + _NUM + r" ?GiB", _f),
        ("kv_cache_tokens", r"KV cache size: " + _INT + " tokens", _i),
        ("kv_cache_tokens", r"maximum number of tokens that can be stored in KV cache \((\d+)\)", int),
        ("num_gpu_blocks", r"(?:# )?(?:GPU|CUDA) blocks: (\d+)", int),
        ("num_gpu_blocks", r"num_gpu_blocks is: (\d+)", int),
        ("num_cpu_blocks", r"# CPU blocks: (\d+)", int),
        ("max_concurrency_tokens_per_request", r"Maximum concurrency for " + _INT + " tokens per request", _i),
        ("max_concurrency", r"Maximum concurrency for [\d,]+ tokens per request: " + _NUM + "x", _f),
        ("cudagraph_estimate_gib", r"Estimated CUDA graph memory: " + _NUM + r" ?GiB", _f),
        ("graph_capture_gib", r"Graph capturing finished in [\d.]+ secs?, took " + _NUM + r" ?GiB", _f),
        ("server_url", r"Starting vLLM (?:API )?server (?:\d+ )?on (http://\S+)", str),
        ("server_url", r"Uvicorn running on (http://\S+)", str),
    )
)

_PHASE_PATTERNS: tuple[tuple[Phase, str], ...] = (
        ("ready", r"Application startup complete|Starting vLLM (?:API )?server (?:\d+ )?on|Uvicorn running on"),
        ("capturing_cuda_graphs", r"Capturing CUDA graphs?|Capturing cudagraphs|Graph capturing finished"),
        ("kv_cache_allocated", r"KV cache size: [\d,]+ tokens|# (?:GPU|CUDA) blocks:|Available KV cache memory"),
        ("profiling_memory", r"Memory profiling|Profiling CUDA graph memory|Estimated CUDA graph memory"
         r"|the current vLLM instance can use|Initial free memory"),
        ("weights_loaded", r"Model loading took|Loading model weights took"),
        ("loading_weights", r"Starting to load model|Loading (?:safetensors|pt) checkpoint shards|Loading weights"),
)
_PHASES: tuple[tuple[Phase, re.Pattern[str]], ...] = tuple((p, re.compile(x)) for p, x in _PHASE_PATTERNS)


def phase_of(line: str) -> Phase | None:
    """The startup phase a log line announces, for the progress display; None for other lines."""
    for phase, pattern in _PHASES:
        if pattern.search(line):
            return phase
    return None


def parse_startup(lines: Iterable[str]) -> StartupFacts:
    """Every figure vLLM printed in these lines (any version's wording); the first occurrence wins."""
    found: dict[str, Any] = {}
    for line in lines:
        for field, pattern, conv in _FACT_PATTERNS:
            if field in found:
                continue
            m = pattern.search(line)
            if m:
                found[field] = conv(m.group(1))
        if "Application startup complete" in line:
            found["ready"] = True
    if "server_url" in found:
        found["server_url"] = found["server_url"].rstrip(".,")
    return StartupFacts(**found)


# --- failure classification -------------------------------------------------------------------

_KV_TOO_SMALL = re.compile(r"max seq len \((\d+)\)")
_KV_ESTIMATE = re.compile(r"estimated maximum model length is (\d+)")
_KV_V0 = re.compile(r"max seq len \((\d+)\) is larger than the maximum number of tokens that can be stored in KV cache \((\d+)\)")
_KV_NEED = re.compile(r"\(([\d.]+) GiB KV cache is needed, which is larger than the available KV cache memory \(([\d.]+) GiB\)")
_FREE = re.compile(
    r"Free memory on device(?: (\S+))? \(([\d.]+)/([\d.]+) GiB\) on startup is less than desired GPU memory "
    r"utilization \(([\d.]+), ([\d.]+) GiB\)"
)
_TP_HEADS = re.compile(r"Total number of attention heads \((\d+)\) must be divisible by tensor parallel size \((\d+)\)")
_WORLD = re.compile(
    r"World size \((\d+)\) is larger than the number of available GPUs \((\d+)\)"
    r"|Tensor parallel size \((\d+)\) cannot be larger than the number of available GPUs \((\d+)\)"
    r"|number of required GPUs exceeds the total number of available GPUs"
)
_DERIVED = re.compile(r"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len \((\w+)=(\d+)")
_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory")
_OOM_LOAD = re.compile(r"Failed to load model - not enough GPU memory")
_OOM_SAMPLER = re.compile(r"CUDA out of memory occurred when warming up sampler with (\d+) dummy requests")
_NO_CACHE = re.compile(r"No available memory for the cache blocks|Cannot auto-fit max_model_len: not enough GPU memory")
_BF16 = re.compile(r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0")
_COMPILE = re.compile(
    r"BackendCompilerFailed|InductorError|torch\._dynamo\.exc|torch\._inductor\.exc|TorchRuntimeError"
    r"|cudaErrorStreamCapture\w*|operation not permitted when stream is capturing|CUDA graph capture failed"
    r"|Error (?:during|in) (?:CUDA graph|cudagraph) capture|torch\.compile failed"
)
_NCCL = re.compile(
    r"NCCL error|ncclInternalError|ncclUnhandledCudaError|ncclSystemError|ncclInvalidUsage|NCCL WARN"
    r"|custom[ _]?all[ _-]?reduce.*(?:error|fail)|CustomAllreduce.*(?:error|fail)",
    re.IGNORECASE,
)
# Ray (multi-node, --distributed-executor-backend ray): wording from ray's worker/GCS and vLLM's ray_utils.py
_RAY_CONNECT = re.compile(r"Could not find any running Ray instance|Failed to connect to GCS at address"
                          r"|Unable to connect to GCS|Failed to get the system config from raylet")
_RAY_PG = re.compile(r"Cannot provide a placement group (?:of|requiring)")
_RAY_NODE = re.compile(
    r"has been marked dead because the detector has missed too many heartbeats|NodeDiedError"
    r"|The actor died because its node has died|Ray does not allocate any GPUs on the driver node"
)
_PORT = re.compile(r"\[Errno (?:98|48|10048)\] (?:error while attempting to bind on address .*: )?[Aa]ddress already in use"
                   r"|address already in use", re.IGNORECASE)
_MODEL = re.compile(
    r"Repository Not Found|RepositoryNotFoundError|is not a valid path|Invalid repository ID or local directory"
    r"|does not appear to have a file named config\.json|Can't load the configuration of"
    r"|No such file or directory: .*config\.json|is not a local folder and is not a valid model identifier"
    r"|GatedRepoError|LocalEntryNotFoundError"
)
_BAD_ARG = re.compile(
    r"error: unrecognized arguments: (.*)|error: argument (\S+): (.*)|\b(\d+) validation errors? for (\w+)"
    r"|must be greater than or equal to max_num_seqs|is smaller than max_model_len \(\d+\)\. This effectively"
)
# a traceback's last line ("RuntimeError: ...", maybe after a process prefix), not a WARNING that quotes one
_EXCEPTION = re.compile(r"^\s*(?:\(\w+ pid=\d+\)\s+)?(?:[\w.]+\.)?\w*(?:Error|Exception):")
_FRAME_END = re.compile(r"Engine core initialization failed|EngineCore failed to start")


def _first(lines: list[str], pattern: re.Pattern[str]) -> tuple[int, re.Match[str]] | None:
    for index, line in enumerate(lines):
        m = pattern.search(line)
        if m:
            return index, m
    return None


def _oom_phase(lines: list[str], oom_index: int) -> FailureClass:
    """Which startup phase the OOM hit, from the last progress marker printed before it."""
    last: Phase | None = None
    for line in lines[:oom_index]:
        phase = phase_of(line)
        if phase is not None:
            last = phase
    if last in (None, "loading_weights"):
        return "oom_loading"
    if last in ("weights_loaded", "profiling_memory"):
        return "oom_profiling"
    return "oom_cuda_graph"


def classify_failure(text: str | Iterable[str], exit_code: int | None) -> Failure | None:
    """The failure class that vLLM's own messages name; None when nothing failed (exit 0, no error line).

    Order matters: vLLM wraps the root cause in generic engine errors, so specific messages are
    tried before generic ones, and an OOM's phase is read from the progress lines before it.
    """
    lines = [ln.rstrip("\n") for ln in (text.splitlines() if isinstance(text, str) else text)]

    def fail(klass: FailureClass, index: int, estimate: int | None = None, **details: Any) -> Failure:
        return Failure(klass=klass, evidence=lines[index].strip()[:500], estimated_max_model_len=estimate,
                       details=details, exit_code=exit_code)

    if hit := _first(lines, _PORT):
        return fail("port_in_use", hit[0])
    if hit := _first(lines, _BAD_ARG):
        m = hit[1]
        args = m.group(1).split() if m.group(1) else ([m.group(2)] if m.group(2) else [])
        return fail("bad_argument", hit[0], arguments=args)
    if hit := _first(lines, _MODEL):
        return fail("model_not_found", hit[0])
    if hit := _first(lines, _FREE):
        m = hit[1]
        return fail("insufficient_free_memory", hit[0], device=m.group(1), free_gib=float(m.group(2)),
                    total_gib=float(m.group(3)), gpu_memory_utilization=float(m.group(4)),
                    requested_gib=float(m.group(5)))
    if hit := _first(lines, _KV_V0):
        m = hit[1]
        return fail("kv_cache_too_small", hit[0], int(m.group(2)), max_model_len=int(m.group(1)),
                    kv_cache_tokens=int(m.group(2)))
    if hit := _first(lines, _KV_TOO_SMALL):
        index, m = hit
        est = _KV_ESTIMATE.search(lines[index]) or (_first(lines[index:], _KV_ESTIMATE) or (0, None))[1]
        need = _KV_NEED.search(lines[index])
        details: dict[str, Any] = {"max_model_len": int(m.group(1))}
        if need:
            details.update(needed_gib=float(need.group(1)), available_gib=float(need.group(2)))
        return fail("kv_cache_too_small", index, int(est.group(1)) if est else None, **details)
    if hit := _first(lines, _NO_CACHE):
        return fail("no_kv_cache_memory", hit[0])
    if hit := _first(lines, _DERIVED):
        m = hit[1]
        return fail("max_model_len_too_large", hit[0], int(m.group(3)), max_model_len=int(m.group(1)),
                    derived_key=m.group(2), derived_max_model_len=int(m.group(3)))
    if hit := _first(lines, _TP_HEADS):
        m = hit[1]
        return fail("tp_not_divisible", hit[0], num_heads=int(m.group(1)), tensor_parallel_size=int(m.group(2)))
    if hit := _first(lines, _RAY_CONNECT):
        return fail("ray_not_running", hit[0])
    if hit := _first(lines, _RAY_PG):
        return fail("ray_placement_group_timeout", hit[0])
    if hit := _first(lines, _RAY_NODE):
        return fail("ray_node_died", hit[0])
    if hit := _first(lines, _WORLD):
        m = hit[1]
        nums = [int(g) for g in m.groups() if g]
        extra = {"world_size": nums[0], "available_gpus": nums[1]} if nums else {}
        return fail("not_enough_gpus", hit[0], **extra)
    if hit := _first(lines, _BF16):
        return fail("dtype_unsupported", hit[0])
    if hit := _first(lines, _OOM_SAMPLER):
        return fail("oom_sampler", hit[0], num_dummy_requests=int(hit[1].group(1)))
    if hit := _first(lines, _OOM_LOAD):
        return fail("oom_loading", hit[0])
    if hit := _first(lines, _OOM):
        return fail(_oom_phase(lines, hit[0]), hit[0])
    if hit := _first(lines, _NCCL):
        return fail("nccl_error", hit[0])
    if hit := _first(lines, _COMPILE):
        return fail("compile_error", hit[0])
    if exit_code in (0, None):
        return None
    for index, line in enumerate(lines):  # the root cause comes first; vLLM's wrappers follow it
        if _EXCEPTION.search(line) and not _FRAME_END.search(line):
            return fail("unknown", index)
    for index in range(len(lines) - 1, -1, -1):  # else the last error-looking line, else the last line
        if re.search(r"Error|error:|Exception|FAILED|failed", lines[index]) and not _FRAME_END.search(lines[index]):
            return fail("unknown", index)
    if lines:
        return fail("unknown", len(lines) - 1)
    return Failure(klass="unknown", evidence=f"exit status {exit_code} with no output", exit_code=exit_code)
