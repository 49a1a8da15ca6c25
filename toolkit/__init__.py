"""clipfail: CLIP text-to-image retrieval failure analysis, backed by one DuckDB file.

This package is the Python API (the notebook surface); docs/python-api.md walks through it:

    import toolkit

    with toolkit.open_study("study.duckdb") as con:
        toolkit.run_ingest(con, coco_root="coco", num_images=100, seed=42)
        ...

Each stage of the CLI is a function here, named as its command where that name is free
(`clipfail sample-failures` is `toolkit.sample_failures`, `clipfail analyze` is `toolkit.analyze`).
Stages that share their name with the module that defines them keep the module's name for the
module, so their functions are `toolkit.run_ingest`, `run_embed`, `run_evaluate`, `run_benchmark`,
`run_compare`, `run_triage` and `run_improve` (as `clipfail run` is `toolkit.run_pipeline`); `clipfail report` is
`toolkit.write_report` and `clipfail status` is `toolkit.study_status`. A stage takes an open
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
    from toolkit.adhoc import run_query
    from toolkit.analysis import analyze
    from toolkit.annotations import import_labels
    from toolkit.benchmark import benchmark as run_benchmark
    from toolkit.compare import compare as run_compare
    from toolkit.demo import run_demo
    from toolkit.download import download_coco
    from toolkit.embed import embed as run_embed
    from toolkit.errors import UserError
    from toolkit.evaluate import evaluate as run_evaluate
    from toolkit.failures import sample_failures
    from toolkit.improve import improve as run_improve
    from toolkit.ingest import ingest as run_ingest
    from toolkit.labelstudio import export_labelstudio, import_labelstudio
    from toolkit.models import TINY_CONFIG, save_random_checkpoint
    from toolkit.paths import relocate
    from toolkit.pipeline import run_pipeline
    from toolkit.report import write_report
    from toolkit.simulate import simulate_labels
    from toolkit.status import study_status
    from toolkit.study import open_study
    from toolkit.synthetic import make_synthetic_coco
    from toolkit.taxonomy import add_alias, add_category, list_categories
    from toolkit.templates import export_csv as export_templates
    from toolkit.templates import import_templates, list_sets
    from toolkit.triage import triage as run_triage

# public name -> (module, name in that module); in the CLI's stage order
_API: dict[str, tuple[str, str]] = {
    "open_study": ("toolkit.study", "open_study"),
    "UserError": ("toolkit.errors", "UserError"),
    "download_coco": ("toolkit.download", "download_coco"),
    "make_synthetic_coco": ("toolkit.synthetic", "make_synthetic_coco"),
    "run_ingest": ("toolkit.ingest", "ingest"),
    "TINY_CONFIG": ("toolkit.models", "TINY_CONFIG"),
    "save_random_checkpoint": ("toolkit.models", "save_random_checkpoint"),
    "run_embed": ("toolkit.embed", "embed"),
    "run_evaluate": ("toolkit.evaluate", "evaluate"),
    "run_benchmark": ("toolkit.benchmark", "benchmark"),
    "run_compare": ("toolkit.compare", "compare"),
    "run_triage": ("toolkit.triage", "triage"),
    "sample_failures": ("toolkit.failures", "sample_failures"),
    "export_labelstudio": ("toolkit.labelstudio", "export_labelstudio"),
    "import_labels": ("toolkit.annotations", "import_labels"),
    "import_labelstudio": ("toolkit.labelstudio", "import_labelstudio"),
    "simulate_labels": ("toolkit.simulate", "simulate_labels"),
    "list_categories": ("toolkit.taxonomy", "list_categories"),
    "add_category": ("toolkit.taxonomy", "add_category"),
    "add_alias": ("toolkit.taxonomy", "add_alias"),
    "analyze": ("toolkit.analysis", "analyze"),
    "list_sets": ("toolkit.templates", "list_sets"),
    "import_templates": ("toolkit.templates", "import_templates"),
    "export_templates": ("toolkit.templates", "export_csv"),
    "run_improve": ("toolkit.improve", "improve"),
    "write_report": ("toolkit.report", "write_report"),
    "run_pipeline": ("toolkit.pipeline", "run_pipeline"),
    "run_demo": ("toolkit.demo", "run_demo"),
    "relocate": ("toolkit.paths", "relocate"),
    "study_status": ("toolkit.status", "study_status"),
    "run_query": ("toolkit.adhoc", "run_query"),
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
