"""Files: one way to write (a temp file beside it, then os.replace: no reader ever sees half of it) and one
way to read what others wrote (regular files only, size, depth and number caps)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from smartrun.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


def atomic_write_text(path: str | Path, text: str, *, make_parents: bool = False) -> None:
    """Write `text` to `path` atomically; OSError (temp file removed) when it cannot be written.

    `make_parents` is for files under our own data dirs; a path the user typed keeps its missing
    directory an error, so a typo does not create directories.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# ---------------------------------------------------------------------------- reading what others wrote
#
# Every file smartrun reads from outside (model files, snapshots, bounds, configs, records, caches) goes
# through these: a regular file only (a FIFO, a device such as /dev/zero, a directory, a dangling or looping
# symlink is one error line, never a hang or an endless read), a size cap, and JSON/TOML parsed with a depth
# cap (RecursionError), no integer over 4300 digits and, unless asked, no Infinity/NaN.

MAX_TEXT_BYTES = 64 * 1024 * 1024  # config.json, index, snapshot, record, bounds: far above any real one
MAX_INT_DIGITS = 4300  # CPython's own limit for int <-> str; enforced on 3.10 too


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, error: type[Exception] | None = None) -> Any:
    """A binary file object for a regular file (symlinks followed); `error` (InputError) names the problem.

    Opened non-blocking first, so a FIFO without a writer cannot hang the open; checked with fstat on the
    opened descriptor, so nothing can be swapped in between the check and the read.
    """

    error = error or InputError
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file" + (" (dangling symlink)" if Path(path).is_symlink() else "")) from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int = MAX_TEXT_BYTES, error: type[Exception] | None = None) -> bytes:
    """The whole regular file, at most `limit` bytes (more is an error naming the file and the cap)."""

    error = error or InputError
    with open_regular(path, error) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as err:
            raise error(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit // (1024 * 1024)} MiB, not read")
    return data


def remove_file(path: Path, error: type[Exception] | None = None) -> None:
    """Delete a file smartrun keeps (gone already is fine); a refusal is one error naming the file."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise (error or InputError)(f"{path}: cannot remove ({err.strerror or err})") from err


def read_text(path: str | Path, limit: int = MAX_TEXT_BYTES, error: type[Exception] | None = None) -> str:
    """read_bytes decoded as UTF-8; undecodable text is an error naming the file."""

    error = error or InputError
    try:
        return read_bytes(path, limit, error).decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from None


def _int(text: str) -> int:
    digits = len(text.lstrip("+-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits (more than {MAX_INT_DIGITS})")
    return int(text)


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def loads_json(text: str | bytes, *, allow_nonfinite: bool = False) -> Any:
    """json.loads with the caps: ValueError for an integer over 4300 digits, and for Infinity/NaN/1e999 unless
    `allow_nonfinite`; json.JSONDecodeError (a ValueError) and RecursionError as json.loads raises them."""
    extra: dict[str, Any] = {} if allow_nonfinite else {"parse_constant": _no_constant, "parse_float": _finite}
    return json.loads(text, parse_int=_int, **extra)


def parse_json(text: str | bytes, where: str, error: type[Exception] | None = None, *,
               allow_nonfinite: bool = False) -> Any:
    """JSON with caps: `where: not JSON (...)` one line for bad syntax, too deep nesting, an integer over
    4300 digits, or Infinity/NaN (also 1e999) unless `allow_nonfinite` (our own records may hold them)."""

    error = error or InputError
    try:
        return loads_json(text, allow_nonfinite=allow_nonfinite)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise error(f"{where}: not JSON we accept (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:  # the caps above, and bytes that are not UTF-8
        raise error(f"{where}: not JSON we accept ({err})") from None


def parse_toml(text: str, where: str, error: type[Exception] | None = None) -> dict[str, Any]:
    """TOML with the same caps as parse_json; a syntax error keeps tomllib's `(at line N, column M)`."""

    error = error or InputError
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise error(f"{where}: TOML syntax error: {err}") from None
    except RecursionError:
        raise error(f"{where}: TOML nested too deeply") from None
    except ValueError as err:  # an integer over 4300 digits
        raise error(f"{where}: not TOML we accept ({err})") from None


def read_json(path: str | Path, error: type[Exception] | None = None, *, limit: int = MAX_TEXT_BYTES,
              allow_nonfinite: bool = False) -> Any:
    """A JSON file through read_bytes + parse_json."""
    return parse_json(read_bytes(path, limit, error), str(path), error, allow_nonfinite=allow_nonfinite)


HOME_ENV = "SMARTRUN_HOME"  # tests point this at a tmp dir so they never touch the real home


def smartrun_home() -> Path:
    """Where sessions and the cache live: $SMARTRUN_HOME, else the user's data dir for localaistack."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("localaistack"))


def write_user_file(path: str | Path, text: str) -> None:
    """The atomic writer for records, cache entries and calibration data (folders made); errors as one InputError."""
    for folder in Path(path).parents:
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"{path}: cannot write ({folder} is not a directory)")
            break
    try:
        atomic_write_text(path, text, make_parents=True)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err})") from err
