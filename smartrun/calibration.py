"""Calibration from the user's own startups: the estimator's non-KV memory, corrected per machine and vLLM version.

Every healthy `vllm serve` start prints what vLLM really budgeted: the weights, the KV cache in GiB and
tokens, and (in versions that print them) the activation peak, non-torch memory and CUDA-graph estimate.
The pipeline turns each healthy start into an `Observation` (vLLM's figures next to the uncalibrated
estimate), keeps it in the session record and in `calibration/<machine>-<version>.json` under the user
data dir. `learn` makes one `Correction` of those: GiB per GPU added to the estimator's non-KV terms.

Why these rules (a start that fails costs minutes, a KV cache a little smaller costs little):
- shrink at once: when any recent start left less KV cache than estimated, the correction covers the
  largest such shortfall, from the first start on;
- grow only on agreement: when every recent start left more KV cache than estimated, the estimate
  grows by the smallest surplus, and only once MIN_AGREEING starts agree within AGREE_GIB;
- bounded: a correction beyond MAX_SHRINK / MAX_GROW of the GPU's memory is clamped and says so
  (such a difference is another process, another card or a broken start, not the estimator);
- the plan-safe band (memory.plan_safe_*, the profile's margin) narrows to this machine's own: the
  spread of the startups' residuals (at least BAND_FLOOR_GIB), widened by (1 + 2/sqrt(n)) as the
  profile bands are. A narrower band is a larger plan, so with one startup the plan-safe estimate may
  only fall (the shortfall it corrects counts toward the profile's band: a machine with much hidden
  memory is not refused everything before a second startup can happen); from MIN_AGREEING startups on
  the machine's own band holds. It never widens the profile's band (the correction already covers the
  largest shortfall seen).
`memory.estimate(..., calibration=)` applies it; the caller looks it up, so the estimator stays pure.
A session record keeps the correction it planned with, and replay uses that one, never a later one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smartrun.errors import InputError
from smartrun.fileio import remove_file, smartrun_home, write_user_file
from smartrun.frozen import Frozen
from smartrun.hardware import fingerprint
from smartrun.memory import estimate, resolve_version
from smartrun.memory.correction import MIN_AGREEING, Correction
from smartrun.vllm_profiles import PROFILES

SCHEMA_VERSION: Literal[1] = 1
RECENT = 5  # the correction is learned from the last RECENT startups (older ones describe an older machine)
MAX_KEPT = 20  # observations kept per (machine, vLLM version)
AGREE_GIB = 0.25  # ... within this spread of their surpluses (GiB per GPU)
MAX_SHRINK = 0.25  # most non-KV GiB a correction may add, as a fraction of the GPU's memory
MAX_GROW = 0.10  # most non-KV GiB a correction may take away, as a fraction of the GPU's memory
BAND_FLOOR_GIB = 0.1  # the narrowest plan-safe band startups can support (as the measured 0.19 profile's floor)
TERMS = ("weights", "activation", "non_torch", "cudagraph")  # the non-KV terms vLLM prints in some version
MEMORY_KNOBS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
                "max_num_seqs", "max_num_batched_tokens", "dtype", "kv_cache_dtype", "enforce_eager",
                "optimization_level", "quantization", "block_size")


class CalibrationError(InputError):
    """The calibration data directory or a calibration argument is unusable (names the path or flag)."""


class Figures(Frozen):
    """One startup's memory per GPU (GiB) and its KV tokens (engine-wide); None where not known or not printed."""

    weights_gib: float | None = None
    activation_gib: float | None = None
    non_torch_gib: float | None = None
    cudagraph_gib: float | None = None  # only where it is taken from the KV budget (vLLM 0.20+)
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None


