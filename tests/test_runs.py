"""One resolver for "which retrieval run": `toolkit.store.runs.resolve_retrieval_run`, its rule per need, and the
commands that use it (sample-failures, triage, annotate, export-labelstudio, analyze, improve, report).

The world (built once, copied per test): three text-to-image runs made by hand (every caption an R@1
failure) and one image-to-text run:
  run 1: sampled, labelled by A (an older run that gets labelled again last, in the tests that need it);
  run 2: sampled later, labelled by A;
  run 3: sampled last, not labelled;
  run 4: image-to-text; run 5: text-to-image, the newest, neither sampled nor labelled.
Before this resolver, improve took the highest labelled id while analyze and report took the run labelled
last, so after labelling run 1 again they worked on different runs.
"""

from __future__ import annotations

import shutil

import duckdb
import pytest
from test_annotations import invoke, make_retrieval_run, sample, write_labels

from toolkit.errors import UserError
from toolkit.store import db
from toolkit.store.runs import resolve_retrieval_run
from toolkit.store.study import open_study


def _image_to_text_run(con) -> int:
    with db.transaction(con):
        return con.execute(
            """
            INSERT INTO retrieval_runs (subset_id, model, text_embedding_set_id, image_embedding_set_id, direction,
                                        tie_policy, topk, config_hash, created_at, run_id)
            VALUES (0, 'hand-made', 0, 0, 'image-to-text', 'optimistic', 10, 'i2t', now(), 0)
            RETURNING retrieval_run_id
            """
        ).fetchone()[0]


def _label(dbpath, export, dest, category):
    f = write_labels(export / "assign_A.csv", dest, lambda s: category)
    res = invoke("--db", dbpath, "import-labels", f, "--annotator", "A")
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs_world")
    path = root / "base.duckdb"
    con = open_study(path)
    rr1 = make_retrieval_run(con, 30, first_caption=1000)
    rr2 = make_retrieval_run(con, 30, first_caption=2000)
    rr3 = make_retrieval_run(con, 30, first_caption=3000)
    con.close()
    opts = {"n": 12, "overlap": 2, "per-annotator": 5, "annotators": "A,B"}
    for rr in (rr1, rr2, rr3):
        sample(path, root / f"export{rr}", rr, **opts)
    _label(path, root / f"export{rr1}", root / "labels1.csv", "Object")
    _label(path, root / f"export{rr2}", root / "labels2.csv", "Count")
    con = open_study(path)
    rr4 = _image_to_text_run(con)
    rr5 = make_retrieval_run(con, 10, first_caption=5000)
    con.close()
    assert (rr1, rr2, rr3, rr4, rr5) == (1, 2, 3, 4, 5)
    return root


@pytest.fixture
def study(world, tmp_path):
    shutil.copy(world / "base.duckdb", tmp_path / "db.duckdb")
    for i in (1, 2, 3):
        shutil.copytree(world / f"export{i}", tmp_path / f"export{i}")
    return tmp_path / "db.duckdb"


def _pick(dbpath, retrieval_run_id=None, need="ranks", purpose=None):
    con = duckdb.connect(str(dbpath), read_only=True)
    try:
        row = resolve_retrieval_run(con, retrieval_run_id, need=need, purpose=purpose)
        return None if row is None else int(row["retrieval_run_id"])
    finally:
        con.close()


def test_the_default_run_of_each_need(study):
    # ranks: the newest text-to-image run (5), never the image-to-text one (4)
    assert _pick(study, need="ranks") == 5
    # sample: the run sampled last, although run 5 is newer
    assert _pick(study, need="sample") == 3
    # labels and report: the run labelled last (2), not the newest (5) nor the last sampled (3)
    assert _pick(study, need="labels") == 2
    assert _pick(study, need="report") == 2


