"""The --tune options of `model run`, declared once.

TUNE_OPTIONS names each option's flag and the TuneSettings field it sets; `add_arguments` makes them
argparse options, `settings_from_args` reads them back into TuneSettings (a bad value names its flag),
`given` says which were typed (they need --tune) and `command_line` writes settings back out as flags.
--tune itself is a `model run` option (smartrun.request.OPTIONS).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pydantic import ValidationError

from smartrun.errors import InputError
from smartrun.probe import PROBE_OPTIONS
from smartrun.tune.report import TuneSettings

PROBED = ("concurrency", "duration_s", "prompt_tokens", "output_tokens", "max_requests")  # --tune may set these


class TuneOption(NamedTuple):
    """One --tune option: its flag, the TuneSettings field it sets ("probe.x": a ProbeSettings field)."""

    flag: str
    field: str
    type: Callable[[str], Any] | None  # None: a switch
    metavar: str | None
    help: str  # "{default}" is the field's default

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.field.split("."))

    def value(self, settings: Mapping[str, Any]) -> Any:
        """This option's value in settings as a dict (TuneSettings.model_dump); None when absent."""
        value: Any = settings
        for part in self.path:
            value = value.get(part) if isinstance(value, Mapping) else None
        return value


TUNE_OPTIONS: tuple[TuneOption, ...] = (
    TuneOption("--tune-rounds", "rounds", int, "N", "tuning rounds after the baseline (default {default})"),
    TuneOption("--tune-min-gain", "min_gain", float, "FRACTION",
               "a step that gains less than this ends its rung (default {default:g})"),
    TuneOption("--slo-p95-ms", "slo_p95_ms", float, "MS", "keep only configurations with p95 latency <= MS"),
    # the probe's own options (probe.PROBE_OPTIONS) as --probe-*, with the tuner's defaults
    *(TuneOption(f"--probe-{option.flag[2:]}", f"probe.{option.field}", option.type, option.metavar,
                 f"each probe: {option.help}") for option in PROBE_OPTIONS if option.field in PROBED),
    TuneOption("--tune-vs-defaults", "vs_defaults", None, None,
               "also measure plain vllm serve with only your flags (one more restart), as the yardstick"),
)

_DEFAULT_VALUES = TuneSettings().model_dump(mode="json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --tune-*/--probe-* options; each defaults to None, so `given` sees what was typed."""
    for option in TUNE_OPTIONS:
        text = option.help.format(default=option.value(_DEFAULT_VALUES))
        if option.type is None:
            parser.add_argument(option.flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(option.flag, type=option.type, default=None, metavar=option.metavar, help=text)


def given(args: argparse.Namespace) -> list[str]:
    """The flags of TUNE_OPTIONS typed on the command line, in table order."""
    return [option.flag for option in TUNE_OPTIONS if getattr(args, option.dest, None) is not None]


def settings_from_args(args: argparse.Namespace) -> TuneSettings:
    """TuneSettings from the parsed options (the defaults where not typed); a bad value is an InputError
    naming its flag."""
    typed = {option: getattr(args, option.dest) for option in TUNE_OPTIONS
             if getattr(args, option.dest, None) is not None}
    values: dict[str, Any] = {"probe": dict(_DEFAULT_VALUES["probe"])}
    for option, value in typed.items():
        *parents, name = option.path
        target = values
        for part in parents:
            target = target[part]
        target[name] = value
    try:
        return TuneSettings.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"][:2])
        culprit = next((o for o in typed if o.field == where), None)
        if culprit is None:
            raise InputError(f"--tune: {first['msg'].lower()}") from None
        raise InputError(f"{culprit.flag} {typed[culprit]!r}: {first['msg'].lower()}") from None


def command_line(settings: Mapping[str, Any]) -> list[str]:
    """The flags that set `settings` (TuneSettings.model_dump, or a part of it): the options whose value
    differs from the default, in table order."""
    out: list[str] = []
    for option in TUNE_OPTIONS:
        value = option.value(settings)
        if value is None or value == option.value(_DEFAULT_VALUES):
            continue
        out += [option.flag] if option.type is None else [option.flag, str(value)]
    return out
