"""The spreadsheet formula guard (toolkit/sheets.py) in every CSV meant for spreadsheets: report and analyze
tables with a formula-like category name, and sheet_text itself. Through the real CLI on ranked_db (conftest.py).
"""

from __future__ import annotations

import csv
import io
import re

import pandas as pd
from helpers import label_all

from toolkit.sheets import sheet_text

SMALL = ["--n", 40, "--overlap", 10, "--per-annotator", 8, "--annotators", "A,B,C", "--no-pictures"]
EVIL = '=HYPERLINK("evil.example")'


def test_formula_like_category_names_are_guarded_in_report_and_analyze_csvs(run_cli, ranked_db, tmp_path):
    run_cli("--db", ranked_db, "categories", "add", EVIL, "--definition", "a hostile name")
    out = tmp_path / "fa"
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL)
    label_all(out / "assign_A.csv", EVIL)
    run_cli("--db", ranked_db, "import-labels", out / "assign_A.csv")
    run_cli("--db", ranked_db, "analyze", "--out", tmp_path / "an")
    run_cli("--db", ranked_db, "report", "--out", tmp_path / "rep", "--no-figures")

    dist = pd.read_csv(tmp_path / "an" / "taxonomy_distribution.csv", dtype=str, keep_default_na=False)
    evil = dist[dist["category"] == "'" + EVIL]
    assert evil["percent"].tolist() == ["100.00"] and evil["count"].tolist() == ["8"]
    assert not [c for c in dist["category"] if c.startswith("=")]
    rep_dist = pd.read_csv(tmp_path / "rep" / "tables" / "taxonomy_distribution.csv", dtype=str)
    assert rep_dist.loc[rep_dist["count"] == "8", "category"].tolist() == ["'" + EVIL]
    csvs = list((tmp_path / "an").glob("*.csv")) + list((tmp_path / "rep" / "tables").glob("*.csv"))
    assert len(csvs) > 8
    for path in csvs:
        for row in csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")):
            assert not [c for c in row if c[:1] in ("=", "@") or re.match(r"[+-][^0-9.]", c)], path
    # the HTML page shows the name as it is (escaped, not prefixed)
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "<td>=HYPERLINK(&quot;evil.example&quot;)</td>" in page and "&#x27;=HYPERLINK" not in page


def test_sheet_text_guards_formulas_and_leaves_numbers_alone():
    assert sheet_text(EVIL) == "'" + EVIL
    assert (
        sheet_text("@SUM(A1)") == "'@SUM(A1)"
        and sheet_text("+cmd") == "'+cmd"
        and sheet_text("-1 apples") == "'-1 apples"
    )
    assert sheet_text("\t=1") == "'\t=1"
    assert sheet_text("-0.25") == "-0.25" and sheet_text("+3") == "+3" and sheet_text("1e-05") == "1e-05"
    assert sheet_text(None) == "" and sheet_text(float("nan")) == "" and sheet_text(pd.NA) == ""
    assert sheet_text("Object") == "Object" and sheet_text(-2) == "-2"
