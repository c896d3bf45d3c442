"""The knob catalogue: every vLLM flag smartrun may set, declared once.

Argv building, validation, prompts, bounds files and --explain all read this one table.
CONTRACT. TODO(helper-bounds): fill CATALOGUE, parse_user_args(), build_argv().
"""

from __future__ import annotations

from typing import Any, Literal

from smartrun.plan import Frozen

KnobType = Literal["int", "float", "bool", "choice", "str"]


class Knob(Frozen):
    name: str  # catalogue name, e.g. "max_model_len"
    flag: str  # vLLM flag, e.g. "--max-model-len"
    aliases: tuple[str, ...] = ()  # e.g. ("-tp",), "--device-memory-utilization"
    type: KnobType
    min: float | int | None = None  # vLLM's own domain
    max: float | int | None = None
    min_exclusive: bool = False  # gpu_memory_utilization is (0, 1]
    choices: tuple[Any, ...] | None = None
    default: Any = None  # vLLM 0.33 default (None = derived by vLLM)
    llm_may_change: bool = False  # False = user only
    security: bool = False  # host, port, api key, trust-remote-code, anything that runs code
    help: str = ""


CATALOGUE: dict[str, Knob] = {}


class UserArgs(Frozen):
    """What the user typed after MODEL: pins (known knobs, typed values) and passthrough (everything else, in order)."""

    pins: dict[str, Any] = {}
    passthrough: tuple[str, ...] = ()


def parse_user_args(argv: list[str]) -> UserArgs:
    """vLLM flags in vLLM's own syntax (`--max-model-len 8192`, `--gpu-memory-utilization=0.9`, `--enforce-eager`)."""
    raise NotImplementedError


def build_argv(model_path: str, params: dict[str, Any], passthrough: tuple[str, ...] = ()) -> list[str]:
    """`["vllm", "serve", model_path, ...flags...]` from knob values; booleans as --x / --no-x."""
    raise NotImplementedError
