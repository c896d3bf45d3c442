"""Stage 7, launch: a validated plan -> a healthy `vllm serve`, recovering inside the bounds when it fails.

- `find_vllm` finds the binary, its version and the flags it accepts (cached by path + mtime);
  `adapt_argv` drops or translates flags this version does not know, with a warning naming each.
- `ProcessLauncher` starts vllm in its own process group, streams its log, shows the startup phases,
  polls /health then /v1/models until ready, a timeout, or the child's death; Ctrl+C / SIGTERM stop
  the whole group. `Server` supervises a ready child.
- `run_with_recovery` loops: launch, classify the failure (vllm_log), ask the advisor and then the
  recovery ladder for the next plan, pass it through the validator, bounded attempts.
The process part sits behind the `Launcher` protocol so a session replay can serve recorded outcomes.
"""

from __future__ import annotations

from smartrun.launch.attempts import LaunchReport, run_with_recovery
from smartrun.launch.command import adapt_argv, command_line, endpoint, gpu_env, served_name
from smartrun.launch.process import LaunchAttempt, Launcher, ProcessLauncher, Server, _capped_lines
from smartrun.launch.vllm import (
    CACHE_FILE,
    HEARTBEAT_S,
    PHASE_WORDS,
    VllmInfo,
    find_vllm,
    parse_help_arity,
    shipped_vllm_info,
)

__all__ = [
    "CACHE_FILE",
    "HEARTBEAT_S",
    "PHASE_WORDS",
    "LaunchAttempt",
    "LaunchReport",
    "Launcher",
    "ProcessLauncher",
    "Server",
    "VllmInfo",
    "_capped_lines",
    "adapt_argv",
    "command_line",
    "endpoint",
    "find_vllm",
    "gpu_env",
    "parse_help_arity",
    "run_with_recovery",
    "served_name",
    "shipped_vllm_info",
]
