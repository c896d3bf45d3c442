"""The `vllm` stand-in's hidden throughput model: how fast a configuration serves, and whether it starts.

The tuner is never told any of this; it only sees what the stand-in's endpoints do. The stand-in
calls `completion_timing(...)` per request and `startup_error(...)` before it listens, when env
FAKE_VLLM_PERF names a profile. The benchmark and the tests use `expected(...)` and `exhaustive_best(...)`
to know the true answer.

Shape of the model (per profile, in "real" seconds; `time_scale` shrinks what the stand-in sleeps):
- KV memory = util * GPU memory - weights/tp - activation(max_num_seqs); each running sequence needs
  (prompt + output) tokens of it, so KV memory caps how many sequences really run at once.
- A decode step takes `step_ms/tp_speedup * (1 + active/batch_k)`: batching has diminishing returns.
- Closed loop with C clients: requests beyond the running ones queue (Little's law).
- Latency spread grows with the batch (prefill interference) and with preemption when
  max_num_seqs exceeds what the KV cache holds, so p95 rises for large batches even when tokens/s does not fall.
- OOM cliff: CUDA graphs and the sampler need `reserve + graph_per_seq * max_num_seqs` outside the
  util share; above that util/seqs combination the server fails to start.
- Data parallelism (`data_parallel_size`): dp independent replicas of tp GPUs each; the C clients spread
  evenly over them, each replica has its own KV cache and batch, and tokens/s add up.
- `kv_capacity_tokens` (per replica) replaces the KV formula with a figure from outside (the estimator, in
  benchmarks/plan_quality.py); startup is then judged there too.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, replace
from typing import Any

ENV = "FAKE_VLLM_PERF"


@dataclass(frozen=True)
class Profile:
    name: str
    gpus: int  # GPUs present (tp may not exceed this)
    gpu_gib: float  # memory per GPU
    weights_gib: float  # whole model, split across tp
    act_gib: float  # activation peak at max_num_seqs=1
    act_per_seq_gib: float  # sampler/activation growth per allowed sequence
    kv_mib_per_token: float  # whole model, split across tp
    reserve_gib: float  # non-torch memory outside the util share
    graph_per_seq_gib: float  # CUDA graph pool growth per allowed sequence
    step_ms: float  # decode step at batch 1, tp 1
    batch_k: float  # batch size where a step takes twice as long
    tp_exp: float  # speedup = tp ** tp_exp
    tp_comm_ms: float  # per-step all-reduce cost when tp > 1
    prefill_ms_per_ktok: float
    spread0: float  # latency spread at batch 0 (fraction of the mean)
    spread_per_seq: float  # extra spread per running sequence
    preempt_spread: float  # extra spread when max_num_seqs exceeds KV capacity
    preempt_efficiency: float = 0.95  # share of useful work when sequences get preempted
    time_scale: float = 0.004  # stand-in sleeps real_time * time_scale


PROFILES: dict[str, Profile] = {
    # One 24 GiB card, 7B fp16: KV memory limits concurrency, so util matters; graph cliff near 0.93.
    "kv_bound": Profile(
        name="kv_bound", gpus=1, gpu_gib=24.0, weights_gib=13.5, act_gib=1.0, act_per_seq_gib=0.01,
        kv_mib_per_token=0.5, reserve_gib=1.2, graph_per_seq_gib=0.012, step_ms=22.0, batch_k=20.0,
        tp_exp=0.85, tp_comm_ms=1.5, prefill_ms_per_ktok=60.0, spread0=0.05, spread_per_seq=0.004,
        preempt_spread=0.4,
    ),
    # One 80 GiB card, 8B: plenty of KV; batching saturates, and big batches widen the latency tail.
    "compute_bound": Profile(
        name="compute_bound", gpus=1, gpu_gib=80.0, weights_gib=15.0, act_gib=2.0, act_per_seq_gib=0.02,
        kv_mib_per_token=0.125, reserve_gib=3.0, graph_per_seq_gib=0.06, step_ms=12.0, batch_k=12.0,
        tp_exp=0.85, tp_comm_ms=1.0, prefill_ms_per_ktok=25.0, spread0=0.05, spread_per_seq=0.012,
        preempt_spread=0.4,
    ),
    # Two 48 GiB cards, 13B: tp=2 pays off (more KV and faster steps); tp=1 is KV-starved.
    "multi_gpu": Profile(
        name="multi_gpu", gpus=2, gpu_gib=48.0, weights_gib=26.0, act_gib=1.5, act_per_seq_gib=0.015,
        kv_mib_per_token=0.8, reserve_gib=2.0, graph_per_seq_gib=0.03, step_ms=30.0, batch_k=24.0,
        tp_exp=0.85, tp_comm_ms=2.0, prefill_ms_per_ktok=80.0, spread0=0.05, spread_per_seq=0.003,
        preempt_spread=0.4,
    ),
}

DEFAULTS = {"max_num_seqs": 256, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "data_parallel_size": 1}


@dataclass(frozen=True)
class Timing:
    """One request as the stand-in should serve it: seconds to the first token and in total (scaled)."""

    ttft_s: float
    total_s: float


@dataclass(frozen=True)
class Expected:
    """The model's steady-state answer for a closed-loop workload, in real (unscaled) units."""

    starts: bool
    error: str | None
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    active: float
    kv_capacity_seqs: float


