"""The saved-parameters cache: a plan that started healthy, kept per model, machine, bounds file, vLLM
version and goal, so the next `--smart-run` with the same key starts from it (after re-validation).

One JSON file per key under `<data dir>/smart-run-cache/`; a corrupt entry is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smartrun import fileio
from smartrun.errors import InputError
from smartrun.fileio import smartrun_home, write_user_file

CACHE_SCHEMA_VERSION = 1


def cache_dir() -> Path:
    return smartrun_home() / "smart-run-cache"



class CacheKey(BaseModel):
    """What a saved plan depends on: the model, the machine, the bounds file and the vLLM version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    hardware_fingerprint: str
    bounds_sha256: str
    vllm_version: str | None = None
    goal: str = "stable"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:24]


class CacheEntry(BaseModel):
    """A plan that started healthy, saved for next time (re-validated against today's bounds before use)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = CACHE_SCHEMA_VERSION
    key: CacheKey
    model_path: str | None = None
    params: dict[str, Any]
    provenance: dict[str, str] = Field(default_factory=dict)
    source: str = "static"  # where the saved plan came from originally
    saved_at: str
    session: str | None = None


class SavedParams:
    """The saved-parameters cache: one JSON file per key under cache_dir(); corrupt entries are skipped."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or cache_dir()
        self.problems: list[str] = []  # corrupt entries found by the last lookup/list, one line each

    def _path(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest()}.json"

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        self.problems = []
        path = self._path(key)
        if not path.exists():
            return None
        entry = self._read(path)
        return entry if entry is not None and entry.key == key else None

    def store(self, entry: CacheEntry) -> Path:
        path = self._path(entry.key)
        write_user_file(path, json.dumps(entry.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    def entries(self, model: str | None = None) -> list[tuple[Path, CacheEntry]]:
        self.problems = []
        if self.directory.exists() and not self.directory.is_dir():
            self.problems.append(f"{self.directory}: not a directory, so no parameters can be saved there")
            return []
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            entry = self._read(path)
            if entry is not None and (model is None or _model_matches(entry, model)):
                found.append((path, entry))
        return found

    def remove(self, model: str) -> list[Path]:
        removed = []
        for path, _entry in self.entries(model):
            fileio.remove_file(path)
            removed.append(path)
        return removed

    def _read(self, path: Path) -> CacheEntry | None:
        try:
            return CacheEntry.model_validate(fileio.loads_json(fileio.read_bytes(path, 1 << 20)))
        except (OSError, UnicodeDecodeError, ValidationError, ValueError, RecursionError, InputError) as err:
            detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            self.problems.append(f"{path}: corrupt smart-run cache entry skipped ({detail})")
            return None


def _model_matches(entry: CacheEntry, model: str) -> bool:
    candidates = {entry.key.model, entry.model_path or ""}
    if model in candidates:
        return True
    try:
        resolved = str(Path(model).expanduser().resolve())
    except OSError:
        return False
    return resolved == entry.model_path or Path(model.rstrip("/")).name == entry.key.model
