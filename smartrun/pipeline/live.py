"""The live composition root: the real machine, model files, bounds file, LLM, `vllm serve`, caches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smartrun import advisor, argv, bounds, calibration, cluster, hardware, launch, ray_cluster
from smartrun import model as model_mod
from smartrun.clock import SYSTEM, Clock
from smartrun.errors import SmartRunError
from smartrun.hardware import HardwareSnapshot
from smartrun.model import ModelFacts
from smartrun.pipeline.context import BoundsInput, Sources, request_secrets
from smartrun.plan_cache import SavedParams
from smartrun.request import EventSink, RunRequest, no_events
from smartrun.session import LLMInfo


def live_sources(request: RunRequest, env: dict[str, str] | None = None,
                 config_path: str | None = None, clock: Clock = SYSTEM) -> Sources:
    """The real world: NVML or a snapshot, config.json, the bounds file, the LLM, `vllm serve`, the cache.

    `clock` is what the LLM's budget, the launcher's timeouts and the tuner's probes are timed by."""

    env = dict(os.environ if env is None else env)
    transport, llm_info, secrets = _live_transport(request, env, config_path, clock)
    return Sources(
        hardware=lambda: _live_hardware(request),
        model=_live_model,
        bounds=lambda: _live_bounds(request),
        transport=transport,
        launcher=lambda *args: _live_launcher(*args, clock=clock),
        clock=clock,
        cache=SavedParams(),
        vllm=lambda: _live_vllm(request),
        calibration=calibration_store(),
        llm_info=llm_info,
        secrets=request_secrets(request, env, secrets),
    )


def _live_hardware(request: RunRequest) -> HardwareSnapshot:
    """--hardware (once per node: a cluster), else the Ray cluster at --ray-address, else NVML here."""

    if request.hardware_path:
        paths = (request.hardware_path, *request.more_hardware)
        return cluster.combine([hardware.load_snapshot(path) for path in paths])
    if request.ray_address:
        return ray_cluster.detect_cluster(request.ray_address)
    return hardware.detect()


def _live_model(model: str) -> ModelFacts:
    return model_mod.inspect(model)


def _live_bounds(request: RunRequest) -> BoundsInput:
    """--bounds FILE, else smartrun.toml searched upward from the current directory, else the built-in default."""

    if request.bounds_path:
        return _bounds_from_path(Path(request.bounds_path))
    found = bounds.find(Path.cwd())
    if found is not None:
        return _bounds_from_path(Path(found))
    return _builtin_bounds()


def _bounds_from_path(path: Path) -> BoundsInput:
    text = bounds.read_text(path)
    return BoundsInput(path=str(path), text=text, loaded=bounds.load_text(text, str(path)))


def _builtin_bounds() -> BoundsInput:
    text = bounds.BUILTIN_PATH.read_text(encoding="utf-8")
    return BoundsInput(path=None, text=text, loaded=bounds.load_text(text, bounds.BUILTIN_NAME), builtin=True)


def _live_transport(request: RunRequest, env: dict[str, str], config_path: str | None,
                    clock: Clock = SYSTEM) -> tuple[Any | None, LLMInfo, list[str]]:
    if not request.smart_run:
        return None, LLMInfo(), []

    settings = advisor.resolve_settings(request.llm_base_url, request.llm_model, request.llm_timeout, env,
                                        config_path)
    if settings is None:
        return None, LLMInfo(), []
    key = getattr(settings, "api_key", None)
    key_text = key.get_secret_value() if key is not None and hasattr(key, "get_secret_value") else key
    info = LLMInfo(configured=True, base_url=settings.base_url, model=settings.model, timeout_s=settings.timeout_s)
    return advisor.OpenAITransport(settings, clock=clock), info, [key_text] if key_text else []


def _live_vllm(request: RunRequest) -> tuple[str | None, str | None]:
    """--vllm-version wins; else the installed vllm's version. A dry run plans without vllm installed."""
    if request.dry_run and request.vllm_version:
        return request.vllm_version, request.vllm_bin

    try:
        found = launch.find_vllm(request.vllm_bin)
    except SmartRunError:
        if request.dry_run:
            return request.vllm_version, request.vllm_bin
        raise
    return request.vllm_version or found.version, found.path


def check_vllm_flags(request: RunRequest, own: tuple[str, ...] = ()) -> None:
    """Refuse flags typed before `--` that the vLLM which will run does not accept (InputError, exit 2, with
    the nearest flag), before anything else happens; after `--` flags go to vllm unchecked.

    The flag list is the installed vllm's `serve --help=all` (the one --vllm-bin or PATH names); a dry run
    without it, or planning for another --vllm-version, uses the 0.33.0 list shipped with smartrun. A launch
    without vllm is left to fail on that (vllm not found), not on a flag.
    """

    if not request.user_args:
        return
    try:
        found: launch.VllmInfo | None = launch.find_vllm(request.vllm_bin)
    except SmartRunError:
        found = None
    planned_other = request.dry_run and request.vllm_version and found and request.vllm_version != found.version
    if found is None or not found.flags or planned_other:
        if not request.dry_run and found is None:
            return
        found = launch.shipped_vllm_info()
        where = "vLLM 0.33.0 (the flag list shipped with smartrun; no vllm " + (
            f"{request.vllm_version} " if request.vllm_version and request.vllm_version != "0.33.0" else "") + \
            "installed)"
    else:
        where = f"vllm {found.version or '?'} ({found.path})"
    argv.refuse_unknown(request.user_args, found.flags, own, found.arity_of, where)


def _live_launcher(request: RunRequest, hw: HardwareSnapshot, version: str | None,
                   on_event: EventSink = no_events, *, clock: Clock = SYSTEM) -> Any:
    """`vllm serve` as a child process; its log lines and startup phases go to the CLI's event sink."""

    return launch.ProcessLauncher(vllm_bin=request.vllm_bin, hardware=hw, host=request.host, port=request.port,
                                  startup_timeout=request.startup_timeout, ray_address=request.ray_address,
                                  printer=lambda line: on_event("vllm", line),
                                  progress=lambda text: on_event("phase", text), clock=clock)


def calibration_store() -> Any:
    """The user's calibration data (calibration.Store under the data dir)."""
    return calibration.Store()
