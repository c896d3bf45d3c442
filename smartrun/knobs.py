"""The knob catalogue: every vLLM flag smartrun may set, declared once.

Argv building, validation, prompts, bounds files and --explain all read this one table; argv is read
back by the one tokenizer (smartrun.argv), and secret values are the values of `secret` knobs
(smartrun.secrets).

Who may change what:
- `llm_may_change=True`: the tuning knobs. The rules set them, the LLM may move them inside the bounds.
- `llm_may_change=False`: passed through from the user only (served model name, quantization, ...).
- `security=True`: also user only, and flagged because they open the server up or make vLLM read
  files / import code (host, port, api key, trust-remote-code, chat template, tokenizer, worker and
  middleware classes, local media path, generation config, download dir, SSL files).
Any flag not in the catalogue is user only too: it goes to passthrough, untouched, in order.

Argv policy (`build_argv`): numeric, choice and string knobs are always emitted when they have a
value (explicit beats vLLM's version-dependent defaults); a boolean is emitted as its positive
flag when True, and as its negative flag when False only if vLLM's default is not False
(e.g. `--disable-prefix-caching`); `--no-enforce-eager` would be noise and is left out.
max_model_len -1 (auto-fit) is written as `auto`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from smartrun.errors import InputError
from smartrun.frozen import Frozen

KnobType = Literal["int", "float", "bool", "choice", "str"]

DTYPE_SYNONYMS = {"half": "float16", "float": "float32"}
KV_CACHE_DTYPES = (
    "auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc",
    "fp8_per_token_head", "int4_per_token_head", "int8_per_token_head", "nvfp4", "nvfp4_4over6",
    "nvfp4_ds_mla", "octave_k3v3", "octave_k3v3_compact", "octave_k3v4", "turboquant_3bit_nc",
    "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4", "ultraquant_4bit",
)  # fmt: skip
AUTO_MAX_MODEL_LEN = -1  # `--max-model-len auto` / `-1`: vLLM auto-fits the context


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
    # Added by the bounds helper:
    negative_flags: tuple[str, ...] = ()  # booleans: the flags that set False, first is canonical
    human_int: bool = False  # accepts 32k / 32K / 25.6k like vLLM's human_readable_int
    special: tuple[Any, ...] = ()  # values outside min/max that vLLM accepts (max_model_len -1 = auto)
    synonyms: dict[str, str] = {}  # choice spellings vLLM treats as equal ("half" -> "float16")
    nargs: Literal["one", "+", "?", "append"] = "one"  # "+": --x a b; "?": --x [a] (alone: True);
    # "append": --x a --x b (value is a tuple)
    secret: bool = False  # its value never appears in bounds, notes, messages or records
    vllm_flag: bool = True  # False: smartrun's own planning knob (bounds files may bound it), never in argv

    def domain_text(self) -> str:
        """vLLM's domain in words, for messages."""
        if self.type == "bool":
            return "true or false"
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        lo = "" if self.min is None else f"{self.min} {'<' if self.min_exclusive else '<='} "
        hi = "" if self.max is None else f" <= {self.max}"
        return f"{lo}x{hi}" if lo or hi else self.type

    def in_domain(self, value: Any) -> bool:
        """Whether vLLM itself accepts this (already typed) value."""
        if value in self.special:
            return True
        if self.choices is not None:
            return value in self.choices
        if self.type in ("int", "float"):
            if self.min is not None and (value < self.min or (self.min_exclusive and value == self.min)):
                return False
            return not (self.max is not None and value > self.max)
        return True


def _k(**kw: Any) -> Knob:
    return Knob(**kw)