def test_labelling_an_older_run_again_moves_every_labels_default_to_it(study, tmp_path):
    """The disagreement: improve took max(retrieval_run_id) of the labels (2), analyze and report the run
    labelled last (1). Now all follow the latest import."""
    _label(study, tmp_path / "export1", tmp_path / "again.csv", "Spatial")
    assert _pick(study, need="labels") == 1
    assert _pick(study, need="report") == 1
    # through the commands: analyze, improve (its message names the run it chose) and report agree
    res = invoke("--db", study, "analyze", "--out", tmp_path / "an")
    assert res.exit_code == 0 and "retrieval run 1:" in res.output, res.output
    res = invoke("--db", study, "improve", "--categories", "Object")  # run 1 now says Spatial, run 2 Count
    assert res.exit_code == 2 and "Retrieval run 1 has no labelled failures in Object" in res.output, res.output
    assert "Spatial: 5" in res.output
    res = invoke("--db", study, "report", "--out", tmp_path / "rep", "--no-figures")
    assert res.exit_code == 0, res.output
    assert "retrieval run 1;" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")


def test_a_newer_unlabelled_run_does_not_take_the_labels_default(study):
    # runs 3 (sampled) and 5 (not) are newer than every labelled run: improve/analyze stay on run 2
    assert _pick(study, need="labels") == 2
    assert _pick(study, 2, need="labels") == 2
    with pytest.raises(UserError, match=r"Retrieval run 3 has no imported labels\. Runs with labels: 2 \(5 labels\)"):
        _pick(study, 3, need="labels")


def test_a_given_run_is_checked_for_what_the_need_asks(study):
    assert _pick(study, 1, need="ranks") == 1
    assert _pick(study, 4, need="report") == 4  # the report can be about any run
    with pytest.raises(UserError, match=r"No retrieval run with id 99\. Text-to-image runs: 1, 2, 3, 5\."):
        _pick(study, 99, need="ranks")
    with pytest.raises(UserError, match=r"No retrieval run with id 99\. Runs with a failure sample: 3, 2, 1\."):
        _pick(study, 99, need="sample")
    with pytest.raises(UserError, match=r"No retrieval run with id 99\. Runs with labels: 2, 1\."):
        _pick(study, 99, need="labels")
    with pytest.raises(UserError, match=r"No retrieval run with id 99\. Retrieval runs: 1, 2, 3, 4, 5\."):
        _pick(study, 99, need="report")
    with pytest.raises(UserError, match="Retrieval run 4 is image-to-text; triage needs a text-to-image run"):
        _pick(study, 4, need="ranks", purpose="triage")
    with pytest.raises(UserError, match="Retrieval run 4 is image-to-text"):
        _pick(study, 4, need="labels")
    with pytest.raises(UserError, match=r"Retrieval run 5 has no sampled failures\. .*sample-failures --run 5"):
        _pick(study, 5, need="sample")
    with pytest.raises(ValueError):
        _pick(study, need="everything")


def test_an_empty_study_names_the_command_to_run(tmp_path):
    path = tmp_path / "empty.duckdb"
    open_study(path).close()
    with pytest.raises(UserError, match="no text-to-image retrieval run: triage needs one. Run: clipfail evaluate"):
        _pick(path, need="ranks", purpose="triage")
    with pytest.raises(UserError, match="no sampled failures. Run clipfail sample-failures first"):
        _pick(path, need="sample")
    with pytest.raises(UserError, match="No labels have been imported yet: improve needs labelled R@1 failures"):
        _pick(path, need="labels", purpose="improve")
    assert _pick(path, need="report") is None


def test_the_commands_use_the_resolver(study, tmp_path):
    """sample-failures and triage default to the newest text-to-image run; annotate's and the Label Studio
    export's default is the run sampled last; all name the run they refuse the same way."""
    res = invoke("--db", study, "sample-failures", "--out", tmp_path / "s5", "--no-pictures", "--n", 5,
                 "--overlap", 1, "--per-annotator", 2, "--annotators", "A,B")  # fmt: skip
    assert res.exit_code == 0 and "R@1 failures of retrieval run 5 " in res.output, res.output
    res = invoke("--db", study, "sample-failures", "--run", 4, "--out", tmp_path / "s4", "--no-pictures")
    assert res.exit_code == 2 and "Retrieval run 4 is image-to-text; failure sampling needs" in res.output
    res = invoke("--db", study, "triage", "--run", 4)
    assert res.exit_code == 2 and "Retrieval run 4 is image-to-text; triage needs a text-to-image run" in res.output
    res = invoke("--db", study, "export-labelstudio", tmp_path / "ls", "--run", 99)
    assert res.exit_code == 2 and "No retrieval run with id 99. Runs with a failure sample: 5, 3, 2, 1." in res.output
