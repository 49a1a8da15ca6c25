"""clipfail: CLIP text-to-image retrieval failure analysis, backed by one DuckDB file.

This package is the Python API (the notebook surface); docs/python-api.md walks through it:

    import toolkit

    with toolkit.open_study("study.duckdb") as con:
        toolkit.run_ingest(con, coco_root="coco", num_images=100, seed=42)
        ...

Each stage of the CLI is a function here, named as its command where that name is free
(`clipfail sample-failures` is `toolkit.sample_failures`, `clipfail analyze` is `toolkit.analyze`).
Stages whose name is taken by the package or module that defines them (`toolkit.ingest` is the
ingest stage's package, `toolkit.ingest.stage` its module) have the functions `toolkit.run_ingest`,
`run_embed`, `run_evaluate`, `run_benchmark`, `run_compare`, `run_triage` and `run_improve` (as
`clipfail run` is `toolkit.run_pipeline`); `clipfail report` is `toolkit.write_report` and
`clipfail status` is `toolkit.study_status`. A stage takes an open
connection (`run_embed` and `run_pipeline` take the database path, so that the file is not held open
while the model encodes; `annotate` serves a web page and has no function here).

Importing `toolkit` is cheap: each name is imported from its module on first use (PEP 562), so
`import toolkit` loads neither torch nor pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from toolkit._version import __version__

if TYPE_CHECKING:  # for type checkers and editors; at run time the names come from __getattr__
    from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint
    from toolkit.embed.stage import embed as run_embed
    from toolkit.errors import UserError
    from toolkit.improve.stage import improve as run_improve
    from toolkit.improve.templates import export_csv as export_templates
    from toolkit.improve.templates import import_templates, list_sets
    from toolkit.ingest.download import download_coco
    from toolkit.ingest.stage import ingest as run_ingest
    from toolkit.ingest.synthetic import make_synthetic_coco
    from toolkit.labels.label_import import import_labels
    from toolkit.labels.labelstudio import export_labelstudio, import_labelstudio
    from toolkit.labels.sample import sample_failures
    from toolkit.labels.simulate import simulate_labels
    from toolkit.labels.taxonomy import add_alias, add_category, list_categories
    from toolkit.labels.triage import triage as run_triage
    from toolkit.report.analysis import analyze
    from toolkit.report.page import write_report
    from toolkit.report.status import study_status
    from toolkit.retrieval.benchmark import benchmark as run_benchmark
    from toolkit.retrieval.compare import compare as run_compare
    from toolkit.retrieval.evaluate import evaluate as run_evaluate
    from toolkit.store.paths import relocate
    from toolkit.store.sql import run_query
    from toolkit.store.study import open_study
    from toolkit.workflows.demo import run_demo
    from toolkit.workflows.pipeline import run_pipeline

# public name -> (module, name in that module); in the CLI's stage order
_API: dict[str, tuple[str, str]] = {
    "open_study": ("toolkit.store.study", "open_study"),
    "UserError": ("toolkit.errors", "UserError"),
    "download_coco": ("toolkit.ingest.download", "download_coco"),
    "make_synthetic_coco": ("toolkit.ingest.synthetic", "make_synthetic_coco"),
    "run_ingest": ("toolkit.ingest.stage", "ingest"),
    "TINY_CONFIG": ("toolkit.embed.models", "TINY_CONFIG"),
    "save_random_checkpoint": ("toolkit.embed.models", "save_random_checkpoint"),
    "run_embed": ("toolkit.embed.stage", "embed"),
    "run_evaluate": ("toolkit.retrieval.evaluate", "evaluate"),
    "run_benchmark": ("toolkit.retrieval.benchmark", "benchmark"),
    "run_compare": ("toolkit.retrieval.compare", "compare"),
    "run_triage": ("toolkit.labels.triage", "triage"),
    "sample_failures": ("toolkit.labels.sample", "sample_failures"),
    "export_labelstudio": ("toolkit.labels.labelstudio", "export_labelstudio"),
    "import_labels": ("toolkit.labels.label_import", "import_labels"),
    "import_labelstudio": ("toolkit.labels.labelstudio", "import_labelstudio"),
    "simulate_labels": ("toolkit.labels.simulate", "simulate_labels"),
    "list_categories": ("toolkit.labels.taxonomy", "list_categories"),
    "add_category": ("toolkit.labels.taxonomy", "add_category"),
    "add_alias": ("toolkit.labels.taxonomy", "add_alias"),
    "analyze": ("toolkit.report.analysis", "analyze"),
    "list_sets": ("toolkit.improve.templates", "list_sets"),
    "import_templates": ("toolkit.improve.templates", "import_templates"),
    "export_templates": ("toolkit.improve.templates", "export_csv"),
    "run_improve": ("toolkit.improve.stage", "improve"),
    "write_report": ("toolkit.report.page", "write_report"),
    "run_pipeline": ("toolkit.workflows.pipeline", "run_pipeline"),
    "run_demo": ("toolkit.workflows.demo", "run_demo"),
    "relocate": ("toolkit.store.paths", "relocate"),
    "study_status": ("toolkit.report.status", "study_status"),
    "run_query": ("toolkit.store.sql", "run_query"),
}

__all__ = [
    "__version__",
    "open_study",
    "UserError",
    "download_coco",
    "make_synthetic_coco",
    "run_ingest",
    "TINY_CONFIG",
    "save_random_checkpoint",
    "run_embed",
    "run_evaluate",
    "run_benchmark",
    "run_compare",
    "run_triage",
    "sample_failures",
    "export_labelstudio",
    "import_labels",
    "import_labelstudio",
    "simulate_labels",
    "list_categories",
    "add_category",
    "add_alias",
    "analyze",
    "list_sets",
    "import_templates",
    "export_templates",
    "run_improve",
    "write_report",
    "run_pipeline",
    "run_demo",
    "relocate",
    "study_status",
    "run_query",
]


def __getattr__(name: str):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # the next access finds it without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
