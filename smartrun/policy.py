"""The planning policy: the guide's preferences as typed data (smartrun/data/policy.toml).

Preferences say where a plan starts and which way the tuner moves; they are never limits. Limits come
from pins, the user's bounds file, vLLM's domain, the hardware and the estimator (rules.effective_bounds).
One file holds the goal templates, the sizing preferences, the tuning ladder and steps, and the order of
no-fit suggestions, so that no number of the guide hides in code.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Literal

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from pydantic import Field, ValidationError

from smartrun.errors import InputError
from smartrun.frozen import Frozen
from smartrun.knobs import CATALOGUE

POLICY_FILE = "policy.toml"


class Sizing(Frozen):
    """How the estimate becomes a plan, for every goal."""

    utilization: float = Field(gt=0, le=1)
    context_floor: int = Field(ge=1)
    context_min: int = Field(ge=1)
    context_preferred_min: int = Field(ge=1)
    min_full_length_requests: int = Field(ge=1)
    context_step: int = Field(ge=1)
    typical_request_tokens: int = Field(ge=1)
    seqs_step: int = Field(ge=1)


class GoalPolicy(Frozen):
    """One goal's preferences: how it sizes the context and places GPUs, and its template."""

    description: str
    context: Literal["native", "max"]
    full_length_requests: int = Field(ge=1)
    parallelism: Literal["data", "tensor", "context"]
    max_num_seqs: int | None = Field(None, ge=1)  # a preferred ceiling below what the cache holds
    context_before_replicas: bool = False  # data parallelism: grow TP first while the context falls short
    replica_min_batch: int | None = Field(None, ge=1)  # data parallelism: grow TP first while a replica holds fewer
    starved_utilization: bool = False  # a replica below replica_min_batch takes the band's top utilization
    prefer_min_context: bool = True  # offer at least min(native, context_preferred_min) while one request fits
    template: dict[str, Any] = {}


class TunePolicy(Frozen):
    """The tuner's ladder (order of rungs) and its step sizes."""

    ladder: tuple[str, ...]
    util_step: float = Field(gt=0, lt=1)
    knee_gain: float = Field(ge=0)
    resolution: dict[str, float]


class NoFitPolicy(Frozen):
    """What to suggest when nothing fits, most preferred first."""

    order: tuple[Literal["tensor_parallel_size", "quantization_fp8", "kv_cache_dtype_fp8", "enforce_eager",
                         "cpu_offload_gb", "max_model_len"], ...]
    fp8_min_cc: str


class Policy(Frozen):
    version: Literal[1]
    sizing: Sizing
    goals: dict[str, GoalPolicy]
    tune: TunePolicy
    no_fit: NoFitPolicy

    def goal(self, name: str) -> GoalPolicy:
        try:
            return self.goals[name]
        except KeyError:
            raise InputError(f"--goal {name!r}: expected one of {', '.join(self.goals)}") from None


def parse(text: str, where: str = POLICY_FILE) -> Policy:
    """A policy from TOML text; InputError names the file and the first problem."""
    try:
        data = tomllib.loads(text)
        policy = Policy.model_validate(data)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{where}: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        raise InputError(f"{where}: {loc}: {first['msg']}") from None
    for goal in policy.goals.values():
        unknown = sorted(set(goal.template) - set(CATALOGUE))
        if unknown:
            raise InputError(f"{where}: goal template names unknown knob(s) {unknown}")
    unknown = sorted(set(policy.tune.ladder) - set(CATALOGUE))
    if unknown:
        raise InputError(f"{where}: tune.ladder names unknown knob(s) {unknown}")
    return policy


@lru_cache(maxsize=1)
def load() -> Policy:
    """The shipped policy (read once)."""
    return parse(resources.files("smartrun.data").joinpath(POLICY_FILE).read_text(), POLICY_FILE)
