"""What the user asked `model run` for: the request recorded (redacted) so replay asks the same."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from smartrun.argv import positive_seconds
from smartrun.contracts import GOALS
from smartrun.frozen import Frozen
from smartrun.tune.options import command_line as tune_command_line

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
        out = ["localaistack", "model", "run", self.model]
        for option in OPTIONS:
            for value in _values(self, option.field):
                if value != RunRequest.model_fields[option.field].default or option.field == "more_hardware":
                    out += [option.flag] if value is True else [option.flag, str(value)]
        out += tune_command_line(self.tune_options)
        out += list(self.user_args)
        return out + (["--", *self.extra_args] if self.extra_args else [])

    @classmethod
    def fields_from_args(cls, args: argparse.Namespace, only: Collection[str] | None = None) -> dict[str, Any]:
        """The request's fields that smartrun's own options set (parsed by a parser `add_options` built with
        the same `only`)."""
        out: dict[str, Any] = {}
        for option in _chosen(only):
            value = getattr(args, option.dest)
            if option.field == "hardware_path":  # --hardware once per node: the head first, then the others
                out["hardware_path"], out["more_hardware"] = (value or [None])[0], tuple((value or [])[1:])
            elif option.field != "more_hardware":
                out[option.field] = value
        return out


class Option(NamedTuple):
    """One of smartrun's own `model run` options: the request field it sets and how it is typed."""

    field: str
    flag: str
    help: str
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# Declared once: `add_options` makes them argparse options, `fields_from_args` reads them back and
# `RunRequest.command_line` writes them out again (with the --tune options, from tune.TUNE_OPTIONS).
# A bool field is a switch.
OPTIONS: tuple[Option, ...] = (
    Option("smart_run", "--smart-run", "ask the LLM (if configured) and use saved parameters"),
    Option("debug", "--smart-run-debug", "print source=... reason=..., LLM latency, tokens"),
    Option("refresh", "--smart-run-refresh", "ignore saved parameters for this model"),
    Option("strict", "--smart-run-strict", "fail (exit 3) instead of falling back"),
    Option("dry_run", "--dry-run", "print the plan and the vllm serve command; start nothing"),
    Option("hardware_path", "--hardware", "plan for the machine this snapshot describes; give it once per node "
           "(the first is the Ray head) to plan across a cluster", "SNAPSHOT.json"),
    Option("more_hardware", "--hardware", "", "SNAPSHOT.json"),  # the other nodes (command_line only)
    Option("ray_address", "--ray-address", "the Ray cluster to launch on (HOST:PORT of its head): checked against "
           "the plan, then vllm serve starts with --distributed-executor-backend ray; without --hardware its "
           "nodes are read through Ray", "ADDR"),
    Option("gpus", "--gpus", "use only these GPUs: nvidia-smi indices or UUIDs, e.g. 0,2 (also honoured: "
           "CUDA_VISIBLE_DEVICES, same numbering; --gpus must lie inside it)", "LIST"),
    Option("bounds_path", "--bounds", "bounds file (default: smartrun.toml upward, else built-in)", "FILE"),
    Option("goal", "--goal", "what the plan favours (default stable)", choices=GOALS),
    Option("force", "--force", "accept pins outside other sources' bounds"),
    Option("host", "--host", "address vllm listens on (default 127.0.0.1: local only; vLLM's own default is all "
           "interfaces)"),
    Option("port", "--port", "port vllm listens on (default 8000)", type=int),
    Option("vllm_version", "--vllm-version", "plan for this vLLM version (default: the installed one)", "V"),
    Option("vllm_bin", "--vllm-bin", "the vllm executable (default: from PATH)", "PATH"),
    Option("startup_timeout", "--startup-timeout", "seconds to wait for each start to become healthy (default "
           "900: big models load slowly)", "S", positive_seconds),
    Option("max_attempts", "--max-attempts", "starts, recoveries included, before giving up (default 3)", "N", int),
    Option("llm_base_url", "--llm-base-url", "OpenAI-compatible endpoint (else SMARTRUN_LLM_BASE_URL, "
           "OPENAI_BASE_URL, [llm] config)", "URL"),
    Option("llm_model", "--llm-model", "model name at that endpoint (default: its first)", "NAME"),
    Option("llm_timeout", "--llm-timeout", "seconds for one whole LLM decision: every request, retry and repair "
           "(default 60)", "S", positive_seconds),
    Option("tune", "--tune", "after a healthy start, tune throughput inside the bounds"),  # its options: tune.TUNE_OPTIONS
)


def add_options(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> None:
    """smartrun's own `model run` options, from OPTIONS; `only` these request fields (`bounds show` plans
    with a few of them)."""
    for option in _chosen(only):
        if option.field == "more_hardware":
            continue
        default = RunRequest.model_fields[option.field].default
        if default is False:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        elif option.field == "hardware_path":
            parser.add_argument(option.flag, action="append", metavar=option.metavar, help=option.help)
        else:
            typed: dict[str, Any] = {"type": option.type} if option.type is not None else {}
            parser.add_argument(option.flag, default=default, metavar=option.metavar, choices=option.choices,
                                help=option.help, **typed)


def _chosen(only: Collection[str] | None) -> tuple[Option, ...]:
    if only is None:
        return OPTIONS
    unknown = set(only) - {option.field for option in OPTIONS}
    assert not unknown, f"not options of model run: {sorted(unknown)}"
    return tuple(option for option in OPTIONS if option.field in only)


def _values(request: RunRequest, field: str) -> tuple[Any, ...]:
    value = getattr(request, field)
    return tuple(value) if field == "more_hardware" else (value,)
