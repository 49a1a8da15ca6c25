"""report --out and analyze --out (toolkit/report/outdir.py): a reused folder keeps nothing of the earlier output,
a folder with files no report wrote is refused and left alone, leftovers of killed runs are removed while a live
run's folder is kept, and a FIFO in place of the manifest is refused, not opened. Through the real CLI on
ranked_db (conftest.py: a 30-image subset and a hand-made retrieval run, so that no model runs).
"""

from __future__ import annotations

import os
import stat

import pytest
from helpers import folder_bytes, label_all

from toolkit.report.outdir import MANIFEST
from toolkit.store.study import open_study

SMALL = ["--n", 40, "--overlap", 10, "--per-annotator", 8, "--annotators", "A,B,C", "--no-pictures"]


@pytest.fixture
def labelled(run_cli, ranked_db, tmp_path):
    """ranked_db with A's set labelled Object and B's Ambiguous (imported)."""
    out = tmp_path / "fa"
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL)
    label_all(out / "assign_A.csv", "Object")
    label_all(out / "assign_B.csv", "Ambiguous")
    run_cli("--db", ranked_db, "import-labels", out / "assign_A.csv", out / "assign_B.csv")
    return ranked_db, out


def test_reused_report_folder_keeps_nothing_of_the_earlier_report(run_cli, labelled, tmp_path):
    ranked_db, _ = labelled
    rep = tmp_path / "report"
    run_cli("--db", ranked_db, "report", "--out", rep)
    first = set(folder_bytes(rep))
    assert {"tables/taxonomy_distribution.csv", "figures/figure1_taxonomy.png", "report.html"} <= first

    con = open_study(ranked_db)
    con.execute("DELETE FROM annotations")  # the next report has no taxonomy section
    con.close()
    run_cli("--db", ranked_db, "report", "--out", rep)
    second = set(folder_bytes(rep))
    assert "tables/taxonomy_distribution.csv" not in second and "figures/figure1_taxonomy.png" not in second
    assert not [p for p in second if p.startswith("figures/")]
    assert "No labels yet" in (rep / "report.html").read_text(encoding="utf-8")
    assert second == {"report.html", MANIFEST} | {p for p in second if p.startswith("tables/")}
    assert not [p for p in rep.iterdir() if p.name.startswith(".clipfail-") and p.name != MANIFEST]


def test_report_folder_with_foreign_files_is_refused_and_left_alone(run_cli, ranked_db, tmp_path):
    rep = tmp_path / "report"
    run_cli("--db", ranked_db, "report", "--out", rep)
    (rep / "notes.txt").write_text("my notes", encoding="utf-8")
    (rep / "tables" / "recall_summary.csv").write_text("edited by hand\n", encoding="utf-8")
    files = folder_bytes(rep)
    res = run_cli("--db", ranked_db, "report", "--out", rep, expect=2)
    assert "notes.txt" in res.output and "tables/recall_summary.csv" in res.output and "Move them out" in res.output
    assert folder_bytes(rep) == files

    # a folder that no report wrote (or an older clipfail, without a manifest) is refused too
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "report.html").write_text("<html>old</html>", encoding="utf-8")
    res = run_cli("--db", ranked_db, "report", "--out", legacy, expect=2)
    assert "report.html" in res.output and (legacy / "report.html").read_text(encoding="utf-8") == "<html>old</html>"

    # moved away, as the message says: the report is written
    (rep / "notes.txt").unlink()
    (rep / "tables" / "recall_summary.csv").unlink()
    run_cli("--db", ranked_db, "report", "--out", rep)
    assert (rep / "tables" / "recall_summary.csv").read_text(encoding="utf-8").startswith("retrieval_run_id,")


def test_reused_analyze_folder_keeps_nothing_of_the_earlier_analysis(run_cli, labelled, tmp_path):
    ranked_db, fa = labelled
    an = tmp_path / "analysis"
    run_cli("--db", ranked_db, "analyze", "--out", an)
    assert (an / "figure2_actionable.png").exists()
    label_all(fa / "assign_A.csv", "Ambiguous")  # now no actionable label is left: no Figure 2
    run_cli("--db", ranked_db, "import-labels", fa / "assign_A.csv")
    res = run_cli("--db", ranked_db, "analyze", "--out", an)
    assert not (an / "figure2_actionable.png").exists() and not (an / "figure2_actionable.svg").exists()
    assert (an / "figure1_taxonomy.png").exists()
    assert "figure2" not in res.output
    (an / "notes.txt").write_text("keep me", encoding="utf-8")
    res = run_cli("--db", ranked_db, "analyze", "--out", an, expect=2)
    assert "notes.txt" in res.output and (an / "notes.txt").read_text(encoding="utf-8") == "keep me"
    # a report into the analysis folder would remove the analysis: its files are not the report's
    (an / "notes.txt").unlink()
    files = folder_bytes(an)
    res = run_cli("--db", ranked_db, "report", "--out", an, expect=2)
    assert "annotator_agreement.csv" in res.output and folder_bytes(an) == files


def test_analyze_removes_what_killed_runs_left_and_keeps_a_live_runs_folder(run_cli, labelled, tmp_path):
    from toolkit import staging
    from toolkit.report.outdir import OLD_PREFIX, STAGING_PREFIX

    ranked_db, _ = labelled
    an = tmp_path / "analysis"
    run_cli("--db", ranked_db, "analyze", "--out", an)
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
        run_cli("--db", ranked_db, "analyze", "--out", an)
        assert sorted(p.name for p in an.iterdir() if p.name.startswith(".")) == sorted([MANIFEST, live.path.name])
        assert (live.path / "figure1_taxonomy.png").read_bytes() == b"new"
    finally:
        live.remove()
    assert folder_bytes(an).keys() == files.keys()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_manifest_is_refused_not_opened(labelled, tmp_path):
    from helpers import invoke_unblocking

    ranked_db, _ = labelled
    an = tmp_path / "analysis"
    an.mkdir()
    os.mkfifo(an / MANIFEST)
    res = invoke_unblocking(["--db", ranked_db, "analyze", "--out", an], [an / MANIFEST])
    assert res.exit_code == 2 and MANIFEST in res.output and "Traceback" not in res.output, res.output
    assert [p.name for p in an.iterdir()] == [MANIFEST] and stat.S_ISFIFO(os.stat(an / MANIFEST).st_mode)