_TUNING = [
    _k(name="max_model_len", flag="--max-model-len", aliases=("--vllm-max-model-len",), type="int", min=1,
       special=(AUTO_MAX_MODEL_LEN,), human_int=True, llm_may_change=True,
       help="context length (prompt + output) per request; auto or -1 lets vLLM fit it"),
    _k(name="gpu_memory_utilization", flag="--gpu-memory-utilization",
       aliases=("--device-memory-utilization", "--vllm-gpu-memory-utilization"), type="float", min=0.0, max=1.0,
       min_exclusive=True,
       default=0.92, llm_may_change=True, help="fraction of each GPU's total memory vLLM may use"),
    _k(name="tensor_parallel_size", flag="--tensor-parallel-size", aliases=("-tp",), type="int", min=1,
       default=1, llm_may_change=True, help="GPUs that split every layer"),
    _k(name="pipeline_parallel_size", flag="--pipeline-parallel-size", aliases=("-pp",), type="int", min=1,
       default=1, llm_may_change=True, help="GPUs that split the layer stack"),
    _k(name="data_parallel_size", flag="--data-parallel-size", aliases=("-dp",), type="int", min=1, default=1,
       llm_may_change=True, help="independent replicas of the model (each tp x pp GPUs), one API server"),
    _k(name="max_num_seqs", flag="--max-num-seqs", type="int", min=1, llm_may_change=True,
       help="requests batched at once (vLLM default depends on the GPU)"),
    _k(name="max_num_batched_tokens", flag="--max-num-batched-tokens", type="int", min=1, human_int=True,
       llm_may_change=True, help="tokens per scheduler step; sizes the profiling pass and activations"),
    _k(name="dtype", flag="--dtype", type="choice",
       choices=("auto", "bfloat16", "float16", "float32"), synonyms=DTYPE_SYNONYMS, default="auto",
       llm_may_change=True, help="weights and activations dtype; bfloat16 needs compute capability 8.0"),
    _k(name="kv_cache_dtype", flag="--kv-cache-dtype", type="choice", choices=KV_CACHE_DTYPES,
       default="auto", llm_may_change=True, help="KV cache storage dtype; fp8 halves KV memory"),
    _k(name="enforce_eager", flag="--enforce-eager", negative_flags=("--no-enforce-eager",), type="bool",
       default=False, llm_may_change=True, help="no torch.compile, no CUDA graphs: less memory, slower decode"),
    _k(name="optimization_level", flag="--optimization-level", aliases=("-O",), type="int", min=0, max=3,
       default=2, llm_may_change=True, help="0 starts fastest, 2 (default) runs fastest"),
    _k(name="disable_custom_all_reduce", flag="--disable-custom-all-reduce",
       negative_flags=("--enable-custom-all-reduce",), type="bool", default=False, llm_may_change=True,
       help="use NCCL instead of vLLM's all-reduce kernel (tp > 1 without NVLink)"),
    _k(name="enable_prefix_caching", flag="--enable-prefix-caching",
       negative_flags=("--disable-prefix-caching", "--no-enable-prefix-caching"), type="bool",
       llm_may_change=True, help="reuse KV of shared prompt prefixes (vLLM default: on)"),
    _k(name="cpu_offload_gb", flag="--cpu-offload-gb", type="float", min=0.0, default=0.0, llm_may_change=True,
       help="GiB of weights per GPU kept in CPU memory: fits bigger models, much slower"),
    _k(name="enable_chunked_prefill", flag="--enable-chunked-prefill",
       negative_flags=("--disable-chunked-prefill", "--no-enable-chunked-prefill"), type="bool",
       llm_may_change=True, help="split long prompts across steps (vLLM default: on)"),
]

