"""Every benchmark script imports: a rename in the package must not leave benchmarks/ calling a name that is gone
(the scripts run for hours, so a broken import would only show at the next measurement)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # scripts import their siblings (palette_warmup_check)
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: every script guards its run with __main__
    assert module.__doc__, f"{script} has no docstring saying what it measures"
    sys.modules.pop(f"bench_{script[:-3]}", None)
