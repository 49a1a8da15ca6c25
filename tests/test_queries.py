"""queries/: the list of views, their order, their conventions, and the NULL-ordering rules.

(Issue 12's rewrite of the views to these conventions was checked to be a pure refactor: on this
study every view returned the same rows, columns, types and order as the pre-issue-12 SQL. That
one-off comparison kept a second copy of every view under tests/ and was removed once it had
passed; the numbers themselves are checked against plain recomputations in each stage's tests.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from helpers import fake_text_encoder

import queries
from schema.tables import metadata
from toolkit.improve.stage import improve
from toolkit.labels.triage import triage
from toolkit.store import db
from toolkit.store import study as study_mod
from toolkit.store.study import open_study

QUERIES = Path(queries.__file__).parent


def _sql_files() -> list[str]:
    return sorted(p.stem for p in QUERIES.glob("*.sql"))


# --- the list of views ------------------------------------------------------------------------------


def test_every_view_file_is_listed_once():
    assert len(queries.VIEWS) == len(set(queries.VIEWS)), "a view is listed twice in queries.VIEWS"
    assert sorted(queries.VIEWS) == _sql_files()
    assert list(study_mod.view_sql()) == queries.VIEWS  # applied in the listed order


def test_view_sql_refuses_a_file_missing_from_the_list(monkeypatch):
    monkeypatch.setattr(queries, "VIEWS", [v for v in queries.VIEWS if v != "triage_confusion"])
    with pytest.raises(RuntimeError, match=r"not listed \['triage_confusion'\]"):
        study_mod.view_sql()
    monkeypatch.setattr(queries, "VIEWS", [*queries.VIEWS, "triage_confusion", "no_such_view"])
    with pytest.raises(RuntimeError, match=r"no file for \['no_such_view'\]"):
        study_mod.view_sql()


def _schema_only():
    con = duckdb.connect()
    study_mod.ensure_schema(con)
    return con


def test_views_apply_in_list_order_on_a_fresh_database_once_each():
    con = _schema_only()
    try:
        for name in queries.VIEWS:  # one pass, no retries: each view only reads what came before it
            con.execute((QUERIES / f"{name}.sql").read_text(encoding="utf-8"))
        got = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert got == set(queries.VIEWS)
    finally:
        con.close()


def test_apply_views_names_the_view_that_does_not_apply(monkeypatch):
    # the order matters: a view listed before a view it reads does not apply, and nothing retries it
    order = [v for v in queries.VIEWS if v != "improvement_headline"]
    order.insert(order.index("improvement_recall") + 1, "improvement_headline")
    monkeypatch.setattr(queries, "VIEWS", order)
    con = _schema_only()
    try:
        with pytest.raises(RuntimeError, match=r"view improvement_recall in queries/improvement_recall\.sql"):
            study_mod.apply_views(con)
    finally:
        con.close()


# --- conventions (queries/README.md) ----------------------------------------------------------------

RELATIONS = {t.name for t in metadata.sorted_tables} | set(queries.VIEWS)


@pytest.mark.parametrize("name", _sql_files())
def test_view_follows_the_conventions(name):
    text = (QUERIES / f"{name}.sql").read_text(encoding="utf-8")
    header, _, body = text.partition("CREATE OR REPLACE VIEW")
    assert body.startswith(f" {name} AS\n"), "one CREATE OR REPLACE VIEW named after the file"
    assert "CREATE" not in body, "one view per file"
    lines = header.splitlines()
    assert lines and all(line.startswith("--") for line in lines), "a comment header, then the statement"
    assert lines[0].startswith(f"-- {name}: "), "the header starts with '-- <view name>: '"
    reads_line = next((line for line in lines if line.startswith("-- Reads: ")), None)
    assert reads_line, "the header names what the view reads ('-- Reads: a, b.')"
    reads = set(re.findall(r"[a-z_]+", reads_line.removeprefix("-- Reads: ").split("(")[0]))
    referenced = {m for m in re.findall(r"\b(?:FROM|JOIN)\s+([a-z_]+)", body) if m in RELATIONS}
    assert reads == referenced, "the Reads: line lists exactly the tables and views the view reads"
    for rel in referenced:  # every table or view is read through an import CTE of its own name
        assert re.search(rf"(?:WITH|,)\s+{rel} AS \(\s+SELECT\s[^()]*?\bFROM {rel}\b", body), f"import CTE {rel}"
    assert re.search(r"\bfinal AS \(", body), "the last CTE is called final"
    assert re.search(r"\)\nSELECT \*(?: EXCLUDE \([a-z_, ]+\))? FROM final\nORDER BY [^\n]+\n$", body), (
        "the view ends with SELECT * FROM final ORDER BY ..."
    )
    assert "2147483647" not in text, "NULLS FIRST / NULLS LAST, not a sentinel position"


def test_improvement_views_share_the_hits_view():
    # improvement_headline reads the hits once and picks the headline count (ties); both views read it
    text = (QUERIES / "improvement_headline.sql").read_text(encoding="utf-8")
    assert "FROM improvement_hits" in text and "improvement_ranks" not in text and "unnest" not in text
    for name in ("improvement_recall", "category_recall_delta"):
        text = (QUERIES / f"{name}.sql").read_text(encoding="utf-8")
        assert "FROM improvement_headline" in text and "improvement_ranks" not in text and "unnest" not in text
        assert "is_tie_affected THEN" not in text, "the headline count is chosen in improvement_headline only"


# --- the views return what they returned before issue 12 -------------------------------------------


@pytest.fixture(scope="module")
def study(labelled_study_master, tmp_path_factory):
    """A generated study with every view populated: retrieval, labels (with the overlap set), improve runs
    (one with a NULL-category control, one mixed), and a triage run."""
    root = tmp_path_factory.mktemp("queries_study")
    shutil.copytree(labelled_study_master[1], root, dirs_exist_ok=True)  # build_labelled_study's, made once
    path = root / "study.duckdb"
    con = open_study(path)
    try:
        kw = dict(poolings="all", encoder=fake_text_encoder, cache_dir=root / "cache")
        improve(con, "Object", control="successes:20", **kw)
        improve(con, "Object,Attribute", template_mode="union", control="all", **kw)
        triage(con)
        _edge_cases(con)
    finally:
        con.close()
    return path


def _edge_cases(con) -> None:
    """Rows whose order the NULL rules decide, edited in by hand: failures no triage rule had evidence for
    ('(none)'), and labels of a category no longer in the taxonomy (no position) that win a vote, lose a
    1-1 tie, and tie as a secondary category."""
    con.execute("UPDATE triage_suggestions SET suggested_category = NULL WHERE caption_id % 4 = 0")
    s0, s1, s2 = (
        r[0]
        for r in con.execute(
            "SELECT sample_id FROM failure_samples WHERE set_name = 'overlap' ORDER BY draw_order LIMIT 3"
        ).fetchall()
    )
    names = [
        r[0] for r in con.execute("SELECT annotator FROM annotations WHERE sample_id = ? ORDER BY 1", [s0]).fetchall()
    ]
    assert len(names) == 3
    a, b, c = names
    sql = "UPDATE annotations SET category = ?, secondary_category = ? WHERE sample_id = ? AND annotator = ?"
    con.execute(sql, ["Retired", None, s0, a])
    con.execute(sql, ["Retired", None, s0, b])  # Retired wins 2:1
    con.execute("DELETE FROM annotations WHERE sample_id = ? AND annotator = ?", [s1, c])
    con.execute(sql, ["Retired", None, s1, a])
    con.execute(sql, ["Action", None, s1, b])  # 1:1 tie: Action has a position, Retired has none
    con.execute(sql, ["Context", "Retired", s2, a])
    con.execute(sql, ["Context", "Object", s2, b])  # secondary tie 1:1
    con.execute(sql, ["Context", None, s2, c])


def _outputs(path: Path, names) -> dict[str, tuple[pd.DataFrame, list]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {n: (con.execute(f"SELECT * FROM {n}").df(), con.execute(f"DESCRIBE {n}").fetchall()) for n in names}
    finally:
        con.close()


def test_null_ordering_rules_on_the_edge_cases(study):
    # the cases the NULL ordering rules are about occur in this study, and come out in the documented order
    new = _outputs(study, ["category_recall_delta", "triage_distribution", "triage_confusion", "sample_labels"])
    for name, (df, _) in new.items():
        assert len(df) > 0, f"{name} is empty on the test study"
    crd = new["category_recall_delta"][0]
    assert crd["category"].isna().any() and crd["category"].notna().any()
    for _, run in crd.groupby("improvement_id", sort=False):  # within a run, NULL category last
        assert run["category"].isna().tolist() == sorted(run["category"].isna().tolist())
    dist = new["triage_distribution"][0]
    assert dist["category"].iloc[-1] == "(none)" and dist["n_triage"].iloc[-1] > 0
    conf = new["triage_confusion"][0]
    assert (conf["suggested_category"] == "(none)").any()
    labels = new["sample_labels"][0].set_index("draw_order").sort_index()
    overlap = labels[labels["is_overlap"]]
    assert overlap["category"].iloc[:3].tolist() == ["Retired", "Action", "Context"]
    assert overlap["is_tie"].iloc[:3].tolist() == [False, True, False]
    assert overlap["secondary_category"].iloc[2] == "Object"


def test_improvement_hits_add_up_to_the_recall_views(study):
    con = duckdb.connect(str(study), read_only=True)
    try:
        hits = con.execute("SELECT * FROM improvement_hits").df()
        n_ranks = con.execute("SELECT count(*) FROM improvement_ranks").fetchone()[0]
        assert len(hits) == 3 * n_ranks and sorted(hits["k"].unique()) == [1, 5, 10]
        assert (hits["is_baseline_hit"] == (hits["baseline_rank"] <= hits["k"])).all()
        assert (hits["is_improved_hit"] == (hits["improved_rank"] <= hits["k"])).all()
        recall = con.execute("SELECT improvement_id, k, n, baseline_pct, improved_pct FROM improvement_recall").df()
        by_run = hits.groupby(["improvement_id", "k"]).agg(
            n=("caption_id", "size"), b=("is_baseline_hit", "mean"), i=("is_improved_hit", "mean")
        )
        for row in recall.itertuples():
            ref = by_run.loc[(row.improvement_id, row.k)]
            assert row.n == ref["n"]
            assert float(row.baseline_pct) == pytest.approx(100 * ref["b"], abs=0.005)
            assert float(row.improved_pct) == pytest.approx(100 * ref["i"], abs=0.005)
    finally:
        con.close()


# --- one table_exists, charts in toolkit.report.figures (issue 12.6) ---------------------------------------

TOOLKIT = Path(__file__).resolve().parents[1] / "toolkit"


def test_one_table_exists_check():
    con = _schema_only()
    try:
        study_mod.apply_views(con)
        assert db.table_exists(con, "improvement_runs") and db.table_exists(con, "improvement_recall")
        assert not db.table_exists(con, "no_such_table")
    finally:
        con.close()
    sources = {p.relative_to(TOOLKIT).as_posix(): p.read_text(encoding="utf-8") for p in TOOLKIT.rglob("*.py")}
    sources["cli.py"] = (TOOLKIT.parent / "cli.py").read_text(encoding="utf-8")
    assert [n for n, s in sources.items() if "information_schema.tables" in s] == ["store/db.py"]


def test_charts_are_drawn_in_figures_only():
    for p in sorted(TOOLKIT.rglob("*.py")):
        if p.relative_to(TOOLKIT).as_posix() != "report/figures.py":
            text = p.read_text(encoding="utf-8")
            assert "savefig" not in text and "matplotlib.figure" not in text, p.name


# --- ties in the baseline (issue 24.7) --------------------------------------------------------------


def test_recall_summary_gives_both_counts_and_flags_a_tied_run(run_cli, synthetic_coco, tmp_path):
    """recall_summary keeps its optimistic r_at_K (values unchanged) and adds r_at_K_pessimistic (rank + n_tied <=
    K), n_tied_queries and is_tie_affected, against NumPy on the embeddings; the report flags such a run."""
    import numpy as np
    from helpers import register_hand_built

    path = tmp_path / "ties.duckdb"
    run_cli("--db", path, "ingest", "--coco-root", synthetic_coco, "--num-images", 12, "--name", "s12")
    con = open_study(path)
    try:
        sid = int(db.get_subset(con, "s12")["subset_id"])
        imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
        caps = con.execute("SELECT caption_id, image_id FROM subset_captions WHERE subset_id = ?", [sid]).df()
        rng = np.random.default_rng(3)
        img = rng.normal(size=(12, 8)).astype(np.float32)
        img[6:] = img[:6]  # six pairs of identical images: each caption ties with its image's twin
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        row = {int(i): k for k, i in enumerate(imgs["image_id"])}
        gt = np.array([row[int(i)] for i in caps["image_id"]])
        txt = img[gt] + 0.6 * rng.normal(size=(len(gt), 8)).astype(np.float32)
        register_hand_built(con, tmp_path / "i.npy", "image", img, imgs["image_id"], sid)
        register_hand_built(con, tmp_path / "t.npy", "text", txt, caps["caption_id"], sid)
    finally:
        con.close()
    run_cli("--db", path, "evaluate", "--device", "cpu")
    run_cli("--db", path, "evaluate", "--device", "cpu", "--direction", "image-to-text")
    con = duckdb.connect(str(path), read_only=True)
    try:
        got = con.execute("SELECT * FROM recall_summary ORDER BY retrieval_run_id").df()
        ranks = con.execute("SELECT gt_rank, n_tied FROM retrieval_ranks WHERE retrieval_run_id = 1").df()
    finally:
        con.close()
    S = txt.astype(np.float64) @ img.T.astype(np.float64)  # any rounding: only the ties matter below
    g = S[np.arange(len(gt)), gt][:, None]
    opt, pess = 1 + (S > g + 1e-9).sum(1), (S >= g - 1e-9).sum(1)
    assert np.array_equal(ranks["gt_rank"], opt) and np.array_equal(ranks["gt_rank"] + ranks["n_tied"], pess)
    t2i = got.iloc[0]
    for k in (1, 5, 10):
        assert t2i[f"r_at_{k}"] == pytest.approx((opt <= k).mean())  # the optimistic column as before
        assert t2i[f"r_at_{k}_pessimistic"] == pytest.approx((pess <= k).mean())
    assert t2i["r_at_1"] > t2i["r_at_1_pessimistic"] and t2i["n_tied_queries"] == len(gt)
    assert bool(t2i["is_tie_affected"])
    i2t = got.iloc[1]  # image queries: the twins are queries, not gallery items, and nothing ties
    assert i2t["n_tied_queries"] == 0 and not i2t["is_tie_affected"]
    assert [i2t[f"r_at_{k}_pessimistic"] for k in (1, 5, 10)] == [i2t[f"r_at_{k}"] for k in (1, 5, 10)]
    page_dir = tmp_path / "rep"
    run_cli("--db", path, "report", "--out", page_dir, "--no-figures")
    page = (page_dir / "report.html").read_text(encoding="utf-8")
    assert "TIES: in retrieval run(s) 1 the ground truth ties" in page


# --- report and status read views (issue 25.4) -------------------------------------------------------


def test_a_method_with_null_template_columns_gets_its_own_status_row_and_stays_out_of_templates(study, tmp_path):
    """A method other than prompt ensembling (a plugin's), whose runs store NULL template set, pooling, mode and
    templates hash: status lists its runs on a row of their own (status_improve, per method), and the report's
    prompt-ensembling rows (improvement_recall_wide, method IS NULL OR 'templates') leave it out."""
    import shutil

    from toolkit.report.status import study_status

    copy = tmp_path / "plugin.duckdb"
    shutil.copy(study, copy)
    con = duckdb.connect(str(copy))
    try:
        iid, n_ranks = con.execute(
            "SELECT improvement_id, (SELECT count(*) FROM improvement_ranks r "
            "WHERE r.improvement_id = u.improvement_id) FROM improvement_runs u ORDER BY improvement_id DESC LIMIT 1"
        ).fetchone()
        for column in ("template_set", "pooling", "template_mode", "templates_sha256"):  # NULL allowed (issue 25.3)
            con.execute(f"ALTER TABLE improvement_runs ALTER COLUMN {column} DROP NOT NULL")
        con.execute(
            "UPDATE improvement_runs SET method = 'my-plugin', template_set = NULL, pooling = NULL, "
            "template_mode = NULL, templates_sha256 = NULL WHERE improvement_id = ?",
            [iid],
        )
        status = study_status(con)
        wide = con.execute(
            "SELECT method, pooling_position FROM improvement_recall_wide WHERE improvement_id = ?", [iid]
        ).fetchone()
        templates = con.execute(
            "SELECT improvement_id FROM improvement_recall_wide WHERE method IS NULL OR method = 'templates'"
        ).df()
        key = con.execute("SELECT subset_key FROM improvement_subset_keys WHERE improvement_id = ?", [iid]).fetchone()
    finally:
        con.close()
    improve_rows = status.stages[status.stages["stage"] == "improve"]
    plugin = improve_rows[improve_rows["detail"].str.contains("method my-plugin")]
    assert len(plugin) == 1 and plugin["rows"].iloc[0] == f"1 improvement runs from 1 invocations, {n_ranks} ranks"
    assert improve_rows["detail"].str.contains("method templates").sum() == 1
    assert wide == ("my-plugin", 3)  # an unnamed pooling sorts after max, mean, logsumexp
    assert iid not in set(templates["improvement_id"]) and len(templates) > 0
    assert key is not None and key[0] is not None  # NULL templates hash: the captions still key the subset


def test_named_toolkit_functions_exist():
    """queries/ named toolkit.store.db.view_sql and toolkit.store.db.apply_views, which moved to toolkit.store.study
    (issue 12)."""
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for rel in ("queries/__init__.py", "queries/README.md"):
        for mod, name in re.findall(r"(toolkit(?:\.\w+)+)\.(\w+)", (root / rel).read_text(encoding="utf-8")):
            assert hasattr(importlib.import_module(mod), name), f"{rel} names {mod}.{name}"
