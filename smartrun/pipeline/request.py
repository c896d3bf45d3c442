"""What the user asked `model run` for: the request recorded (redacted) so replay asks the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smartrun.frozen import Frozen

EventSink = Callable[[str, str], None]  # (kind, one line) -> the CLI prints it


def no_events(kind: str, text: str) -> None:
    return None


class RunRequest(Frozen):
    """What the user asked for; recorded (redacted) so replay can ask the same."""

    model: str
    user_args: tuple[str, ...] = ()  # vLLM flags typed after MODEL, then "--" passthrough, as typed
    extra_args: tuple[str, ...] = ()  # everything after "--": passed through untouched
    smart_run: bool = False
    debug: bool = False
    refresh: bool = False
    strict: bool = False
    dry_run: bool = False
    goal: str = "stable"
    force: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    vllm_version: str | None = None
    vllm_bin: str | None = None
    startup_timeout: float = 900.0
    max_attempts: int = 3
    hardware_path: str | None = None
    more_hardware: tuple[str, ...] = ()  # the other nodes' snapshots (--hardware given once per node)
    ray_address: str | None = None  # --ray-address: launch on this Ray cluster
    bounds_path: str | None = None
    tune: bool = False
    tune_options: dict[str, Any] = {}  # TuneSettings fields from the --tune-*/--probe-* flags
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_timeout: float | None = None
    gpus: str | None = None  # --gpus 0,2: nvidia-smi indices (or UUIDs) of the GPUs to use
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as it was when the run started (None: unset)

    def command_line(self) -> list[str]:
        """The `model run` command this request stands for (options that differ from their defaults)."""
        defaults = RunRequest(model=self.model)
        flags = {"smart_run": "--smart-run", "debug": "--smart-run-debug", "refresh": "--smart-run-refresh",
                 "strict": "--smart-run-strict", "dry_run": "--dry-run", "force": "--force", "tune": "--tune",
                 "goal": "--goal", "host": "--host", "port": "--port", "vllm_version": "--vllm-version",
                 "vllm_bin": "--vllm-bin", "startup_timeout": "--startup-timeout", "max_attempts": "--max-attempts",
                 "hardware_path": "--hardware", "bounds_path": "--bounds", "llm_base_url": "--llm-base-url",
                 "llm_model": "--llm-model", "llm_timeout": "--llm-timeout", "gpus": "--gpus"}
        out = ["localaistack", "model", "run", self.model]
        for name, flag in flags.items():
            value = getattr(self, name)
            if value == getattr(defaults, name):
                continue
            out += [flag] if value is True else [flag, str(value)]
        for path in self.more_hardware:
            out += ["--hardware", path]
        if self.ray_address:
            out += ["--ray-address", self.ray_address]
        out += list(self.user_args)
        return out + (["--", *self.extra_args] if self.extra_args else [])
