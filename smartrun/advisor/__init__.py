"""Stage 5, advise: an LLM proposes knob changes inside the hard bounds; the validator is the only gate.

Any OpenAI-compatible endpoint will do (OpenAI, DeepSeek, a local vLLM, Ollama, llama.cpp). The reply is
data: knobs the LLM may not change are dropped and reported, the rest goes through `check` (a closure over
validate.check), rejected proposals are sent back for repair at most `max_repairs` times, and after that
the baseline is used (or AdvisorError under --smart-run-strict). Nothing in a reply is ever executed.
API keys live only in LLMSettings.api_key (SecretStr) and the client; never in prompts, errors or records.
"""

from __future__ import annotations

from smartrun.advisor.loop import advise, debug_line, explain_lines, rejection_text, static_advice
from smartrun.advisor.prompts import (
    MAX_OFFERED,
    Advice,
    AdviceContext,
    LLMExchange,
    initial_messages,
    offered_knobs,
    open_knobs,
    prompt_tokens,
    render,
    screen,
)
from smartrun.advisor.reply import parse_reply, reply_max_tokens, reply_model, reply_schema
from smartrun.advisor.settings import LLMSettings, LLMUnavailable, ReplyParseError, resolve_settings
from smartrun.advisor.transport import LLMReply, OpenAITransport

__all__ = [
    "MAX_OFFERED",
    "Advice",
    "AdviceContext",
    "LLMExchange",
    "LLMReply",
    "LLMSettings",
    "LLMUnavailable",
    "OpenAITransport",
    "ReplyParseError",
    "advise",
    "debug_line",
    "explain_lines",
    "initial_messages",
    "offered_knobs",
    "open_knobs",
    "parse_reply",
    "prompt_tokens",
    "rejection_text",
    "render",
    "reply_max_tokens",
    "reply_model",
    "reply_schema",
    "resolve_settings",
    "screen",
    "static_advice",
]
