"""The one argv tokenizer and the one secrets layer: every spelling vLLM accepts, read one way; secrets hidden
in argv, text and JSON in linear time. Property tests (hypothesis) where the claim is "for any input"."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from smartrun import argv as argv_mod
from smartrun import launch, tune
from smartrun.argv import parse_user_args
from smartrun.knobs import CATALOGUE, REDACTED
from smartrun.secrets import (
    cap_line,
    redact_argv,
    redact_env,
    redact_text,
    redact_tree,
    secret_values,
)

KEY1, KEY2 = "sk-served-K1-4f1c9a7e", "served-K2-9b3d77aa21"
HF = "hf_TOKENvalue123456789"

items = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@given(st.lists(items, max_size=12))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_tokens_cover_argv_exactly_in_order(argv):
    tokens = argv_mod.tokenize(argv)
    assert argv_mod.rebuild(tokens) == argv
    assert [t.start for t in tokens] == sorted(t.start for t in tokens)
    assert all(t.raw == tuple(argv[t.start:t.end]) for t in tokens)


@pytest.mark.parametrize(
    ("argv", "flag", "values", "inline"),
    [
        (["--api-key", KEY1, KEY2], "--api-key", (KEY1, KEY2), False),
        (["--api_key", KEY1], "--api-key", (KEY1,), False),
        ([f"--api_key={KEY1}"], "--api-key", (KEY1,), True),
        (["-O3"], "-O", ("3",), True),
        (["-O=1"], "-O", ("1",), True),
        (["-O", "0"], "-O", ("0",), False),
        (["-tp=4"], "-tp", ("4",), True),
        (["--max-model-len", "-1"], "--max-model-len", ("-1",), False),
        (["--hf-token"], "--hf-token", (), False),
        (["--hf_token", HF], "--hf-token", (HF,), False),
        (["-cc.cudagraph_mode=NONE"], "-cc", ("NONE",), True),
        (["--compilation_config.cudagraph_mode", "NONE"], "--compilation-config", ("NONE",), False),
    ],
)
def test_each_spelling_vllm_accepts(argv, flag, values, inline):
    (token,) = argv_mod.tokenize(argv)
    assert (token.flag, token.values, token.inline) == (flag, values, inline)


def test_negative_flags_nargs_and_the_double_dash():
    tokens = argv_mod.tokenize(["--no-disable-custom-all-reduce", "--served-model-name", "a", "b", "--seed", "3",
                                "--", "--api-key", "x"])
    assert tokens[0].knob.name == "disable_custom_all_reduce" and tokens[0].negative
    assert tokens[1].values == ("a", "b") and tokens[2].flag == "--seed" and tokens[2].values == ("3",)
    assert [t.flag for t in tokens[3:]] == [None, None, None]  # after `--` everything is positional
    assert parse_user_args(["--no-disable-custom-all-reduce"]).pins == {"disable_custom_all_reduce": False}


def test_the_installed_vllms_arity_decides_unknown_flags():
    info = launch.VllmInfo(path="v", version="0.33.0", flags={"--lora-modules": True, "--disable-log-stats": False},
                           arity={"--lora-modules": "+"})
    tokens = argv_mod.tokenize(["--lora-modules", "a=1", "b=2", "--disable-log-stats"], info.arity_of)
    assert tokens[0].values == ("a=1", "b=2") and tokens[1].values == ()
    help_text = "options:\n  --api-key API_KEY [API_KEY ...]\n  --hf-token [HF_TOKEN]\n  --seed SEED\n  --x, -X\n"
    assert launch.parse_help_arity(help_text) == {"--api-key": "+", "--hf-token": "?", "--seed": "1", "--x": "0",
                                                  "-X": "0"}


def test_endpoint_and_key_discovery_read_every_spelling():
    assert launch.endpoint(["vllm", "serve", "m", "--host=0.0.0.0", "--port", "9", "--port=10"]) == \
        ("0.0.0.0", 10, None)
    assert launch.endpoint(["vllm", "serve", "m", f"--api_key={KEY1}"])[2] == KEY1
    assert launch.endpoint(["vllm", "serve", "m", "--api-key", KEY1, KEY2], "h", 5) == ("h", 5, KEY1)
    assert tune.api_key_of(("--host", "x", "--api_key", KEY2, KEY1)) == KEY2
    assert argv_mod.with_defaults(["--port=9"], {"host": "127.0.0.1", "port": 8000}) == \
        ["--port=9", "--host", "127.0.0.1"]


def test_adapt_argv_keeps_all_values_of_a_multi_value_flag():
    info = launch.VllmInfo(path="v", version="0.33.0", flags={"--api-key": True, "--port": True},
                           arity={"--api-key": "+"})
    out, warnings = launch.adapt_argv(["vllm", "serve", "/m", "--api_key", KEY1, KEY2, "--port", "1"], info)
    assert out == ["vllm", "serve", "/m", "--api_key", KEY1, KEY2, "--port", "1"] and warnings == []


# ---------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "argv",
    [
        ["--api-key", KEY1, KEY2],  # vLLM takes several keys: the second leaked
        [f"--api_key={KEY1}", "--x", KEY2],
        ["--api_key", KEY1, KEY2, "--port", "1"],
        [f"--api-key={KEY1}", "--api-key", KEY2],
        ["--hf-token", KEY1, "--api-key", KEY2],
        ["--hf_token=" + KEY1, "--my-token", KEY2],  # an unknown flag named like a credential too
    ],
)
def test_every_secret_flag_spelling_is_found_and_redacted(argv):
    found = secret_values(argv)
    assert KEY1 in found and (KEY2 in found or "--x" in argv)
    shown = " ".join(redact_argv(["vllm", "serve", "m", *argv]))
    assert KEY1 not in shown and (KEY2 not in shown or "--x" in argv) and REDACTED in shown


def test_redact_argv_keeps_the_shape():
    assert redact_argv(["--api_key", KEY1, KEY2, "--port", "8000", f"--api-key={KEY1}", "--hf-token"]) == \
        ["--api_key", REDACTED, REDACTED, "--port", "8000", f"--api-key={REDACTED}", "--hf-token"]


secret_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~", min_size=4,
                      max_size=40)
spelling = st.sampled_from(["--api-key {}", "--api_key {}", "--api-key={}", "--api_key={}", "--hf-token {}",
                            "--hf_token={}"])


@given(st.lists(st.tuples(spelling, st.lists(secret_text, min_size=1, max_size=3)), min_size=1, max_size=4),
       st.lists(st.sampled_from(["--port", "8000", "--enforce-eager", "--seed", "1", "-O3"]), max_size=4))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_no_spelling_or_count_of_secret_values_survives_redaction(parts, noise):
    argv, secrets = list(noise), []
    for form, values in parts:
        if "=" in form or form.startswith("--hf"):  # --hf-token takes at most one value
            values = values[:1]
        if "=" in form:
            argv.append(form.format(values[0]))
        else:
            argv += [form.split()[0], *values]
        secrets += values
        if not form.startswith("--hf"):
            argv += noise[:1]
    # a value spelled inside a flag or the marker ("port" in --port, "api_" in --api_key) cannot be told by substring
    words = [*noise, "--api-key", "--api_key", "--hf-token", "--hf_token", REDACTED]
    assume(not any(secret in word for secret in secrets for word in words))
    found = secret_values(argv)
    shown = redact_argv(argv)
    for secret in secrets:
        assert secret in found
        assert all(secret not in item for item in shown)
        assert secret not in redact_text(f"non-default args: {{'api_key': [{secret!r}]}}", found)


def test_short_secrets_are_hidden_where_they_stand_alone_only():
    assert redact_text("key abc in abcdef", ["abc"]) == f"key {REDACTED} in abcdef"


def test_text_env_and_tree_redaction():
    assert redact_env({"VLLM_API_KEY": "k", "CUDA_VISIBLE_DEVICES": "0"}) == {"VLLM_API_KEY": REDACTED,
                                                                              "CUDA_VISIBLE_DEVICES": "0"}
    tree = {"a": [f"Bearer {KEY1}", {"b": KEY2}], "n": 1}
    assert redact_tree(tree, (KEY2,)) == {"a": [f"Bearer {REDACTED}", {"b": REDACTED}], "n": 1}
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    redact_tree(deep)  # no RecursionError on a crafted tree


@pytest.mark.parametrize(
    "text",
    [
        "a" * 200_000,  # the URL pattern rescanned a run of letters from every position: quadratic
        "ab:" * 70_000,
        "a.b-c+" * 35_000,
        "x://" + "a:" * 70_000,
        "Bearer " * 30_000,
        "sk-" * 70_000,
        "authorization: " * 15_000,
    ],
)
def test_redaction_is_linear_on_hostile_text(text):
    started = time.process_time()
    redact_text(text, ["secret-value-1"])
    assert time.process_time() - started < 1.0  # quadratic took minutes on 200k characters


def test_an_80k_llm_reply_is_redacted_quickly():
    reply = "Z" * 80_000
    started = time.process_time()
    redact_tree({"content": reply})
    assert time.process_time() - started < 0.5  # it cost 70 s of CPU


def test_cap_line_counts_what_it_cut():
    assert cap_line("x" * 10, 4) == "xxxx ... [6 characters cut]" and cap_line("abc", 4) == "abc"


def test_the_catalogue_is_the_source_of_secret_flags():
    secret_knobs = {k.name for k in CATALOGUE.values() if k.secret}
    assert secret_knobs == {"api_key", "hf_token"}
    for name in secret_knobs:
        assert argv_mod.tokenize([CATALOGUE[name].flag, "v"])[0].secret


# ---------------------------------------------------------------------------- properties of the readers


@given(st.text(max_size=200))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_loads_json_only_ever_raises_value_or_recursion_errors(text):
    from smartrun import fileio

    with contextlib.suppress(ValueError, RecursionError):  # anything else would be a traceback
        fileio.loads_json(text)


@given(st.text(max_size=300), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=4, max_size=30),
       st.integers(min_value=0, max_value=300))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_a_known_secret_never_survives_redact_text(text, secret, at):
    at = min(at, len(text))
    assert secret not in redact_text(text[:at] + secret + text[at:], [secret])


knob_flags = st.sampled_from(sorted(argv_mod.FLAGS))
values = st.sampled_from(["1", "0.9", "auto", "-1", "8k", "x", "", "--", "bf16", "true"])


@given(st.lists(st.one_of(knob_flags, values, knob_flags.map(lambda f: f + "=1")), max_size=8))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_parse_user_args_is_typed_pins_or_one_input_error(argv):
    from smartrun.errors import InputError

    try:
        parsed = parse_user_args(argv)
    except InputError as err:
        assert "\n" not in err.message
        return
    assert set(parsed.pins) <= set(CATALOGUE)