_USER_ONLY = [
    _k(name="host", flag="--host", type="str", security=True, help="address the server listens on"),
    _k(name="port", flag="--port", type="int", min=0, max=65535, default=8000, security=True,
       help="port the server listens on"),
    _k(name="api_key", flag="--api-key", type="str", nargs="+", security=True, secret=True, help="keys clients must send"),
    _k(name="hf_token", flag="--hf-token", type="str", nargs="?", security=True, secret=True,
       help="Hugging Face token for downloads (alone: the one saved by `hf auth login`)"),
    _k(name="trust_remote_code", flag="--trust-remote-code", aliases=("--vllm-trust-remote-code",),
       negative_flags=("--no-trust-remote-code",),
       type="bool", default=False, security=True, help="run Python code shipped with the model"),
    _k(name="served_model_name", flag="--served-model-name", type="str", nargs="+",
       help="model name(s) in the API"),
    _k(name="download_dir", flag="--download-dir", type="str", security=True, help="where weights are written"),
    _k(name="chat_template", flag="--chat-template", type="str", security=True,
       help="chat template file or text (rendered by the server)"),
    _k(name="tokenizer", flag="--tokenizer", type="str", security=True,
       help="tokenizer repo or path (may carry code with trust-remote-code)"),
    _k(name="tokenizer_mode", flag="--tokenizer-mode", type="str", help="tokenizer implementation"),
    _k(name="allowed_local_media_path", flag="--allowed-local-media-path", type="str", security=True,
       help="lets API requests read local files"),
    _k(name="generation_config", flag="--generation-config", type="str", security=True,
       help="folder the generation config is read from"),
    _k(name="worker_cls", flag="--worker-cls", type="str", security=True, help="imports a Python class"),
    _k(name="worker_extension_cls", flag="--worker-extension-cls", type="str", security=True,
       help="imports a Python class"),
    _k(name="middleware", flag="--middleware", type="str", nargs="append", security=True,
       help="imports ASGI middleware"),
    _k(name="logits_processors", flag="--logits-processors", type="str", nargs="+", security=True,
       help="imports logits processor classes"),
    _k(name="tool_parser_plugin", flag="--tool-parser-plugin", type="str", security=True,
       help="loads a Python file"),
    _k(name="ssl_keyfile", flag="--ssl-keyfile", type="str", security=True, help="TLS key file"),
    _k(name="ssl_certfile", flag="--ssl-certfile", type="str", security=True, help="TLS certificate file"),
    _k(name="distributed_executor_backend", flag="--distributed-executor-backend", type="choice",
       choices=("external_launcher", "mp", "ray", "uni"),
       help="how workers start: ray for a plan across nodes (set by the cluster rules), else vLLM's choice"),
    _k(name="nodes", flag="--nodes", type="int", min=1, vllm_flag=False,
       help="cluster nodes a plan may use (smartrun's own: bound it in a bounds file; not a vLLM flag)"),
    _k(name="data_parallel_backend", flag="--data-parallel-backend", aliases=("-dpb",), type="choice",
       choices=("mp", "ray"), help="how data-parallel replicas start: ray for replicas on several nodes"),
    _k(name="quantization", flag="--quantization", aliases=("-q",), type="str",
       help="quantization method (default: from the model's config)"),
]

CATALOGUE: dict[str, Knob] = {k.name: k for k in _TUNING + _USER_ONLY}

# LocalAIStack's `model run` flags for vLLM (its README "vLLM parameters" and internal/cli/commands/commands.go):
# aliases above, read by the one tokenizer like any vLLM spelling, so they are pins; argv uses vLLM's own flag.
LOCALAISTACK_ALIASES: dict[str, str] = {alias: k.flag for k in CATALOGUE.values() for alias in k.aliases
                                        if alias.startswith("--vllm-")}
# LocalAIStack flags of its llama.cpp path (or its own) that have a vLLM counterpart: named when refused.
LOCALAISTACK_HINTS: dict[str, str] = {
    "--ctx-size": "--max-model-len",
    "--text-only": "--limit-mm-per-prompt '{\"image\":0,\"video\":0}' --skip-mm-profiling",
}
TUNING_KNOBS: tuple[str, ...] = tuple(k.name for k in _TUNING)
REDACTED = "***REDACTED***"  # shown in place of a secret knob's value (smartrun.secrets hides them)


