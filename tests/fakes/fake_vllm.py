#!/usr/bin/env python3
"""A `vllm` stand-in for the tests: a real process that plays `vllm serve` 0.33.0.

It judges its argv on its own (nothing from smartrun is imported: it plays vLLM), decides from a
memory budget hidden from the tuner whether the start succeeds, prints vLLM's real log and error
lines, and when up serves /health, /v1/models, /v1/completions and /v1/chat/completions on
127.0.0.1:--port. Like vLLM it binds the port early but only listens once the engine is ready.

Scenario: env FAKE_VLLM_SCENARIO holds JSON or a path to a JSON file; keys are in SCENARIO_DEFAULTS.
Like vLLM, --served-model-name NAME... names the model in /v1/models and in requests (others get 404).
"hidden_non_kv_gib" is non-KV memory particular to this machine (a larger CUDA context, a driver's
carve-out) that no printed figure names, so an estimator cannot know it: only the KV cache shows it.
Faults: "cudagraph_error" (unless eager / -O0), "nccl_error" (tp > 1 unless
--disable-custom-all-reduce), "never_ready", "die_after_ready_s" (counted from the first /v1/models
answer), "giant_line_mib" (one log line that long), "trickle_models" (/v1/models answers a byte every
half second, for ever), and with
--distributed-executor-backend ray "ray_not_running", "ray_node_died" (a node lost while loading); scenario
"ray_gpus" is what the Ray cluster offers (default: "gpus"), too few ends in vLLM's placement-group timeout.
"record" names a file that gets one
JSON line per start ({"pid", "worker_pid", "argv"}) so tests can check the process table.
Env FAKE_VLLM_PERF names a tests/fakes/perf_model.py profile: its startup_error() and
completion_timing() then decide startup and request timing.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELP_FILE = HERE.parent.parent / "smartrun" / "data" / "vllm-0.33.0-serve-help-all.txt"  # vLLM 0.33.0's own text
VERSION = "0.33.0"
GIB = 2**30

SCENARIO_DEFAULTS = {
    "gpu_total_gib": 79.19,  # as CUDA reports it
    "gpus": 1,
    "free_gib": None,  # free at start; None = total - 0.5
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "cc": "9.0",
    "weights_gib": 15.0,  # whole model; split over tp*pp
    "kv_bytes_per_token": 131072,  # whole model; split over tp
    "activation_gib_per_1k_tokens": 0.15,  # profile-run peak per 1k batched tokens
    "non_torch_gib": 0.5,
    "hidden_non_kv_gib": 0.0,  # non-KV memory this machine's vLLM holds that no log line names: only the KV shrinks
    "graph_gib": 0.9,  # CUDA-graph estimate subtracted from the KV budget (not under eager)
    "graph_actual_gib": None,  # memory capture really needs outside the util share; None = graph_gib
    "sampler_gib_per_seq": 0.0,  # sampler warm-up needs this per max_num_seqs outside the util share
    "derived_max_model_len": None,  # None: the model directory's config.json max_position_embeddings, else 32768
    "num_heads": 32,
    "faults": {},
    "delays": {"import_s": 0.05, "load_s": 0.1, "profile_s": 0.05, "capture_s": 0.05},
    "worker": False,  # spawn an engine-core-like child process (for orphan checks)
    "list_names": None,  # /v1/models lists these instead of the served names (a misbehaving server)
    "record": None,
    "ray_gpus": None,  # GPUs the Ray cluster offers under --distributed-executor-backend ray (None = "gpus")
}

LOG_PREFIX = "(EngineCore pid={pid}) INFO {ts} [{src}] "


def log(msg: str, src: str = "gpu_worker.py:1", level: str = "INFO", proc: str = "EngineCore") -> None:
    ts = time.strftime("%m-%d %H:%M:%S")
    print(f"({proc} pid={os.getpid()}) {level} {ts} [{src}] {msg}", flush=True)


def fail(lines: list[str], code: int = 1) -> None:
    """vLLM's way of dying at startup: the root cause, then the wrapper errors, then exit 1."""
    for line in lines:
        print(line, flush=True)
    print("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
          flush=True)
    sys.exit(code)


def load_scenario() -> dict:
    raw = os.environ.get("FAKE_VLLM_SCENARIO", "")
    data = {}
    if raw:
        data = json.loads(raw) if raw.lstrip().startswith("{") else json.loads(Path(raw).read_text())
    scenario = {**SCENARIO_DEFAULTS, **data}
    scenario["delays"] = {**SCENARIO_DEFAULTS["delays"], **data.get("delays", {})}
    return scenario


