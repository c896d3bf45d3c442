"""One error tree. Every error carries a one-line message naming what is at fault, and an exit code.

The CLI prints `localaistack: <message>` to stderr and exits with `exit_code`; no traceback.
Exit codes: 2 bad input or nothing fits, 3 LLM failure under --smart-run-strict,
4 launch failed after recovery, 5 replay diverged, 130 interrupted.
"""

from __future__ import annotations


class SmartRunError(Exception):
    """Root of every error smartrun raises on purpose."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line


class InputError(SmartRunError):
    """A file, path or argument the user gave is wrong (names the file/flag and what is wrong)."""


class ModelError(InputError):
    """Model path, config.json or safetensors header is missing or invalid."""


class SnapshotError(InputError):
    """A hardware snapshot file is unreadable or invalid."""


class HardwareError(SmartRunError):
    """Hardware cannot be detected (no NVML, no driver, no GPU)."""


class EstimateError(InputError):
    """Flags the estimator cannot budget: TP not dividing heads, unknown GPU, util outside (0, 1]."""


class BoundsError(InputError):
    """A bounds file problem; the message names file and line."""


class PinConflictError(InputError):
    """A user pin lies outside another source's bound (names both sources)."""


class ClusterError(SmartRunError):
    """The Ray cluster is unreachable, not installed, or does not match the plan (names what is missing)."""


class InfeasibleError(SmartRunError):
    """No plan inside the bounds can start (names what does not fit and by how much)."""


class AdvisorError(SmartRunError):
    """The LLM could not give an acceptable proposal and --smart-run-strict was set."""

    exit_code = 3


class LaunchError(SmartRunError):
    """vllm serve did not become healthy within the attempt limit."""

    exit_code = 4


class ReplayDivergence(SmartRunError):
    """Replaying a session record made a different decision than the record holds."""

    exit_code = 5
