"""The last section: what made the numbers: the report's retrieval run (view retrieval_run_provenance), every
stage run with its config (table runs), and the package versions that wrote the report."""

from __future__ import annotations

import html
import importlib.metadata
import platform

import pandas as pd

from toolkit._version import __version__
from toolkit.report.htmlpage import Context
from toolkit.store import paths as study_paths

PACKAGES = ["clipfail", "torch", "torchvision", "open_clip_torch", "duckdb", "numpy", "pandas", "matplotlib", "pillow"]


def render(ctx: Context) -> None:
    con, page, rrid = ctx.con, ctx.page, ctx.rrid
    page.h2("provenance", "Provenance")
    if rrid is not None:
        info = con.execute("SELECT * FROM retrieval_run_provenance WHERE retrieval_run_id = ?", [rrid]).df()
        if not info.empty:
            info["source_file"] = [str(study_paths.resolve(con, v)) for v in info["source_file"]]  # stored relative
            long = pd.DataFrame({"field": list(info.columns), "value": [str(v) for v in info.iloc[0]]})
            long.loc[long["value"].isin(["None", "nan", "<NA>"]), "value"] = ""
            page.table(long, "provenance_retrieval_run", f"Retrieval run {rrid}: data, model and weights", csv=True)
    runs = con.execute(
        """
        SELECT run_id, stage, started_at, finished_at, seed, model, pretrained, package_version,
               config_hash, config_json
        FROM runs ORDER BY run_id
        """
    ).df()
    page.table(
        runs,
        "provenance_runs",
        "Every stage run in this database (table runs), with its config hash (configs in the CSV and below)",
        html_columns=[c for c in runs.columns if c != "config_json"],
    )
    configs = "".join(
        f"<dt>run {int(r.run_id)} ({html.escape(str(r.stage))})</dt>"
        f"<dd><code>{html.escape(str(r.config_json))}</code></dd>"
        for r in runs.itertuples()
    )
    page.parts.append(
        f'<details><summary>Every run\'s config (canonical JSON)</summary><dl class="configs">{configs}</dl></details>'
    )
    versions = []
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = __version__ if name == "clipfail" else "(not installed)"
        versions.append((name, version))
    versions.append(("python", platform.python_version()))
    page.table(
        pd.DataFrame(versions, columns=["package", "version"]),
        "provenance_versions",
        "Package versions that wrote this report (each run's clipfail version is in the table above)",
    )