def profile(spec: str | None = None) -> Profile:
    """A named profile, optionally with overrides: "kv_bound" or "kv_bound,time_scale=0.002,gpus=2"."""
    spec = spec if spec is not None else os.environ.get(ENV, "")
    name, *overrides = [part.strip() for part in spec.split(",")]
    if name not in PROFILES:
        raise KeyError(f"unknown perf profile {name!r}; known: {', '.join(PROFILES)}")
    base = PROFILES[name]
    changes: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        current = getattr(base, key)  # AttributeError names an unknown field
        changes[key] = type(current)(value)
    return replace(base, **changes)


def _knobs(params: dict[str, Any]) -> tuple[int, int, float]:
    """max_num_seqs, tensor_parallel_size, gpu_memory_utilization from catalogue or flag-style keys."""
    norm = _norm(params)
    get = lambda k: norm.get(k, DEFAULTS[k])  # noqa: E731
    return int(get("max_num_seqs")), int(get("tensor_parallel_size")), float(get("gpu_memory_utilization"))


def _norm(params: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in params.items() if v is not None}


def replicas(params: dict[str, Any]) -> int:
    """data_parallel_size (1 when unset)."""
    return int(_norm(params).get("data_parallel_size", DEFAULTS["data_parallel_size"]))


def _kv_gib_per_gpu(p: Profile, seqs: int, tp: int, util: float) -> float:
    return util * p.gpu_gib - p.weights_gib / tp - (p.act_gib + p.act_per_seq_gib * seqs)


def startup_error(params: dict[str, Any], prof: Profile | None = None) -> str | None:
    """vLLM's error line when this configuration cannot start on the profile's machine, else None."""
    p = prof or profile()
    seqs, tp, util = _knobs(params)
    if tp * replicas(params) > p.gpus:
        return (f"ValueError: World size ({tp * replicas(params)}) is larger than the number of available GPUs "
                f"({p.gpus}) in this node.")
    if _kv_gib_per_gpu(p, seqs, tp, util) <= 0:
        return ("ValueError: No available memory for the cache blocks. Try increasing "
                "`gpu_memory_utilization` when initializing the engine.")
    headroom = (1.0 - util) * p.gpu_gib
    need = p.reserve_gib + p.graph_per_seq_gib * seqs
    if headroom < need:
        return (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {need - headroom + 0.25:.2f} GiB. "
                f"GPU 0 has a total capacity of {p.gpu_gib:.2f} GiB of which {headroom:.2f} GiB is free.")
    return None