def help_flags() -> dict[str, bool | str]:
    """Every flag in the real 0.33.0 help text -> whether it takes a value (has a metavar or choices);
    "+" for `--x X [X ...]` (several values), "?" for `--x [X]` (an optional value)."""
    flags: dict[str, bool | str] = {}
    for line in HELP_FILE.read_text().splitlines():
        if not line.startswith("  -"):
            continue
        for part in line.strip().split(", "):
            tokens = part.split()
            if tokens and tokens[0].startswith("-"):
                kind: bool | str = len(tokens) > 1
                if kind and tokens[1].startswith("["):
                    kind = "?"
                elif kind and len(tokens) > 2 and tokens[2].startswith("["):
                    kind = "+"
                flags[tokens[0]] = kind
    return flags


def parse_human_int(text: str) -> int:
    if text.lower() in ("auto", "-1"):
        return -1
    m = re.fullmatch(r"([\d.]+)([kmgtKMGT]?)", text)
    if not m:
        raise ValueError(text)
    value, suffix = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(value * scale[suffix])


def config_max_positions(model: str) -> int | None:
    """max_position_embeddings from MODEL/config.json (the text config of a multimodal one), as vLLM derives it."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or {}
    value = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    return int(value) if value else None


def parse_serve_args(argv: list[str]) -> tuple[str, dict[str, object]]:
    """Model tag and {flag: value} (True/False for booleans), judged against the real help text."""
    known = help_flags()
    model, opts, unknown = "Qwen/Qwen3-0.6B", {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            model = arg
            continue
        m = re.fullmatch(r"-O=?(\d)", arg)
        if m:
            opts["--optimization-level"] = m.group(1)
            continue
        if arg == "-O":
            arg = "--optimization-level"
        name, _, inline = arg.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        if name not in known:
            unknown.append(arg)
            if not inline and i < len(argv) and not argv[i].startswith("-"):
                unknown.append(argv[i])
                i += 1
            continue
        if known[name] == "+" and not inline:  # argparse nargs="+": every value up to the next flag
            values = []
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            if not values:
                print(f"vllm serve: error: argument {name}: expected at least one argument", flush=True)
                sys.exit(2)
            opts[name] = values
        elif known[name] == "?" and not inline:
            if i < len(argv) and not argv[i].startswith("-"):
                opts[name] = argv[i]
                i += 1
            else:
                opts[name] = True
        elif known[name]:
            if inline:
                opts[name] = [inline] if known[name] == "+" else inline
            elif i < len(argv):
                opts[name] = argv[i]
                i += 1
            else:
                print(f"vllm serve: error: argument {name}: expected one argument", flush=True)
                sys.exit(2)
        else:
            negative = name.startswith("--no-")
            opts[name.replace("--no-", "--", 1) if negative else name] = not negative
    if unknown:
        print("usage: vllm serve [model_tag] [options]", flush=True)
        print(f"vllm serve: error: unrecognized arguments: {' '.join(unknown)}", flush=True)
        sys.exit(2)
    return model, opts


def start_sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def serve(argv: list[str]) -> None:
    sc = load_scenario()
    model, opts = parse_serve_args(argv)
    delays, faults = sc["delays"], sc.get("faults", {})
    start_sleep(delays["import_s"])
    print(f"(APIServer pid={os.getpid()}) INFO vLLM server version {VERSION}, serving model {model}", flush=True)
    print(f"(APIServer pid={os.getpid()}) INFO non-default args: {opts}", flush=True)

    def num(flag: str, default, conv=float):
        return conv(opts[flag]) if flag in opts else default

    util = num("--gpu-memory-utilization", 0.92)
    tp = num("--tensor-parallel-size", 1, int)
    pp = num("--pipeline-parallel-size", 1, int)
    total = float(sc["gpu_total_gib"])
    big = total >= 70 and "a100" not in sc["gpu_name"].lower()
    max_num_seqs = num("--max-num-seqs", 1024 if big else 256, int)
    user_mnbt = "--max-num-batched-tokens" in opts
    mnbt = parse_human_int(str(opts["--max-num-batched-tokens"])) if user_mnbt else (8192 if big else 2048)
    derived = int(sc["derived_max_model_len"] or config_max_positions(model) or 32768)
    mml_arg = parse_human_int(str(opts["--max-model-len"])) if "--max-model-len" in opts else derived
    eager = bool(opts.get("--enforce-eager", False)) or str(opts.get("--optimization-level", "2")) == "0"
    dtype = str(opts.get("--dtype", "auto"))
    port = num("--port", 8000, int)
    host = str(opts.get("--host", "127.0.0.1")) or "127.0.0.1"

    if not 0 < util <= 1:
        fail(["pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig",
              "gpu_memory_utilization", f"  Input should be less than or equal to 1 [input_value={util}]"])
    if dtype not in ("auto", "bfloat16", "float", "float16", "float32", "half"):
        print(f"vllm serve: error: argument --dtype: invalid choice: '{dtype}' (choose from 'auto', 'bfloat16', "
              "'float', 'float16', 'float32', 'half')", flush=True)
        sys.exit(2)
    if sc["num_heads"] % tp:
        fail([f"ValueError: Total number of attention heads ({sc['num_heads']}) must be divisible by tensor "
              f"parallel size ({tp})."])
    ray_backend = opts.get("--distributed-executor-backend") == "ray"
    if ray_backend:  # vLLM connects to the cluster (RAY_ADDRESS) and asks Ray for one GPU bundle per worker
        if faults.get("ray_not_running") or not os.environ.get("RAY_ADDRESS"):
            fail(["ConnectionError: Could not find any running Ray instance. Please specify the one to connect to "
                  "by setting `--address` flag or `RAY_ADDRESS` environment variable."])
        ray_gpus = int(sc["ray_gpus"] if sc["ray_gpus"] is not None else sc["gpus"])
        if tp * pp > ray_gpus:
            specs = [{"GPU": 1.0, "node:10.0.0.1": 0.001}] + [{"GPU": 1.0}] * (tp * pp - 1)
            log(f"Waiting for creating a placement group of specs for 10 seconds. specs={specs}. Check `ray status` "
                "and `ray list nodes` to see if you have enough resources, and make sure the IP addresses used by "
                "ray cluster are the same as VLLM_HOST_IP environment variable specified in each node if you are "
                "running on a multi-node.", "ray_utils.py:242", proc="APIServer")
            fail([f"ValueError: Cannot provide a placement group of placement_group_specs={specs} within 1800 "
                  "seconds. See `ray status` and `ray list nodes` to make sure the cluster has enough resources."])
    elif tp * pp > int(sc["gpus"]):
        fail([f"ValueError: World size ({tp * pp}) is larger than the number of available GPUs ({sc['gpus']}) in "
              "this node. If this is intentional and you are using:",
              "- ray, set '--distributed-executor-backend ray'.", "- multiprocessing, set '--nnodes' appropriately."])
    if mml_arg > derived:
        fail([f"ValueError: User-specified max_model_len ({mml_arg}) is greater than the derived max_model_len "
              f"(max_position_embeddings={derived} or model_max_length=None in model's config.json). To allow "
              "overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."])
    mml = derived if mml_arg == -1 else mml_arg
    log(f"Using max model len {mml}", "config/model.py:2170", proc="APIServer")

    # vLLM binds before the engine is built and listens only when it is ready.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        print(f"OSError: [Errno {err.errno}] error while attempting to bind on address ('{host}', {port}): "
              "address already in use", flush=True)
        sys.exit(1)

    worker = None
    if sc.get("worker"):
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if sc.get("record"):
        with open(sc["record"], "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "worker_pid": worker.pid if worker else None,
                                 "argv": argv, "ray_address": os.environ.get("RAY_ADDRESS")}) + "\n")

    mnbt = min(mnbt, max_num_seqs * mml)
    log(f"Chunked prefill is enabled with max_num_batched_tokens={mnbt}.", "config/scheduler.py:309",
        proc="APIServer")
    free = float(sc["free_gib"]) if sc["free_gib"] is not None else total - 0.5
    requested = math.ceil(total * util * GIB) / GIB
    if free < requested:
        fail([f"ValueError: Free memory on device cuda:0 ({round(free, 2)}/{round(total, 2)} GiB) on startup is "
              f"less than desired GPU memory utilization ({util}, {round(requested, 2)} GiB). Decrease GPU memory "
              "utilization or reduce GPU memory used by other processes."])
    if dtype == "bfloat16" and float(sc["cc"]) < 8.0:
        fail([f"ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your "
              f"{sc['gpu_name']} GPU has compute capability {sc['cc']}. You can use float16 instead by explicitly "
              "setting the `dtype` flag in CLI, for example: --dtype=half."])
    if faults.get("nccl_error") and tp > 1 and not opts.get("--disable-custom-all-reduce"):
        fail(["RuntimeError: CustomAllreduce failed: NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO "
              "for details)"])

    log(f"Starting to load model {model}...", "gpu_model_runner.py:5060")
    start_sleep(delays["load_s"])
    if ray_backend and faults.get("ray_node_died"):
        print("(raylet) WARNING worker.py:2012 -- The node with node id: 5ad7fa5dd64f and address: 10.0.0.2 and node "
              "name: 10.0.0.2 has been marked dead because the detector has missed too many heartbeats from it. "
              "This can happen when a (1) raylet crashes unexpectedly (OOM, preempted node, etc.)", flush=True)
        fail(["ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."])
    weights = float(sc["weights_gib"]) / (tp * pp)
    non_torch = float(sc["non_torch_gib"]) + float(sc["hidden_non_kv_gib"])
    if weights + non_torch > free:
        fail(["ERROR Failed to load model - not enough GPU memory. Try lowering --gpu-memory-utilization to free "
              "memory for weights, increasing --tensor-parallel-size, or using --quantization. See "
              "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more tips.",
              f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity "
              f"of {total:.2f} GiB of which 0 MiB is free."])
    log(f"Model loading took {round(weights, 2)} GiB memory and {delays['load_s']:.6f} seconds",
        "gpu_model_runner.py:5088")

    start_sleep(delays["profile_s"])
    activation = float(sc["activation_gib_per_1k_tokens"]) * mnbt / 1000
    if weights + non_torch + activation > free:
        fail([f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {activation:.2f} GiB. GPU 0 has a "
              f"total capacity of {total:.2f} GiB of which 12.00 MiB is free."])
    graph_est = 0.0 if eager else float(sc["graph_gib"])
    if not eager:
        log(f"Estimated CUDA graph memory: {graph_est:.2f} GiB total", "gpu_worker.py:700")
    kv_gib = requested - (weights + non_torch + activation + graph_est)
    if kv_gib <= 0:
        fail(["ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
              "initializing the engine (this flag also controls CPU memory reservation on the CPU backend, despite "
              "its name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."])
    log(f"Available KV cache memory: {round(kv_gib, 2)} GiB", "gpu_worker.py:772")
    per_token = float(sc["kv_bytes_per_token"]) / tp
    tokens = int(kv_gib * GIB / per_token) // 16 * 16
    if tokens < mml:
        needed = mml * per_token / GIB
        estimate = f"Based on the available memory, the estimated maximum model length is {tokens}. " if tokens else ""
        fail([f"ValueError: To serve at least one request with the model's max seq len ({mml}), ({needed:.2f} GiB "
              f"KV cache is needed, which is larger than the available KV cache memory ({kv_gib:.2f} GiB). "
              f"{estimate}Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU "
              "backend) or decreasing `max_model_len` when initializing the engine. See "
              "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."])
    log(f"GPU KV cache size: {tokens:,} tokens, Maximum concurrency for {mml:,} tokens per request: "
        f"{tokens / mml:.2f}x", "kv_cache_utils.py:1136")

    headroom = free - requested
    sampler_need = float(sc["sampler_gib_per_seq"]) * max_num_seqs
    if not eager:
        log("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%", "gpu_model_runner.py:6592")
        start_sleep(delays["capture_s"])
        if faults.get("cudagraph_error"):
            fail(["RuntimeError: CUDA error: operation not permitted when stream is capturing",
                  "CUDA kernel errors might be asynchronously reported at some other API call."])
        actual = float(sc["graph_actual_gib"] if sc["graph_actual_gib"] is not None else sc["graph_gib"])
        if actual > headroom:
            fail([f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {actual - headroom + 0.02:.2f} GiB. "
                  f"GPU 0 has a total capacity of {total:.2f} GiB of which {max(headroom, 0) * 1024:.0f} MiB is "
                  "free."])
        log(f"Graph capturing finished in 0 secs, took {actual:.2f} GiB", "gpu_model_runner.py:6516")
    else:
        log("Cudagraph is disabled under eager mode", "config/vllm.py:2005", level="WARNING")
    if sampler_need > headroom:
        fail([f"RuntimeError: CUDA out of memory occurred when warming up sampler with {max_num_seqs} dummy requests. "
              "Please try lowering `max_num_seqs` or `gpu_memory_utilization` when initializing the engine."])

    params = {"max_num_seqs": max_num_seqs, "tensor_parallel_size": tp, "gpu_memory_utilization": util,
              "max_model_len": mml, "max_num_batched_tokens": mnbt, "enforce_eager": eager}
    keys = opts.get("--api-key") or os.environ.get("VLLM_API_KEY")
    sc["api_keys"] = [keys] if isinstance(keys, str) else list(keys or [])
    sc["model_path"] = model
    perf = None
    if os.environ.get("FAKE_VLLM_PERF"):
        sys.path.insert(0, str(HERE))
        import perf_model as perf  # the tune helper's hidden throughput model

        error = perf.startup_error(params)
        if error:
            fail([error])
    log("init engine (profile, create kv cache, warmup model) took 0.30 s (compilation: 0.00 s)", "core.py:394")
    if faults.get("giant_line_mib"):  # one enormous log line (a hostile or broken model's output)
        chunk = "A" * (1 << 20)
        for _ in range(int(faults["giant_line_mib"])):
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
        sys.stdout.flush()
    if faults.get("never_ready"):
        while True:
            time.sleep(1)
    names = opts.get("--served-model-name") or [model]  # what vLLM serves the model as (and lists)
    run_http(sock, host, port, [names] if isinstance(names, str) else list(names), mml, params, perf, sc)


def run_http(sock, host, port, names, mml, params, perf, sc) -> None:
    model = names[0]
    state = {"in_flight": 0, "count": 0}
    lock = threading.Lock()
    listed = threading.Event()  # /v1/models answered once: ready as a launcher sees it

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # vLLM logs requests its own way; keep the output quiet
            pass

        def reply(self, code: int, body: dict | None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self) -> bool:
            """Like vLLM with --api-key: /v1 routes need the bearer token; /health does not."""
            keys = sc.get("api_keys")
            if keys and self.path.startswith("/v1") and self.headers.get("Authorization") not in [
                    f"Bearer {k}" for k in keys]:
                self.reply(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self) -> None:
            if not self.authorized():
                return
            if self.path == "/health":
                self.reply(200, None)
            elif self.path == "/v1/models" and sc.get("faults", {}).get("trickle_models"):
                self.send_response(200)  # a server that answers one byte a second, for ever
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    return
            elif self.path == "/v1/models":
                cards = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                          "root": sc.get("model_path", model), "parent": None, "max_model_len": mml,
                          "permission": []} for name in (sc.get("list_names") or names)]
                self.reply(200, {"object": "list", "data": cards})
                listed.set()
            elif self.path == "/version":
                self.reply(200, {"version": VERSION})
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            if not self.authorized():
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self.reply(400, {"error": {"message": "invalid JSON"}})
                return
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self.reply(404, {"detail": "Not Found"})
                return
            if body.get("model") and body.get("model") not in names:  # vLLM: no name = its first; else 404
                self.reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}})
                return
            chat = self.path.endswith("chat/completions")
            prompt = " ".join(m.get("content", "") for m in body.get("messages", [])) if chat else body.get("prompt", "")
            prompt_tokens = max(1, len(str(prompt).split()))
            max_tokens = int(body.get("max_tokens") or 16)
            with lock:
                state["in_flight"] += 1
                state["count"] += 1
                concurrency, request_id = state["in_flight"], state["count"]
            try:
                if perf is not None:
                    timing = perf.completion_timing(params, prompt_tokens, max_tokens, concurrency,
                                                    request_id=request_id)
                    time.sleep(timing.total_s)
            finally:
                with lock:
                    state["in_flight"] -= 1
            text = " ".join(["ok"] * max_tokens)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                     "total_tokens": prompt_tokens + max_tokens}
            self.reply(200, {"id": f"cmpl-{request_id}", "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model, "choices": [choice], "usage": usage})

    server = ThreadingHTTPServer((host, port), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.request_queue_size = 1024  # like uvicorn's backlog: a burst of clients must not wait for SYN retries
    server.server_activate()  # listen(): from here on connections are accepted
    print(f"(APIServer pid={os.getpid()}) INFO Starting vLLM server on http://{host}:{port}", flush=True)
    print(f"(APIServer pid={os.getpid()}) INFO Application startup complete.", flush=True)
    die_after = sc.get("faults", {}).get("die_after_ready_s")
    if die_after is not None:
        def die() -> None:  # counted from the first /v1/models answer, so a slow readiness poll cannot miss it
            listed.wait()
            time.sleep(float(die_after))
            print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
            print(f"(APIServer pid={os.getpid()}) ERROR AsyncLLM output_handler failed. EngineDeadError", flush=True)
            os._exit(1)

        threading.Thread(target=die, daemon=True).start()
    server.serve_forever(poll_interval=0.1)


def on_term(signum, frame) -> None:
    print(f"(APIServer pid={os.getpid()}) INFO Shutting down (signal {signum}).", flush=True)
    sys.exit(0)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, on_term)
    if argv[:1] in (["--version"], ["-v"]):
        print(VERSION)
        return 0
    if not argv or argv[0] != "serve":
        print("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...", flush=True)
        return 2
    rest = argv[1:]
    if any(a == "--help" or a.startswith("--help=") or a == "-h" for a in rest):
        sys.stdout.write(HELP_FILE.read_text())
        return 0
    serve(rest)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