def knob(name: str) -> Knob:
    """The catalogue entry; InputError for an unknown name."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise InputError(f"unknown knob {name!r}") from None


def flag_of(name: str) -> str:
    return knob(name).flag


_HUMAN = re.compile(r"^(\d+(?:\.\d+)?)([kmgtKMGT]?)$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _human_int(text: str) -> int | None:
    """vLLM's human_readable_int: k/m/g/t decimal, K/M/G/T binary (no decimals with binary)."""
    m = _HUMAN.match(text)
    if not m:
        return None
    number, suffix = m.groups()
    if not suffix:
        return int(number) if "." not in number else None
    if suffix.isupper() and "." in number:
        return None
    power = "kmgt".index(suffix.lower()) + 1
    value = float(number) * ((1024 if suffix.isupper() else 1000) ** power)
    return int(value) if value == int(value) else None


def parse_value(k: Knob, text: str, flag: str | None = None) -> Any:
    """Type one value the way vLLM's parser would; InputError names the flag and the value."""
    flag = flag or k.flag
    value: Any = None
    if k.type == "int":
        if k.name == "max_model_len" and text.strip().lower() in ("auto", "-1"):
            return AUTO_MAX_MODEL_LEN
        value = int(text) if _INT.match(text) else (_human_int(text) if k.human_int else None)
        if value is None:
            raise InputError(f"{flag}: {text!r} is not an integer")
    elif k.type == "float":
        if not _FLOAT.match(text):
            raise InputError(f"{flag}: {text!r} is not a number")
        value = float(text)
    elif k.type == "choice":
        value = k.synonyms.get(text, text)
        if value not in (k.choices or ()):
            raise InputError(f"{flag}: {text!r} is not {k.domain_text()}")
    else:
        value = text
    if not k.in_domain(value):
        raise InputError(f"{flag}: {text} is outside vLLM's domain {k.domain_text()}")
    return value


def _argv_for(k: Knob, value: Any) -> list[str]:
    if value is None:
        return []
    if k.type == "bool":
        if value:
            return [k.flag]
        return [k.negative_flags[0]] if k.default is not False and k.negative_flags else []
    if k.name == "max_model_len" and value == AUTO_MAX_MODEL_LEN:
        return [k.flag, "auto"]
    if k.nargs == "+":
        return [k.flag, *map(str, value)]
    if k.nargs == "?" and value is True:
        return [k.flag]
    if k.nargs == "append":
        return [part for v in value for part in (k.flag, str(v))]
    if isinstance(value, float):
        return [k.flag, format_float(value)]
    return [k.flag, str(value)]


def format_float(value: float) -> str:
    """Shortest text that reads back as the same float (0.9, not 0.9000000000000001)."""
    text = repr(float(value))
    return text if math.isfinite(value) else str(value)


def pin_text(name: str, value: Any) -> str:
    """How a pin reads on the command line ("--enforce-eager", "--max-model-len 8192"), for messages."""
    k = knob(name)
    if k.secret:
        return f"{k.flag} {REDACTED}"
    if k.type == "bool" and k.negative_flags:
        return k.flag if value else k.negative_flags[0]
    return " ".join(_argv_for(knob(name), value)) or f"{knob(name).flag} {value}"


def build_argv(model_path: str, params: dict[str, Any], passthrough: tuple[str, ...] = ()) -> list[str]:
    """`["vllm", "serve", model_path, ...]`: catalogue order, canonical flags, then passthrough as typed.

    Booleans: the positive flag when True; the negative flag when False only where vLLM's default
    is not False. Unknown keys in `params` are an InputError (a plan holds catalogue knobs only).
    """
    argv = ["vllm", "serve", model_path]
    unknown = sorted(set(params) - set(CATALOGUE))
    if unknown:
        raise InputError(f"cannot build vllm argv: unknown knob(s) {unknown}")
    for name, k in CATALOGUE.items():
        if name in params and k.vllm_flag:
            argv += _argv_for(k, params[name])
    return argv + list(passthrough)