def _service(p: Profile, tp: int, active: float, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode ms) of one request while `active` sequences share the GPU(s)."""
    speed = tp**p.tp_exp
    slow = 1.0 + active / p.batch_k
    comm = p.tp_comm_ms if tp > 1 else 0.0
    prefill = prompt_tokens / 1000.0 * p.prefill_ms_per_ktok / speed * slow
    decode = output_tokens * (p.step_ms / speed * slow + comm)
    return prefill, decode


def expected(
    params: dict[str, Any], prof: Profile | str, prompt_tokens: int, output_tokens: int, concurrency: int,
    kv_capacity_tokens: float | None = None,
) -> Expected:
    """Steady-state tokens/s and latency percentiles for `concurrency` closed-loop clients (real units).

    With data_parallel_size dp, each replica serves concurrency/dp clients; tokens/s are the replicas' sum.
    """
    p = profile(prof) if isinstance(prof, str) else prof
    dp = replicas(params)
    if dp > 1:
        one = expected({**_norm(params), "data_parallel_size": 1}, replace(p, gpus=p.gpus // dp), prompt_tokens,
                       output_tokens, max(1, -(-concurrency // dp)), kv_capacity_tokens)
        if not one.starts or dp * _knobs(params)[1] > p.gpus:
            return Expected(False, one.error or startup_error(params, p), 0.0, 0.0, 0.0, 0.0, 0.0)
        return replace(one, tokens_per_s=one.tokens_per_s * concurrency / max(1, -(-concurrency // dp) * dp) * dp,
                       kv_capacity_seqs=one.kv_capacity_seqs * dp)
    seqs, tp, util = _knobs(params)
    if kv_capacity_tokens is None:
        err = startup_error(params, p)
        if err:
            return Expected(False, err, 0.0, 0.0, 0.0, 0.0, 0.0)
        kv_gib_total = _kv_gib_per_gpu(p, seqs, tp, util) * tp
        cap = kv_gib_total * 1024.0 / (p.kv_mib_per_token * (prompt_tokens + output_tokens))
    elif tp > p.gpus:
        return Expected(False, startup_error(params, p), 0.0, 0.0, 0.0, 0.0, 0.0)
    else:
        cap = kv_capacity_tokens / (prompt_tokens + output_tokens)
    active = max(1.0, min(float(concurrency), float(seqs), cap))
    prefill, decode = _service(p, tp, active, prompt_tokens, output_tokens)
    service = prefill + decode
    mean = service * max(1.0, concurrency / active)  # queueing beyond the running batch
    spread = p.spread0 + p.spread_per_seq * active + (p.preempt_spread if seqs > cap else 0.0)
    spread = min(spread, 0.9)
    if seqs > cap:  # preempted sequences are recomputed: wasted work
        mean /= p.preempt_efficiency
    tokens_per_s = concurrency * output_tokens / (mean / 1000.0)
    return Expected(True, None, tokens_per_s, mean, mean * (1.0 + 0.9 * spread), active, cap)


def _unit(*parts: Any) -> float:
    """A deterministic number in [-1, 1) from the request's identity, so runs repeat."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**63 - 1.0


def completion_timing(
    params: dict[str, Any], prompt_tokens: int, max_tokens: int, concurrency: int,
    *, request_id: Any = None, prof: Profile | None = None,
) -> Timing:
    """How long the stand-in takes for one request while `concurrency` requests are in flight (scaled)."""
    p = prof or profile()
    prompt_tokens, max_tokens, concurrency = max(1, int(prompt_tokens)), max(1, int(max_tokens)), max(1, int(concurrency))
    e = expected(params, p, prompt_tokens, max_tokens, concurrency)
    if not e.starts:
        return Timing(0.0, 0.0)
    # uniform spread around the mean: p95 of many requests ~ mean * (1 + 0.9 * spread)
    spread = (e.p95_ms / e.p50_ms - 1.0) / 0.9 if e.p50_ms else 0.0
    total_ms = e.p50_ms * (1.0 + spread * _unit(request_id, concurrency, prompt_tokens))
    prefill, decode = _service(p, _knobs(params)[1], e.active, prompt_tokens, max_tokens)
    ttft_ms = max(prefill, total_ms - decode * (total_ms / e.p50_ms))
    return Timing(ttft_s=ttft_ms / 1000.0 * p.time_scale, total_s=total_ms / 1000.0 * p.time_scale)


