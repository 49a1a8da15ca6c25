"""The Python API: docs/python-api.md runs as written, and `toolkit` is a cheap, stable surface."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import toolkit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_walkthrough_runs(tmp_path, monkeypatch):
    # every ```python block of the page, in order, in one namespace; the page's asserts check its numbers
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the page's mkdtemp lands in tmp_path
    namespace: dict = {"__name__": "walkthrough"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"block {i + 1} of {DOC.name} failed:\n{block}") from exc
    work = namespace["work"]
    assert work.parent == tmp_path
    # analyze without out_dir wrote nothing: no folder beside the study, none in the working directory
    assert namespace["res"].out_dir is None
    assert sorted(p.name for p in work.iterdir()) == [
        "coco",
        "failure_analysis",
        "labels",
        "study.duckdb",
        "study_cache",
    ]
    assert not (tmp_path / "analysis").exists()  # where analyze(con) used to write by default


def test_import_toolkit_is_cheap():
    code = "import sys, toolkit; print(sorted(m for m in ('torch', 'pandas', 'duckdb', 'numpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    assert set(toolkit.__all__) == {"__version__", *toolkit._API}
    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None
    assert (
        toolkit.analyze.__module__ == "toolkit.report.analysis"
        and toolkit.open_study.__module__ == "toolkit.store.study"
    )
    with pytest.raises(AttributeError):
        toolkit.no_such_stage  # noqa: B018


def test_stage_modules_stay_modules_and_their_functions_are_run_names():
    # a stage module's dotted path reaches the module as attributes whatever was imported before
    # (mock.patch and monkeypatch walk it), and a stage function named as its old module is toolkit.run_<stage>
    code = """
import functools, importlib, types
import toolkit
f = toolkit.run_ingest
for name, module in (
    ("ingest", "toolkit.ingest.stage"),
    ("embed", "toolkit.embed.stage"),
    ("evaluate", "toolkit.retrieval.evaluate"),
    ("triage", "toolkit.labels.triage"),
    ("improve", "toolkit.improve.stage"),
):
    mod = importlib.import_module(module)
    assert isinstance(mod, types.ModuleType), module
    assert functools.reduce(getattr, module.split(".")[1:], toolkit) is mod, module
    f = getattr(toolkit, "run_" + name)
    assert isinstance(f, types.FunctionType) and f.__module__ == module, (name, f)
    assert f is getattr(mod, name)
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
