"""report: every table on the page is what the views return; figures embedded; simulated labels flagged.

The data: a generated COCO subset with hand-built embeddings, evaluate, a failure sample, simulated
labels and improve runs with a seeded fake prompt encoder (the real model path is covered by
test_demo.py). Built once per module.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
from html import unescape

import pandas as pd
import pytest
from helpers import fake_text_encoder
from PIL import Image

from toolkit.improve.stage import improve
from toolkit.report.page import write_report
from toolkit.store.study import open_study


@pytest.fixture(scope="module")
def study(labelled_study_master, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_study")
    shutil.copytree(labelled_study_master[1], root, dirs_exist_ok=True)  # build_labelled_study's, made once
    path = root / "study.duckdb"
    con = open_study(path)
    kw = dict(poolings="all", encoder=fake_text_encoder, cache_dir=root / "cache")
    improve(con, "Object", control="successes:20", **kw)
    improve(con, "Attribute", **kw)
    improve(con, "Object,Attribute", template_mode="union", **kw)
    res = write_report(con, out_dir=root / "report", db_path=str(path))
    yield con, res, root
    con.close()


def _html_tables(html: str) -> dict[str, pd.DataFrame]:
    """Every <table data-name=...> of the page as a DataFrame of strings."""
    out = {}
    for m in re.finditer(r'<table data-name="([^"]+)">(.*?)</table>', html, re.S):
        body = m.group(2)
        head = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", body, re.S)]
        rows = [
            [unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>")[1], re.S)
        ]
        out[m.group(1)] = pd.DataFrame(rows, columns=head)
    return out


def test_the_report_and_clipfail_improve_print_one_improvement_table(study):
    """Both render toolkit.report.display.improvement_table of view improvement_recall (issue
    12.6): the report's CSV is it, row for row, and the CLI prints its pooling / improved /
    delta columns per population."""
    from toolkit.improve.stage import summary
    from toolkit.report import display as tables

    con, res, root = study
    paths = sorted((root / "report" / "tables").glob("improvement_*_own.csv"))
    assert len(paths) == 2
    for path in paths:
        csv = pd.read_csv(path)
        ids = csv["improvement_id"].tolist()
        pd.testing.assert_frame_equal(csv, tables.improvement_table(summary(con, ids), ids), check_dtype=False)
        cli_tables = tables.improvement_tables(summary(con, ids))
        assert len(cli_tables) == 1 and cli_tables[0][0].startswith(csv_title_start(con, ids[0]))
        printed = cli_tables[0][1][["pooling", *tables.RECALL_COLUMNS]]
        pd.testing.assert_frame_equal(printed, csv[["pooling", *tables.RECALL_COLUMNS]], check_dtype=False)
        stats = cli_tables[0][2]
        assert stats["95% CI (pp)"].tolist() == [csv.loc[i, f"95% CI ΔR@{k}"] for i in csv.index for k in (1, 5, 10)]


def csv_title_start(con, improvement_id) -> str:
    categories, n = con.execute(
        "SELECT categories, n FROM improvement_recall WHERE improvement_id = ? AND k = 1", [improvement_id]
    ).fetchone()
    return f"{categories.replace(',', '+')} failures (n={n}, K 10, retrieval run "


def test_report_tables_are_the_views(study):
    con, res, root = study
    page = res.html_path.read_text(encoding="utf-8")
    tables = _html_tables(page)
    rrid = res.retrieval_run_id

    # Baseline: the CSV is the view, value for value; the page shows the same numbers.
    view = con.execute("SELECT * FROM recall_summary ORDER BY retrieval_run_id").df()
    csv = pd.read_csv(root / "report" / "tables" / "recall_summary.csv")
    pd.testing.assert_frame_equal(csv, view, check_dtype=False)
    assert tables["recall_summary"]["r_at_1"].tolist() == [f"{v:.4f}" for v in view["r_at_1"]]
    assert tables["recall_summary"]["n_r1_failures"].tolist() == [f"{v:,}" for v in view["n_r1_failures"]]

    # Taxonomy and agreement: the rows of the views for this retrieval run.
    dist = con.execute(
        "SELECT category, count, percent FROM taxonomy_distribution WHERE retrieval_run_id = ? ORDER BY rank", [rrid]
    ).df()
    shown = tables["taxonomy_distribution"]
    assert shown["category"].tolist() == dist["category"].tolist()
    assert shown["count"].tolist() == [str(c) for c in dist["count"]]
    assert shown["percent"].tolist() == [f"{p:.2f}" for p in dist["percent"]]
    kappa = con.execute(
        "SELECT kappa FROM annotator_agreement WHERE retrieval_run_id = ? AND measure = 'fleiss'", [rrid]
    ).fetchone()[0]
    agree = tables["annotator_agreement"]
    assert agree.loc[agree["measure"] == "fleiss", "kappa"].tolist() == [f"{kappa:.4f}"]

    # One study-shaped table per failure subset, a row per pooling, numbers from improvement_recall.
    recall = con.execute("SELECT * FROM improvement_recall WHERE population = 'failures'").df()
    subsets = sorted(recall["categories"].unique())
    assert subsets == ["Attribute", "Object", "Object,Attribute"]
    for categories in subsets:
        mode = "union" if "," in categories else "own"
        slug = re.sub(r"[^a-z0-9]+", "_", f"{categories}_default-v2_{mode}".lower())
        table = tables[f"improvement_{slug}"]
        assert table["pooling"].tolist() == ["max", "mean", "logsumexp (tau=1)"]
        for row in table.itertuples(index=False):
            rid = int(row[-1])
            for k, improved, delta, p in ((1, row[1], row[4], row[10]), (10, row[3], row[6], row[12])):
                v = recall[(recall["improvement_id"] == rid) & (recall["k"] == k)].iloc[0]
                assert improved == f"{v['improved_pct']:.2f}"
                assert delta == f"{v['delta_pp']:+.2f}"
                assert p == ("<0.0001" if v["mcnemar_p"] < 1e-4 else f"{v['mcnemar_p']:.4f}")
        csv = pd.read_csv(root / "report" / "tables" / f"improvement_{slug}.csv")
        assert len(csv) == 3
    assert "improvement_object_attribute_default_v2_union_by_category" in tables  # per-category breakdown

    # Consolidated: every improvement run once; controls: the success-population rows of the view.
    consolidated = pd.read_csv(root / "report" / "tables" / "improvement_runs_consolidated.csv")
    assert sorted(consolidated["improvement_id"]) == sorted(
        r[0] for r in con.execute("SELECT improvement_id FROM improvement_runs").fetchall()
    )
    controls = pd.read_csv(root / "report" / "tables" / "improvement_controls.csv")
    assert set(controls["population"]) == {"successes"} and len(controls) == 3 * 3
    view = con.execute(
        "SELECT n_broken FROM improvement_recall WHERE population = 'successes' ORDER BY improvement_id, k"
    ).df()
    assert controls.sort_values(["improvement_id", "k"])["n_broken"].tolist() == view["n_broken"].tolist()


def test_report_is_self_contained_and_flags_simulated_labels(study):
    con, res, root = study
    page = res.html_path.read_text(encoding="utf-8")
    assert res.is_simulated and 'id="simulated-banner"' in page and page.count("SIMULATED") >= 5
    # Figures 1-2 (taxonomy) and 3-5 (one per improvement subset), each as PNG + SVG, each embedded.
    pngs = sorted(p.name for p in res.figures if p.suffix == ".png")
    n_methods = sum("_methods_" in p for p in pngs)  # section 9 (issue 17): one chart per category
    assert n_methods >= 1
    assert [p for p in pngs if "_methods_" not in p] == [
        "figure1_taxonomy.png",
        "figure2_actionable.png",
        "figure3_attribute_default_v2_own.png",
        "figure4_object_default_v2_own.png",
        "figure5_object_attribute_default_v2_union.png",
        "figure6_hubness.png",  # section 8 (issue 17): N_k histogram and top hubs
        "figure7_hubs.png",
    ]
    assert all(p.with_suffix(".svg").exists() for p in res.figures)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 7 + n_methods and all(s.startswith("data:image/png;base64,") for s in srcs)
    for src in srcs:
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.verify()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing is fetched from anywhere
    # Provenance: the config hash of every run, and package versions.
    for (h,) in con.execute("SELECT config_hash FROM runs WHERE stage <> 'report'").fetchall():
        assert h in page
    assert "open_clip_torch" in page and "duckdb" in page


def test_report_run_is_recorded_once_per_database_state(study):
    con, res, root = study
    again = write_report(con, out_dir=root / "report")
    assert again.is_noop and again.run_id == res.run_id
    n = con.execute(  # this folder's rows only: the tables-only test writes its own report of the same study
        "SELECT count(*) FROM runs WHERE stage = 'report' AND json_extract_string(config_json, '$.out_dir') = ?",
        [str((root / "report").resolve())],
    ).fetchone()[0]
    assert n == 1


def test_no_figures_writes_the_same_page_and_tables_without_drawing(study, run_cli):
    """`report --no-figures` (a tables-only report, for a quick look; the suite's table checks use it): every CSV
    is byte-identical to the full report's, every HTML table the same, and each figure keeps its number and
    caption in a note that says it was left out; no image is drawn or embedded. It is a report run of its own."""
    con, full, root = study
    out = root / "tables-only"
    res = run_cli("--db", root / "study.duckdb", "report", "--out", out, "--no-figures")
    assert "(no figures: --no-figures," in res.output
    assert not (out / "figures").exists() and not list(out.rglob("*.png")) and not list(out.rglob("*.svg"))
    assert sorted(p.name for p in (out / "tables").iterdir()) == sorted(p.name for p in full.tables)
    for p in full.tables:  # provenance lists the report run that the full report added since: the rest is equal
        if p.name == "provenance_runs.csv":
            got, want = (pd.read_csv(f).query("stage != 'report'") for f in (out / "tables" / p.name, p))
            pd.testing.assert_frame_equal(got, want)
            assert len(want) >= 5
        else:
            assert (out / "tables" / p.name).read_bytes() == p.read_bytes(), p.name
    page, full_page = (out / "report.html").read_text(encoding="utf-8"), full.html_path.read_text(encoding="utf-8")
    assert _html_tables(page).keys() == _html_tables(full_page).keys()
    for name, df in _html_tables(full_page).items():
        got = _html_tables(page)[name]
        if name == "provenance_runs":
            got, df = got[got["stage"] != "report"].reset_index(drop=True), df[df["stage"] != "report"]
        pd.testing.assert_frame_equal(got, df.reset_index(drop=True))
    assert "<img" not in page and "<figure" not in page and "Tables only: written with --no-figures" in page
    captions = [re.sub(r" \(<a .*</a>\)$", "", c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", full_page)]
    left_out = re.findall(r'<p class="missing figure-left-out">(.*?) Not drawn: this report was written with', page)
    assert len(captions) == len(full.figures) // 2 >= 7 and left_out == captions
    configs = [
        r[0] for r in con.execute("SELECT config_json FROM runs WHERE stage = 'report' ORDER BY run_id").fetchall()
    ]
    assert len(configs) == 2 and '"figures":false' in configs[1].replace(" ", "") and "figures" not in configs[0]
    again = run_cli("--db", root / "study.duckdb", "report", "--out", out, "--no-figures")
    assert "(no figures: --no-figures," in again.output
    assert con.execute("SELECT count(*) FROM runs WHERE stage = 'report'").fetchone()[0] == 2  # the same again: no row


def test_report_of_an_empty_database_says_what_is_missing(run_cli, tmp_db, tmp_path, synthetic_coco):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 10)
    res = run_cli("--db", tmp_db, "report", "--out", tmp_path / "r")
    assert "not in the report yet: a text-to-image retrieval run" in res.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "No retrieval run yet" in page and "SIMULATED" not in page
    res = run_cli("--db", tmp_db, "report", "--run", 7, "--out", tmp_path / "r", expect=2)
    assert "No retrieval run with id 7. Run clipfail evaluate first." in res.output


def test_report_records_its_run_on_a_writable_study_only_and_the_guide_says_so(run_cli, tmp_db, tmp_path):
    """Issue 24.8: the guide said in one place that `clipfail report` opens the database read-only and records
    nothing, in another that it records its run. What it does: on a writable file it adds one `report` run row (so
    that status knows; the same report again adds nothing); a write-protected file stays byte-identical. Every
    sentence of the guide about it says the same."""
    import hashlib
    import os
    from pathlib import Path

    import duckdb

    def sha():
        return hashlib.sha256(Path(tmp_db).read_bytes()).hexdigest()

    def n_reports():
        con = duckdb.connect(tmp_db, read_only=True)
        try:
            return con.execute("SELECT count(*) FROM runs WHERE stage = 'report'").fetchone()[0]
        finally:
            con.close()

    run_cli("--db", tmp_db, "init")
    before = sha()
    run_cli("--db", tmp_db, "report", "--out", tmp_path / "r1")
    assert sha() != before and n_reports() == 1  # recorded
    os.chmod(tmp_db, 0o444)
    try:
        protected = sha()
        run_cli("--db", tmp_db, "report", "--out", tmp_path / "r2")
        assert sha() == protected and n_reports() == 1  # only read
    finally:
        os.chmod(tmp_db, 0o644)

    guide = " ".join((Path(__file__).parents[1] / "docs" / "guide.md").read_text(encoding="utf-8").split())
    sentences = [s for s in re.split(r"(?<=[.;])\s", guide) if "report" in s and re.search(r"\brecord", s)]
    assert not [s for s in sentences if re.search(r"records? (no run|nothing)", s) and "write-protected" not in s]
    assert "on a writable file `report` records its run" in guide
    assert "On a writable database `clipfail report` records its run" in guide
    assert "On a write-protected database it only reads, records nothing and leaves the file byte-identical" in guide


# ----------------------------------------------------------------------------- two subsets of one category


def test_report_does_not_put_two_subsets_of_one_category_under_one_heading(labelled_study, tmp_path, run_cli):
    """Two improve runs of the same categories and templates but different subsets (--max-subset) are two
    experiments with their own n and baseline: the report gave them one section, headed with the first one's
    n and baseline, and one CSV (a row per pooling twice), so the second run's rows sat under the wrong n."""
    path, root = labelled_study
    con = open_study(path)
    try:
        kw = dict(poolings="max,mean", encoder=fake_text_encoder, cache_dir=root / "cache")
        full = improve(con, "Object", **kw)
        small = improve(con, "Object", max_subset=5, **kw)
        n_full, n_small = (
            con.execute(
                "SELECT n FROM improvement_recall WHERE improvement_id = ? AND k = 1", [r.improvement_ids[0]]
            ).fetchone()[0]
            for r in (full, small)
        )
        assert n_small == 5 < n_full
    finally:
        con.close()
    out = tmp_path / "report"
    run_cli("--db", str(path), "report", "--out", str(out), "--no-figures")
    page = (out / "report.html").read_text(encoding="utf-8")
    headings = [unescape(h) for h in re.findall(r"<h3>(4\.\d+ [^<]*)</h3>", page)]
    assert len(headings) == 2, headings
    assert any(f"(n={n_full}," in h for h in headings) and any(f"(n={n_small}," in h for h in headings), headings
    tables = {k: v for k, v in _html_tables(page).items() if k.startswith("improvement_") and "consolidated" not in k}
    assert len(tables) == 2, list(tables)
    ids = sorted(int(i) for t in tables.values() for i in t["improvement_id"])
    assert ids == sorted(full.improvement_ids + small.improvement_ids)
    for t in tables.values():
        assert len(t) == 2 and t["pooling"].tolist() == ["max", "mean"]
    # each table's CSV is written (no file name shared by the two subsets)
    csvs = sorted(p.name for p in (out / "tables").glob("improvement_object*.csv"))
    assert len(csvs) == 2, csvs
