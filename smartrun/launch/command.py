"""The command line of a launch: flags adapted to the installed vLLM, GPU environment, served name and endpoint."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from smartrun import argv as argv_mod
from smartrun.argv import last, tokenize
from smartrun.contracts import gpus_used
from smartrun.errors import InputError
from smartrun.gpus import select_gpus
from smartrun.hardware import HardwareSnapshot, physical_index
from smartrun.launch.vllm import VllmInfo, _version_tuple
from smartrun.secrets import launch_env_secrets, redact_argv, redact_env, redact_text, secret_values


def _translate(flag: str, value: str | None, info: VllmInfo) -> tuple[list[str] | None, str]:
    """Tokens replacing a flag this vllm does not know (None = drop), and the warning to print."""
    ver = info.version or "?"
    if flag in ("--optimization-level", "-O"):
        if value == "0" and "--enforce-eager" in info.flags:
            return ["--enforce-eager"], f"vllm {ver} has no --optimization-level: -O0 translated to --enforce-eager"
        return None, f"vllm {ver} has no --optimization-level (before 0.12 -O meant --compilation-config): dropped"
    shown = f"{flag} {value}" if value is not None else flag
    if flag == "--swap-space":
        return None, f"vllm {ver} does not accept {shown} (removed in 0.18): dropped"
    pairs = [("--no-enable-", "--disable-"), ("--disable-", "--no-enable-"), ("--enable-", "--"),
             ("--no-", "--disable-")]
    for old, new in pairs:
        if flag.startswith(old) and (alt := new + flag[len(old):]) in info.flags:
            return [alt], f"vllm {ver} does not know {flag}: translated to {alt}"
    return None, f"vllm {ver} does not accept {shown}: dropped"


def adapt_argv(argv: Sequence[str], info: VllmInfo) -> tuple[list[str], list[str]]:
    """The argv this vllm accepts: unknown flags dropped or translated, each with a warning naming it."""

    if not info.flags:
        return list(argv), [f"could not read the flags of {info.path} (serve --help): argv passed unchanged"]
    out: list[str] = []
    warnings: list[str] = []
    for token in tokenize(argv, info.arity_of):
        flag = token.flag
        if flag is None or (token.dotted is not None and flag in info.flags):  # -cc.cudagraph_mode=NONE
            out += token.raw
            continue
        if flag == "-O":  # before 0.12, -O meant --compilation-config: same spelling, other meaning
            known = _version_tuple(info.version) >= (0, 12) if info.version else "--optimization-level" in info.flags
        else:
            known = flag in info.flags
        if known:
            out += token.raw
            continue
        replacement, warning = _translate(flag, token.values[0] if token.values else None, info)
        warnings.append(warning)
        if replacement:
            out += replacement
    return out, warnings


def gpu_env(hardware: HardwareSnapshot | None, params: dict[str, Any],
            ray_address: str | None = None) -> tuple[dict[str, str], list[str]]:
    """CUDA_VISIBLE_DEVICES for tp*pp*dp GPUs chosen by gpus.select_gpus, in NVML's (PCI) order; on a Ray cluster
    RAY_ADDRESS instead (Ray gives every worker its GPU on its own node).

    The indices are nvidia-smi's (a snapshot restricted by --gpus / CUDA_VISIBLE_DEVICES maps its GPUs back),
    and CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA number them the same way, so vLLM's cuda:0.. are exactly these.
    """
    if ray_address:
        return {"RAY_ADDRESS": ray_address}, []
    if hardware is None or not hardware.gpus:
        return {}, []

    count = gpus_used(params)
    chosen = select_gpus(hardware, count)
    indices = ",".join(str(physical_index(hardware, g.index)) for g in chosen)
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": indices}
    warnings = []
    if hardware.source != "nvml":
        warnings.append(f"the plan was made for the machine in the snapshot {hardware.source}; "
                        f"CUDA_VISIBLE_DEVICES={indices} comes from its GPU indices")
    return env, warnings


def command_line(argv: Sequence[str], env_changes: dict[str, str] | None = None) -> str:
    """The shell line to rerun this launch by hand: env prefix, then the quoted argv."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted((env_changes or {}).items())]
    return " ".join([*prefix, shlex.join(list(argv))])


def shown_command_line(argv: Sequence[str], env_changes: dict[str, str] | None = None) -> str:
    """command_line for printing, events and records: secret flag values and credential env vars hidden."""

    secrets = launch_secrets(argv, env_changes)
    return redact_text(command_line(redact_argv(argv, secrets), redact_env(env_changes or {}, secrets)), secrets)


def launch_secrets(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The secrets of one launch: secret flag values in argv and credentials in the child's environment."""

    return tuple(dict.fromkeys((*secret_values(argv), *launch_env_secrets(env))))


def served_name(argv: Sequence[str]) -> str | None:
    """The first --served-model-name in argv: the name vLLM serves (and /v1/models lists) the model under."""

    names = argv_mod.values_of(argv, "served_model_name")
    return str(names[0]) if names else None


def endpoint(argv: Sequence[str], host: str | None = None, port: int | None = None) -> tuple[str, int, str | None]:
    """(host, port, first API key) vllm will serve with: the last --host/--port/--api-key in any spelling,
    else the given defaults (vLLM's port 8000) and VLLM_API_KEY."""

    tokens = tokenize(argv)
    found = {name: (tok.values if tok is not None else ()) for name in ("host", "port", "api_key")
             for tok in [last(tokens, name)]}
    host_text = found["host"][0] if found["host"] else (host or "127.0.0.1")
    try:
        port_number = int(found["port"][0]) if found["port"] else int(port or 8000)
    except ValueError:
        raise InputError(f"--port {found['port'][0]!r}: not a TCP port") from None
    key = found["api_key"][0] if found["api_key"] else None
    return host_text, port_number, key