def grid(bounds: dict[str, tuple], prof: Profile) -> list[dict[str, Any]]:
    """Every in-bounds configuration: bounds maps knob -> (values...) already enumerated."""
    names = list(bounds)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(bounds[n] for n in names))]


def exhaustive_best(
    space: dict[str, tuple], prof: Profile | str, prompt_tokens: int, output_tokens: int, concurrency: int,
    slo_p95_ms: float | None = None, base: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, Expected | None]:
    """The configuration in `space` with the most tokens/s that starts and meets the SLO (real units)."""
    p = profile(prof) if isinstance(prof, str) else prof
    best: tuple[dict[str, Any] | None, Expected | None] = (None, None)
    for combo in grid(space, p):
        params = {**(base or {}), **combo}
        e = expected(params, p, prompt_tokens, output_tokens, concurrency)
        if not e.starts or (slo_p95_ms is not None and e.p95_ms > slo_p95_ms):
            continue
        if best[1] is None or e.tokens_per_s > best[1].tokens_per_s:
            best = (params, e)
    return best


# ---------------------------------------------------------------------------- in-process simulation
# For the benchmark and the quick tests: the same numbers the stand-in would produce, without processes.


@dataclass
class SimServer:
    """A 'running server' in the simulation: just the configuration it runs."""

    params: dict[str, Any]
    base_url: str = "sim://"
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True


class Simulation:
    """restart(plan) and probe(server) over a profile, counting restarts (for the benchmark's table)."""

    def __init__(self, prof: Profile | str, prompt_tokens: int, output_tokens: int, concurrency: int):
        self.prof = profile(prof) if isinstance(prof, str) else prof
        self.workload = (prompt_tokens, output_tokens, concurrency)
        self.restarts = 0
        self.failed_starts = 0
        self.running: SimServer | None = None

    def start(self, params: dict[str, Any]) -> tuple[bool, Any]:
        if self.running is not None:
            self.running.stop()
            self.running = None
        self.restarts += 1
        error = startup_error(params, self.prof)
        if error:
            self.failed_starts += 1
            return False, error
        self.running = SimServer(dict(params))
        return True, self.running

    def restart(self, plan: Any) -> tuple[bool, Any]:
        return self.start(plan.params)

    def expected(self, params: dict[str, Any]) -> Expected:
        return expected(params, self.prof, *self.workload)

    def probe(self, server: SimServer) -> Any:
        """A ProbeResult as smartrun.probe would measure it over a 10 s closed loop (real units)."""
        from smartrun.probe import ProbeResult, ProbeSettings

        prompt, output, concurrency = self.workload
        e = self.expected(server.params)
        elapsed = 10.0
        requests = max(1, round(e.tokens_per_s * elapsed / output))
        settings = ProbeSettings(concurrency=concurrency, prompt_tokens=prompt, output_tokens=output,
                                 duration_s=elapsed)
        return ProbeResult(
            url=server.base_url, model="sim", settings=settings, requests=requests, ok=requests, errors=0,
            output_tokens=requests * output, elapsed_s=elapsed, tokens_per_s=e.tokens_per_s,
            requests_per_s=requests / elapsed, latency_p50_ms=e.p50_ms, latency_p95_ms=e.p95_ms, streamed=False,
        )
