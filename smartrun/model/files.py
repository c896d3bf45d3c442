"""Where a model is (a directory or the HF cache) and what its files say: config.json, safetensors headers."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from smartrun import fileio
from smartrun.errors import ModelError
from smartrun.frozen import Frozen
from smartrun.model.facts import ModelFacts, facts_from_config

# --- locating the model ------------------------------------------------------------------------------


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache dir: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _cached_snapshot(repo_id: str, hub: Path) -> Path | None:
    """snapshots/<rev> of a cached repo: the revision refs/main names, else the newest snapshot."""
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        try:
            revision = fileio.read_text(ref, 4096, ModelError).strip()
        except ModelError:
            revision = ""
        candidate = snapshots / revision
        if revision and _inside(revision) and candidate.is_dir():
            return candidate
    if not snapshots.is_dir():
        return None
    revisions = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(revisions, key=lambda p: p.stat().st_mtime) if revisions else None


def resolve_model_dir(model: str) -> Path:
    """A local dir, or a HF repo id found in the local HF cache (HF_HUB_CACHE / HF_HOME). Never downloads."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.absolute()
    hub = hf_hub_cache()
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")):
        found = _cached_snapshot(model, hub)
        if found is not None:
            return found
    raise ModelError(f"model '{model}' not found: not a directory and not in the Hugging Face cache at {hub}")


# --- reading files -----------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_WEIGHT_BYTES = 1 << 60  # an index claiming more (an exabyte) is broken or hostile
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _read_json(path: Path) -> Any:
    """A JSON file of the model: regular file, size-capped; no Infinity/NaN, no 4300-digit integers."""
    data = fileio.read_bytes(path, error=ModelError)
    try:
        return fileio.loads_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ModelError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict; ModelError naming the file when missing, not JSON or not an object."""
    path = model_dir / "config.json"
    if path.exists() and not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    if not path.is_file():
        raise ModelError(f"{path}: config.json not found in model directory {model_dir}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class TensorTotals(Frozen):
    """What one safetensors header says: stored bytes and element count over all its tensors."""

    bytes: int
    elements: int
    tensors: int


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; reads 8 + header bytes only (tensor data may be absent)."""
    with fileio.open_regular(path, ModelError) as fh:  # a FIFO, directory or dangling link: one error line
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"corrupt safetensors header in {path}: file is {size} bytes, shorter than 8")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ModelError(f"corrupt safetensors header in {path}: header length {length} exceeds 100 MiB")
        if 8 + length > size:
            raise ModelError(
                f"corrupt safetensors header in {path}: header length {length} runs past the file end ({size} bytes)"
            )
        raw = fh.read(length)
    try:
        header = fileio.loads_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"corrupt safetensors header in {path}: header is not JSON ({err})") from None
    except RecursionError:
        raise ModelError(f"corrupt safetensors header in {path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ModelError(f"corrupt safetensors header in {path}: header is not a JSON object")
    return header


def tensor_totals(header: dict[str, Any], path: Path) -> TensorTotals:
    """Sum tensor byte sizes (data_offsets) and element counts (shape) of a safetensors header.

    Element counts are of stored tensors: packed int4 weights (qweight I32) count 8 weights as one.
    """
    total_bytes = total_elems = count = 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"corrupt safetensors header in {path}: tensor '{tensor}' lacks dtype/shape/data_offsets") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ModelError(f"corrupt safetensors header in {path}: tensor '{tensor}' has bad data_offsets {info['data_offsets']}")
        elems = math.prod(shape)
        width = DTYPE_BYTES.get(dtype)
        if width is not None and elems * width != end - start:
            raise ModelError(
                f"corrupt safetensors header in {path}: tensor '{tensor}' {dtype}{shape} needs {elems * width} bytes, offsets give {end - start}"
            )
        total_bytes += end - start
        total_elems += elems
        count += 1
    return TensorTotals(bytes=total_bytes, elements=total_elems, tensors=count)


def _weight_facts(model_dir: Path) -> dict[str, Any]:
    """weight_bytes / source / param count / files from the index or the headers; {} when no weights."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map", {}), dict):
            raise ModelError(f"{index_path}: expected a JSON object with a 'weight_map' object")
        files = tuple(sorted(set(map(str, index.get("weight_map", {}).values()))))
        for name in files:  # "../../etc/passwd" or "/etc/passwd" would read outside the model directory
            if not _inside(name):
                raise ModelError(f"{index_path}: weight_map names {name!r}, outside the model directory")
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ModelError(f"{index_path}: 'metadata' must be a JSON object, got {type(meta).__name__}")
        total = meta.get("total_size")
        if isinstance(total, bool) or (isinstance(total, int | float) and not 0 <= total <= MAX_WEIGHT_BYTES):
            raise ModelError(f"{index_path}: metadata.total_size {_short(total)} is not a plausible size in bytes")
        if isinstance(total, int | float) and total > 0:
            params = meta.get("total_parameters")
            return {"weight_bytes": int(total), "weight_bytes_source": "safetensors-index",
                    "weight_param_count": int(params) if isinstance(params, int) else None, "weight_files": files}
        shard_paths = [model_dir / f for f in files if (model_dir / f).is_file()]
        if not shard_paths:
            raise ModelError(f"{index_path}: no metadata.total_size and none of its shard files are present")
    else:
        shard_paths = sorted(model_dir.glob("*.safetensors"))
        hf_style = [p for p in shard_paths if not p.name.startswith("consolidated")]
        shard_paths = hf_style or shard_paths  # vLLM prefers the HF shards over Mistral's consolidated file
    if not shard_paths:
        return {}
    totals = [tensor_totals(read_safetensors_header(p), p) for p in shard_paths]
    return {"weight_bytes": sum(t.bytes for t in totals), "weight_bytes_source": "safetensors-headers",
            "weight_param_count": sum(t.elements for t in totals),
            "weight_files": tuple(p.name for p in shard_paths)}


def _optional_json(path: Path) -> dict[str, Any] | None:
    """A side file (tokenizer_config.json, hf_quant_config.json): None when absent or unusable (a FIFO too)."""
    if not path.is_file():
        return None
    try:
        value = fileio.read_json(path, ModelError)
    except ModelError:
        return None
    return value if isinstance(value, dict) else None


def _inside(name: str) -> bool:
    """A weight file name from an index stays inside the model directory: relative, no `..`, no drive."""

    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts \
        and not PureWindowsPath(name).drive and "\\" not in name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _model_name(model: str, model_dir: Path) -> str:
    local = Path(model).expanduser()
    return model_dir.name if local.is_dir() else model


def inspect(model: str) -> ModelFacts:
    """Read the model at `model` (path or cached repo id). ModelError names the file and the problem."""
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    tokenizer = _optional_json(model_dir / "tokenizer_config.json") or {}
    tok_len = tokenizer.get("model_max_length")
    tok_len = int(tok_len) if isinstance(tok_len, int) and not isinstance(tok_len, bool) else None
    try:
        facts = facts_from_config(
            config, _model_name(model, model_dir), str(model_dir), tokenizer_max_length=tok_len,
            hf_quant_config=_optional_json(model_dir / "hf_quant_config.json"),
        )
    except ModelError as err:
        raise ModelError(f"{model_dir / 'config.json'}: {err.message.removeprefix('config.json: ')}") from None
    weights = _weight_facts(model_dir)
    return facts.model_copy(update=weights) if weights else facts