class Observation(Frozen):
    """vLLM's measured figures of one healthy start next to what the uncalibrated estimator said for it."""

    at: str  # when the session started (UTC ISO)
    session: str | None = None  # the session record's path
    model: str
    params: dict[str, Any] = Field(default_factory=dict)  # the plan's memory-shaping knob values
    gpu_total_gib: float  # per GPU, as CUDA reports it (the bound's unit)
    estimated: Figures
    measured: Figures
    residual_gib: float  # estimated minus measured KV cache per GPU: > 0 = the estimate was too high (unsafe)
    tool_version: str = ""

    def describe(self) -> str:
        """One line: the model, the plan, and estimated vs measured KV cache."""
        p = self.params
        plan = " ".join(f"{k}={p[k]}" for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                                                 "max_num_seqs") if p.get(k) is not None)
        est, got = self.estimated, self.measured
        tokens = (f", tokens {est.kv_cache_tokens:,} / {got.kv_cache_tokens:,}"
                  if est.kv_cache_tokens is not None and got.kv_cache_tokens is not None else "")
        return (f"{self.at}  {self.model}  {plan}: KV cache estimated {_num(est.kv_cache_gib)} / measured "
                f"{_num(got.kv_cache_gib)} GiB{tokens}; non-KV {self.residual_gib:+.2f} GiB per GPU")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------- learning


def learn(observations: Sequence[Observation], machine: str, vllm_version: str) -> Correction | None:
    """The correction the recent startups support (None without any). See the module doc for the rules."""
    recent = list(observations)[-RECENT:]
    if not recent:
        return None
    residuals = [round(o.residual_gib, 3) for o in recent]
    worst, best = max(residuals), min(residuals)
    total = min(o.gpu_total_gib for o in recent)
    if worst > 0:
        rule, value = "shrink", worst
        note = (f"a startup left {worst:.2f} GiB less KV cache than estimated" if len(recent) == 1 else
                f"the largest shortfall of {len(recent)} startups ({worst:.2f} GiB) is taken at once")
    elif len(recent) >= MIN_AGREEING and worst - best <= AGREE_GIB:
        rule, value = "grow", worst
        note = f"{len(recent)} startups agree vLLM leaves at least {-worst:.2f} GiB more KV cache than estimated"
    else:
        rule, value = "hold", 0.0
        spread = f"{-worst:.2f}" if worst == best else f"{-worst:.2f}-{-best:.2f}"
        note = (f"{len(recent)} startup{'s' if len(recent) > 1 else ''} left {spread} GiB more KV "
                f"cache than estimated; the estimate grows only when {MIN_AGREEING} startups agree within "
                f"{AGREE_GIB} GiB")
    limit = (MAX_SHRINK if value > 0 else MAX_GROW) * total
    clamped = abs(value) > limit
    if clamped:
        value = limit if value > 0 else -limit
        note += (f"; clamped to {value:+.2f} GiB ({(MAX_SHRINK if value > 0 else MAX_GROW):.0%} of the GPU): a "
                 "larger difference is not the estimator's (another process, another card?)")
    band = max(worst - best, BAND_FLOOR_GIB) * (1 + 2 / math.sqrt(len(recent)))
    return Correction(machine=machine, vllm_version=vllm_version, startups=len(recent), non_kv_gib=round(value, 3),
                      rule=rule, residuals_gib=tuple(residuals), terms_gib=_mean_terms(recent), clamped=clamped,
                      note=note, band_gib=round(band, 3))


