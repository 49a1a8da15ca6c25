"""Issue 11, data safety: labels that a re-run must not wipe, a --replace that must not half-happen,
report/analyze folders that keep nothing stale and lose nothing foreign, the spreadsheet formula guard
in every CSV, and a few messages. Every case drives the real CLI against a temporary DuckDB file.

The retrieval run is built by hand (tests/test_failures.py's make_retrieval_run) so that no model runs.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest
from test_failures import make_retrieval_run

from toolkit.report.outdir import MANIFEST
from toolkit.sheets import sheet_text
from toolkit.store.study import open_study

SMALL = ["--n", 40, "--overlap", 10, "--per-annotator", 8, "--annotators", "A,B,C", "--no-pictures"]
EVIL = '=HYPERLINK("evil.example")'


@pytest.fixture(scope="module")
def base_db(synthetic_coco_master, tmp_path_factory):
    """A 30-image subset and one hand-made text-to-image retrieval run."""
    from click.testing import CliRunner

    from cli import cli

    path = tmp_path_factory.mktemp("robust_base") / "base.duckdb"
    args = ["--db", str(path), "ingest", "--coco-root", str(synthetic_coco_master), "--num-images", "30"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    con = open_study(path)
    make_retrieval_run(con, con.execute("SELECT subset_id FROM subsets").fetchone()[0], seed=0)
    con.close()
    return path


@pytest.fixture
def dbfile(base_db, tmp_path):
    dest = tmp_path / "db.duckdb"
    shutil.copy(base_db, dest)
    return str(dest)


def query(path, sql):
    con = open_study(path)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


def samples_and_runs(path):
    return (
        query(path, "SELECT * FROM failure_samples ORDER BY sample_id"),
        query(path, "SELECT run_id, stage, config_hash FROM runs ORDER BY run_id"),
    )


def assert_same_db(path, before):
    for a, b in zip(before, samples_and_runs(path)):
        pd.testing.assert_frame_equal(a, b)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    return rows[0], rows[1:]


def resave(path: Path, edit, *, rename=None, delimiter=",", encoding="utf-8-sig", extra=None) -> bytes:
    """Re-save an export as a spreadsheet would, after edit(header, row) filled something in.
    rename: header spellings; extra: (column name, value for the first row) appended."""
    header, rows = export_rows(path)
    for row in rows:
        edit(header, row)
    header = [(rename or {}).get(h, h) for h in header]
    if extra:
        header.append(extra[0])
        rows = [r + [extra[1] if i == 0 else ""] for i, r in enumerate(rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode(encoding)
    path.write_bytes(data)
    return data


def first_row(column: str, value: str):
    """An edit that fills `column` of the first row only."""
    done = []

    def edit(header, row):
        if not done:
            row[header.index(column)] = value
            done.append(1)

    return edit


def label_all(path: Path, label: str) -> None:
    header, rows = export_rows(path)
    for row in rows:
        row[header.index("category")] = label
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8-sig")


# ---------------------------------------------------------------------------------------------
# 1. A re-run never writes over labels, whatever header spelling import-labels accepts


def test_rerun_keeps_labels_in_every_header_spelling_that_import_labels_reads(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    edited = {
        # Excel capitalised the header
        "assign_A.csv": resave(out / "assign_A.csv", first_row("category", "Object"), rename={"category": "Category"}),
        # 'label' (an accepted spelling), ';' separators, no BOM, and a primary; secondary label
        "assign_B.csv": resave(
            out / "assign_B.csv",
            first_row("category", "Object; Attribute"),
            rename={"category": "label"},
            delimiter=";",
            encoding="utf-8",
        ),
        # only a note, under the accepted spelling 'Comments'
        "assign_C.csv": resave(out / "assign_C.csv", first_row("notes", "two dogs?"), rename={"notes": "Comments"}),
        # a column the export does not write, filled in by the annotator
        "assign_overlap.csv": resave(out / "assign_overlap.csv", lambda h, r: None, extra=("my remarks", "unsure")),
        # "Unicode text" from Excel: UTF-16, tab-separated, header 'LABEL'
        "assign_backup.csv": resave(
            out / "assign_backup.csv",
            first_row("category", "Count"),
            rename={"category": "LABEL"},
            delimiter="\t",
            encoding="utf-16",
        ),
    }
    res = run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    assert "kept as they were" in res.output
    for name, data in edited.items():
        assert name in res.output.split("kept as they were")[1]
        assert (out / name).read_bytes() == data, f"{name} was written over"

    # A new sample would overwrite them: refused before the database or any file changes.
    before = samples_and_runs(dbfile)
    res = run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL, "--seed", 5, "--replace", expect=2)
    assert "filled-in labels" in res.output and "5 in all" in res.output
    assert_same_db(dbfile, before)
    for name, data in edited.items():
        assert (out / name).read_bytes() == data

    # import-labels reads the same files the same way (the detection is its header matching).
    res = run_cli("--db", dbfile, "import-labels", out / "assign_A.csv", out / "assign_B.csv")
    assert "Imported 2 labels" in res.output


def test_a_file_that_cannot_be_read_is_not_written_over(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    # a workbook saved under the CSV's name: cannot be checked for labels, so it is left alone
    workbook = b"PK\x03\x04" + bytes(range(256)) * 4
    (out / "assign_A.csv").write_bytes(workbook)
    # a file whose header lost its sample_id column
    (out / "assign_B.csv").write_text("Category,notes\r\nObject,\r\n", encoding="utf-8")
    for name in ("assign_A.csv", "assign_B.csv"):
        data = (out / name).read_bytes()
        before = samples_and_runs(dbfile)
        res = run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL, expect=2)
        assert name in res.output and "cannot be read to check that it holds no labels" in res.output
        assert_same_db(dbfile, before)
        assert (out / name).read_bytes() == data
        (out / name).unlink()  # moved away, as the message says: the next file is checked next
    res = run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    assert (out / "assign_A.csv").read_bytes().startswith(b"\xef\xbb\xbfsample_id,")
    # an empty file holds nothing and is simply written again
    (out / "assign_C.csv").write_bytes(b"")
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    assert (out / "assign_C.csv").stat().st_size > 100


def test_rerunning_run_keeps_labels_saved_under_another_header_spelling(run_cli, tmp_db, tmp_path, synthetic_coco):
    from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_random_checkpoint(ckpt, spec=TINY_CONFIG, seed=1)
    out = tmp_path / "fa"
    cmd = ["--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 20, "--model", TINY_CONFIG]
    cmd += ["--checkpoint", ckpt, "--device", "cpu", "--n", 20, "--overlap", 4, "--per-annotator", 6]
    cmd += ["--annotators", "A,B", "--out", out, "--no-pictures"]
    run_cli(*cmd)
    data = resave(out / "assign_A.csv", first_row("category", "Object"), rename={"category": "label"})
    res = run_cli(*cmd)
    assert (out / "assign_A.csv").read_bytes() == data
    assert [line.split()[1] for line in res.output.splitlines()[1:5]] == ["already"] * 4


# ---------------------------------------------------------------------------------------------
# 2. --replace into a folder that cannot be written changes nothing


def test_replace_into_an_unwritable_out_changes_nothing(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    files = folder_bytes(out)
    before = samples_and_runs(dbfile)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):  # a file, and a folder under a file (root can write anywhere else)
        res = run_cli("--db", dbfile, "sample-failures", "--out", bad, *SMALL, "--seed", 5, "--replace", expect=2)
        assert str(bad) in res.output and "Traceback" not in res.output
        assert_same_db(dbfile, before)
    assert folder_bytes(out) == files
    assert blocker.read_text() == "x"


def test_replace_that_fails_while_writing_rolls_back(run_cli, dbfile, tmp_path, monkeypatch):
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    files = folder_bytes(out)
    before = samples_and_runs(dbfile)

    from toolkit.labels import sample as failures

    calls = []
    real_render = failures.PictureRenderer.render

    def render(self, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_render(self, **kw)

    monkeypatch.setattr(failures.PictureRenderer, "render", render)
    args = ["--n", 12, "--overlap", 3, "--per-annotator", 3, "--annotators", "A,B,C"]
    res = run_cli("--db", dbfile, "sample-failures", "--out", out, *args, "--seed", 5, "--replace", expect=2)
    assert "No space left on device" in res.output and "earlier sample" in res.output
    assert_same_db(dbfile, before)  # the new sample was not committed
    assert folder_bytes(out) == files  # no new CSV, no picture, no staging folder left behind
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    monkeypatch.setattr(failures.PictureRenderer, "render", real_render)
    res = run_cli("--db", dbfile, "sample-failures", "--out", out, *args, "--seed", 5, "--replace")
    ids = query(dbfile, "SELECT sample_id FROM failure_samples ORDER BY 1")["sample_id"].tolist()
    assert sorted(p.name for p in out.glob("vis_*.png")) == sorted(f"vis_{i}.png" for i in ids)
    header, rows = export_rows(out / "failure_samples.csv")
    assert sorted(int(r[0]) for r in rows) == ids


# ---------------------------------------------------------------------------------------------
# 4. report/analyze --out: nothing stale kept, nothing foreign lost


@pytest.fixture
def labelled(run_cli, dbfile, tmp_path):
    """dbfile with A's set labelled Object and B's Ambiguous (imported)."""
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    label_all(out / "assign_A.csv", "Object")
    label_all(out / "assign_B.csv", "Ambiguous")
    run_cli("--db", dbfile, "import-labels", out / "assign_A.csv", out / "assign_B.csv")
    return dbfile, out


def test_reused_report_folder_keeps_nothing_of_the_earlier_report(run_cli, labelled, tmp_path):
    dbfile, _ = labelled
    rep = tmp_path / "report"
    run_cli("--db", dbfile, "report", "--out", rep)
    first = set(folder_bytes(rep))
    assert {"tables/taxonomy_distribution.csv", "figures/figure1_taxonomy.png", "report.html"} <= first

    con = open_study(dbfile)
    con.execute("DELETE FROM annotations")  # the next report has no taxonomy section
    con.close()
    run_cli("--db", dbfile, "report", "--out", rep)
    second = set(folder_bytes(rep))
    assert "tables/taxonomy_distribution.csv" not in second and "figures/figure1_taxonomy.png" not in second
    assert not [p for p in second if p.startswith("figures/")]
    assert "No labels yet" in (rep / "report.html").read_text(encoding="utf-8")
    assert second == {"report.html", MANIFEST} | {p for p in second if p.startswith("tables/")}
    assert not [p for p in rep.iterdir() if p.name.startswith(".clipfail-") and p.name != MANIFEST]


def test_report_folder_with_foreign_files_is_refused_and_left_alone(run_cli, dbfile, tmp_path):
    rep = tmp_path / "report"
    run_cli("--db", dbfile, "report", "--out", rep)
    (rep / "notes.txt").write_text("my notes", encoding="utf-8")
    (rep / "tables" / "recall_summary.csv").write_text("edited by hand\n", encoding="utf-8")
    files = folder_bytes(rep)
    res = run_cli("--db", dbfile, "report", "--out", rep, expect=2)
    assert "notes.txt" in res.output and "tables/recall_summary.csv" in res.output and "Move them out" in res.output
    assert folder_bytes(rep) == files

    # a folder that no report wrote (or an older clipfail, without a manifest) is refused too
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "report.html").write_text("<html>old</html>", encoding="utf-8")
    res = run_cli("--db", dbfile, "report", "--out", legacy, expect=2)
    assert "report.html" in res.output and (legacy / "report.html").read_text(encoding="utf-8") == "<html>old</html>"

    # moved away, as the message says: the report is written
    (rep / "notes.txt").unlink()
    (rep / "tables" / "recall_summary.csv").unlink()
    run_cli("--db", dbfile, "report", "--out", rep)
    assert (rep / "tables" / "recall_summary.csv").read_text(encoding="utf-8").startswith("retrieval_run_id,")


def test_reused_analyze_folder_keeps_nothing_of_the_earlier_analysis(run_cli, labelled, tmp_path):
    dbfile, fa = labelled
    an = tmp_path / "analysis"
    run_cli("--db", dbfile, "analyze", "--out", an)
    assert (an / "figure2_actionable.png").exists()
    label_all(fa / "assign_A.csv", "Ambiguous")  # now no actionable label is left: no Figure 2
    run_cli("--db", dbfile, "import-labels", fa / "assign_A.csv")
    res = run_cli("--db", dbfile, "analyze", "--out", an)
    assert not (an / "figure2_actionable.png").exists() and not (an / "figure2_actionable.svg").exists()
    assert (an / "figure1_taxonomy.png").exists()
    assert "figure2" not in res.output
    (an / "notes.txt").write_text("keep me", encoding="utf-8")
    res = run_cli("--db", dbfile, "analyze", "--out", an, expect=2)
    assert "notes.txt" in res.output and (an / "notes.txt").read_text(encoding="utf-8") == "keep me"
    # a report into the analysis folder would remove the analysis: its files are not the report's
    (an / "notes.txt").unlink()
    files = folder_bytes(an)
    res = run_cli("--db", dbfile, "report", "--out", an, expect=2)
    assert "annotator_agreement.csv" in res.output and folder_bytes(an) == files


# ---------------------------------------------------------------------------------------------
# 24. The formula guard in every CSV meant for spreadsheets


def test_analyze_removes_what_killed_runs_left_and_keeps_a_live_runs_folder(run_cli, labelled, tmp_path):
    from toolkit import staging
    from toolkit.report.outdir import OLD_PREFIX, STAGING_PREFIX

    dbfile, _ = labelled
    an = tmp_path / "analysis"
    run_cli("--db", dbfile, "analyze", "--out", an)
    files = folder_bytes(an)
    for name in (".clipfail-staging-old1", ".clipfail-old-old2"):  # left by a clipfail without locks
        (an / name).mkdir()
        (an / name / "figure1_taxonomy.png").write_bytes(b"old")
    dead = staging.make(an, OLD_PREFIX)  # a killed run's: its lock file is there, held by nobody
    (dead.path / "report.html").write_bytes(b"old")
    os.close(dead.fd)
    live = staging.make(an, STAGING_PREFIX)  # another run writing into the folder now
    (live.path / "figure1_taxonomy.png").write_bytes(b"new")
    try:
        run_cli("--db", dbfile, "analyze", "--out", an)
        assert sorted(p.name for p in an.iterdir() if p.name.startswith(".")) == sorted([MANIFEST, live.path.name])
        assert (live.path / "figure1_taxonomy.png").read_bytes() == b"new"
    finally:
        live.remove()
    assert folder_bytes(an).keys() == files.keys()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_manifest_is_refused_not_opened(labelled, tmp_path):
    from helpers import invoke_unblocking

    dbfile, _ = labelled
    an = tmp_path / "analysis"
    an.mkdir()
    os.mkfifo(an / MANIFEST)
    res = invoke_unblocking(["--db", dbfile, "analyze", "--out", an], [an / MANIFEST])
    assert res.exit_code == 2 and MANIFEST in res.output and "Traceback" not in res.output, res.output
    assert [p.name for p in an.iterdir()] == [MANIFEST] and stat.S_ISFIFO(os.stat(an / MANIFEST).st_mode)


def test_formula_like_category_names_are_guarded_in_report_and_analyze_csvs(run_cli, dbfile, tmp_path):
    run_cli("--db", dbfile, "categories", "add", EVIL, "--definition", "a hostile name")
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    label_all(out / "assign_A.csv", EVIL)
    run_cli("--db", dbfile, "import-labels", out / "assign_A.csv")
    run_cli("--db", dbfile, "analyze", "--out", tmp_path / "an")
    run_cli("--db", dbfile, "report", "--out", tmp_path / "rep")

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


# ---------------------------------------------------------------------------------------------
# 25. Small messages


def test_a_file_given_twice_has_a_sentence_of_its_own(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", dbfile, "sample-failures", "--out", out, *SMALL)
    label_all(out / "assign_A.csv", "Object")
    res = run_cli("--db", dbfile, "import-labels", out / "assign_A.csv", out / "assign_A.csv", expect=2)
    assert "given twice Nothing" not in res.output
    assert re.search(r"given twice; give each file once\. Nothing was imported\.", res.output), res.output
    assert query(dbfile, "SELECT count(*) AS n FROM annotations")["n"][0] == 0


def test_a_category_without_an_example_shows_no_nan(run_cli, dbfile, tmp_path):
    run_cli("--db", dbfile, "categories", "add", "Text", "--definition", "The caption quotes text.")
    res = run_cli("--db", dbfile, "categories", "list")
    text_entry = res.output.split("Text (actionable)")[1]
    assert not re.search(r"\bnan\b", res.output, re.IGNORECASE), res.output
    assert "example:" not in text_entry.split("aliases:")[0]
    run_cli("--db", dbfile, "sample-failures", "--out", tmp_path / "fa", *SMALL)
    readme = (tmp_path / "fa" / "README.txt").read_bytes().decode("utf-8-sig")
    assert "Example: nan" not in readme and "Text\r\n  Definition: The caption quotes text." in readme
