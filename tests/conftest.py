"""Shared test helpers: paths to fixtures and the reference data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data, cache and config dirs and no LLM settings from the machine, so the suite
    never reads or writes the real home and behaves the same on a developer's box and on CI."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SMARTRUN_HOME", str(home / "smartrun"))
    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config")):
        monkeypatch.setenv(var, str(home / sub))
    for var in ("SMARTRUN_LLM_BASE_URL", "SMARTRUN_LLM_MODEL", "SMARTRUN_LLM_API_KEY", "OPENAI_BASE_URL",
                "OPENAI_API_KEY", "VLLM_API_KEY", "FAKE_VLLM_SCENARIO", "FAKE_VLLM_PERF", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)