def _mean_terms(observations: Sequence[Observation]) -> dict[str, float]:
    """Measured minus estimated per term vLLM printed, averaged; what no printed term explains is `unprinted`."""
    sums: dict[str, list[float]] = {}
    for o in observations:
        explained = 0.0
        for term in TERMS:
            est, got = getattr(o.estimated, f"{term}_gib"), getattr(o.measured, f"{term}_gib")
            if est is not None and got is not None:
                sums.setdefault(term, []).append(got - est)
                explained += got - est
        sums.setdefault("unprinted", []).append(o.residual_gib - explained)
    return {k: round(sum(v) / len(v), 3) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------- observing


def observe(estimate: Any, startup: Any, *, model: str, params: dict[str, Any], at: str,
            session: str | None = None, tool_version: str = "") -> Observation | None:
    """vLLM's printed figures (vllm_log.StartupFacts) next to the uncalibrated MemoryEstimate of the same plan.

    None when vLLM printed no KV figure (nothing to learn from). The residual comes from the KV tokens
    when both sides have them (engine-wide, so the tightest rank as the estimate; exact to a block, where
    the printed GiB has two decimals), else from the printed KV GiB.
    """
    if estimate is None or startup is None or getattr(estimate, "calibration", None) is not None:
        return None
    by_tokens = None
    if startup.kv_cache_tokens and estimate.kv_cache_tokens:
        by_tokens = estimate.kv_cache_gib * startup.kv_cache_tokens / estimate.kv_cache_tokens
    measured_kv = startup.available_kv_cache_gib if startup.available_kv_cache_gib is not None else by_tokens
    if measured_kv is None:
        return None
    residual = estimate.kv_cache_gib - (by_tokens if by_tokens is not None else measured_kv)
    if by_tokens is not None:  # both sides count whole blocks: lean one block toward the safe side
        residual += estimate.kv_bytes_per_token * estimate.block_size / (1 << 30)
    profile = PROFILES.get(estimate.profile)
    subtracted = profile is None or profile.cudagraph_subtracted
    estimated = Figures(weights_gib=estimate.weights_gib, activation_gib=estimate.activation_gib,
                        non_torch_gib=estimate.non_torch_gib,
                        cudagraph_gib=estimate.cudagraph_gib if subtracted else None,
                        kv_cache_gib=estimate.kv_cache_gib, kv_cache_tokens=estimate.kv_cache_tokens)
    measured = Figures(weights_gib=startup.weights_gib, activation_gib=startup.activation_peak_gib,
                       non_torch_gib=startup.non_torch_gib,
                       cudagraph_gib=startup.cudagraph_estimate_gib if subtracted else None,
                       kv_cache_gib=round(measured_kv, 3), kv_cache_tokens=startup.kv_cache_tokens)
    return Observation(at=at, session=session, model=model,
                       params={k: params[k] for k in MEMORY_KNOBS if params.get(k) is not None},
                       gpu_total_gib=estimate.total_gib, estimated=estimated, measured=measured,
                       residual_gib=round(residual, 3), tool_version=tool_version)


def key(hardware: Any, vllm_version: str | None) -> tuple[str, str]:
    """(machine fingerprint, the vLLM version the estimator plans for): what calibration data is kept under."""
    return fingerprint(hardware), resolve_version(vllm_version)[0]


def for_machine(hardware: Any, vllm_version: str | None, store: Any = None) -> tuple[Correction | None, list[str]]:
    """The correction for this machine (a HardwareSnapshot) and version, and one warning per problem met.

    Unusable data is a warning, never a failure: the estimate is then uncalibrated.
    """
    store = store if store is not None else Store()
    problems: list[str] = []
    resolve_version(vllm_version)  # a bad version is the command's own error, not a calibration warning
    try:
        correction = store.correction(*key(hardware, vllm_version))
    except InputError as err:
        correction = None
        problems.append(f"calibration not used: {err.message}")
    return correction, [*getattr(store, "problems", []), *problems]


def estimator(correction: Correction | None) -> Any:
    """memory.estimate with this correction, for the rules' estimate_fn (None: their default, uncalibrated)."""
    if correction is None:
        return None
    return partial(estimate, calibration=correction)


# ---------------------------------------------------------------------------------------------- storage


class CalibrationFile(BaseModel):
    """One (machine, vLLM version)'s observations, oldest first, as stored on disk."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    machine: str
    vllm_version: str
    gpus: list[str] = Field(default_factory=list)  # GPU names, for `calibration show`
    observations: list[Observation] = Field(default_factory=list)

    def correction(self) -> Correction | None:
        return learn(self.observations, self.machine, self.vllm_version)


def calibration_dir() -> Path:
    """calibration/ beside the sessions and the saved parameters (the user data dir, or $SMARTRUN_HOME)."""
    return smartrun_home() / "calibration"


_MACHINE = re.compile(r"^[0-9a-f]{16}$")


def check_machine(machine: str) -> str:
    """A hardware fingerprint as `hardware fingerprint` prints it (16 hex digits)."""
    if not _MACHINE.match(machine):
        raise CalibrationError(f"--machine {machine!r}: expected a 16-hex-digit hardware fingerprint "
                               "(as `calibration show` and `hardware detect` print it)")
    return machine


class Store:
    """The calibration files, one per (machine, vLLM version); corrupt files are skipped with a problem line."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or calibration_dir()
        self.problems: list[str] = []  # one line per unreadable file met by the last call

    def path(self, machine: str, vllm_version: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", vllm_version)[:60] or "unknown"
        return self.directory / f"{check_machine(machine)}-{safe}.json"

    def load(self, machine: str, vllm_version: str) -> CalibrationFile | None:
        self.problems = []
        self._check_dir()
        path = self.path(machine, vllm_version)
        if not path.exists():
            return None
        data = self._read(path)
        if data is not None and (data.machine, data.vllm_version) != (machine, vllm_version):
            self.problems.append(f"{path}: calibration for another machine/version ({data.machine}, "
                                 f"{data.vllm_version}) ignored")
            return None
        return data

    def correction(self, machine: str, vllm_version: str) -> Correction | None:
        """The correction learned for this machine and version; None without data (or with unreadable data)."""
        data = self.load(machine, vllm_version)
        return data.correction() if data is not None else None

    def add(self, machine: str, vllm_version: str, gpus: Iterable[str], observations: Iterable[Observation]) -> Path:
        """Append observations (the newest MAX_KEPT are kept) and write the file atomically; InputError if it cannot."""
        data = self.load(machine, vllm_version)
        if data is None:
            data = CalibrationFile(machine=machine, vllm_version=vllm_version, gpus=list(gpus))
        kept = [*data.observations, *observations][-MAX_KEPT:]
        data = data.model_copy(update={"observations": kept})
        path = self.path(machine, vllm_version)
        write_user_file(path, json.dumps(data.model_dump(mode="json"), indent=2) + "\n")
        return path

    def entries(self) -> list[tuple[Path, CalibrationFile]]:
        """Every readable calibration file, by name; unreadable ones go to `problems`."""
        self.problems = []
        if not self._check_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            data = self._read(path)
            if data is not None:
                found.append((path, data))
        return found

    def reset(self, machine: str | None = None, vllm_version: str | None = None) -> list[Path]:
        """Remove the calibration files that match (all when no filter), corrupt ones included when unfiltered."""
        if machine is not None:
            check_machine(machine)
        if not self._check_dir():
            return []
        removed = []
        for path in sorted(self.directory.glob("*.json")):
            data = self._read(path)
            if data is None and (machine or vllm_version):
                continue  # an unreadable file cannot be matched; a plain reset removes it
            if data is not None and ((machine and data.machine != machine)
                                     or (vllm_version and data.vllm_version != vllm_version)):
                continue
            remove_file(path, CalibrationError)
            removed.append(path)
        return removed

    def _check_dir(self) -> bool:
        if self.directory.exists() and not self.directory.is_dir():
            raise CalibrationError(f"{self.directory}: not a directory (calibration data is kept in a folder "
                                   "of that name)")
        return self.directory.is_dir()

    def _read(self, path: Path) -> CalibrationFile | None:
        try:
            return CalibrationFile.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValidationError, ValueError, RecursionError) as err:
            detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else (str(err) or type(err).__name__)
            self.problems.append(f"{path}: unreadable calibration file ignored ({detail}); "
                                 "`localaistack calibration reset` removes it")
            return None


class NoCalibration:
    """No calibration data: nothing is looked up, nothing is stored (tests that build Sources by hand)."""

    problems: list[str] = []

    def correction(self, machine: str, vllm_version: str) -> Correction | None:
        return None

    def add(self, machine: str, vllm_version: str, gpus: Iterable[str], observations: Iterable[Observation]) -> None:
        return None
