"""Review B (analysis path): regressions found in review, each driven through the real code on a small study.

The study: a generated COCO subset with hand-built embeddings, evaluate, a failure sample, simulated labels,
and improve runs with a seeded fake prompt encoder (as tests/test_report.py builds it).
"""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pandas as pd
import pytest
from helpers import build_labelled_study, fake_text_encoder

from toolkit.improve.stage import improve
from toolkit.store.study import open_study


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A labelled study (no improve run yet): (database path, root folder)."""
    root = tmp_path_factory.mktemp("review_b")
    path = root / "study.duckdb"
    con = open_study(path)
    try:
        build_labelled_study(con, root)
    finally:
        con.close()
    return path, root


def _html_tables(text: str) -> dict[str, pd.DataFrame]:
    out = {}
    for m in re.finditer(r'<table data-name="([^"]+)">(.*?)</table>', text, re.S):
        body = m.group(2)
        head = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", body, re.S)]
        rows = [
            [unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>")[1], re.S)
        ]
        out[m.group(1)] = pd.DataFrame(rows, columns=head)
    return out


def test_report_does_not_put_two_subsets_of_one_category_under_one_heading(labelled, tmp_path, run_cli):
    """Two improve runs of the same categories and templates but different subsets (--max-subset) are two
    experiments with their own n and baseline: the report gave them one section, headed with the first one's
    n and baseline, and one CSV (a row per pooling twice), so the second run's rows sat under the wrong n."""
    path, root = labelled
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
    run_cli("--db", str(path), "report", "--out", str(out))
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


def test_templates_export_never_overwrites_an_edited_template_csv(run_cli, tmp_db, tmp_path):
    """`templates export --out FILE` wrote over FILE whatever it held: a template CSV the user had edited (the very
    file `templates import` reads) was lost. It is now refused, the file left as it was; the same content again is
    fine, and an --out in a missing folder is one clear message, not a traceback."""
    run_cli("--db", tmp_db, "init")
    mine = tmp_path / "my_templates.csv"
    edited = "template_set,category,position,template\nmine,Object,0,{caption}\nmine,Object,1,my own {objects}\n"
    mine.write_text(edited, encoding="utf-8")
    res = run_cli("--db", tmp_db, "templates", "export", "--set", "default-v2", "--out", mine, expect=2)
    assert "my_templates.csv" in res.output and "--out" in res.output
    assert mine.read_text(encoding="utf-8") == edited
    fresh = tmp_path / "fresh.csv"
    run_cli("--db", tmp_db, "templates", "export", "--set", "default-v2", "--out", fresh)
    first = fresh.read_text(encoding="utf-8")
    run_cli("--db", tmp_db, "templates", "export", "--set", "default-v2", "--out", fresh)  # nothing would be lost
    assert fresh.read_text(encoding="utf-8") == first
    res = run_cli("--db", tmp_db, "templates", "export", "--out", tmp_path / "nowhere" / "t.csv", expect=2)
    assert "nowhere" in res.output and "Traceback" not in res.output


def test_annotate_and_labelstudio_find_images_stored_relative_to_the_database(labelled, tmp_path, monkeypatch):
    """Since studies are movable (issue 11) an image root under the database's folder is stored relative to it
    ("coco/val2017"). annotate resolved it against the current folder, so started anywhere else it served no
    image (every picture 404), and export-labelstudio wrote relative file paths and told Label Studio a relative
    document root. Both now resolve it against the database's folder, as sample-failures' pictures do."""
    from toolkit.labels import workbench as annotate
    from toolkit.labels.labelstudio import export_labelstudio

    path, root = labelled
    con = open_study(path, read_only=True)
    try:
        stored = con.execute("SELECT image_root FROM subsets").fetchone()[0]
    finally:
        con.close()
    assert not stored.startswith("/") and (root / stored).is_dir()  # the case at hand: stored relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    wb = annotate.prepare(str(path), ["A"], set_choice="mine")
    files = [p for imgs in wb.images.values() for p in imgs.values()]
    assert files and all(p is not None and p.is_file() for p in files)
    con = open_study(path, read_only=True)
    try:
        res = export_labelstudio(con, tmp_path / "ls")
    finally:
        con.close()
    assert res.image_root == str((root / stored).resolve())
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    assert tasks and all(
        Path(t["data"]["gt_file"]).is_absolute() and Path(t["data"]["gt_file"]).is_file() for t in tasks
    )


def test_demo_refuses_a_folder_made_with_another_seed_or_size(run_cli, tmp_path, monkeypatch):
    """`clipfail demo --seed 1` in a folder made with --seed 0 reused its data, model and simulated labels and printed
    the seed-0 numbers as if they were seed 1's (measured: identical R@K and report). The folder now records its
    settings and another --seed or --images is refused before anything is reused; the same settings go on.
    (The generator is stopped by the test so that no model is built: the check comes first.)"""
    import toolkit.ingest.synthetic
    from toolkit.errors import UserError

    calls = []

    def stop(dest, n_images, seed=0):
        calls.append((n_images, seed))
        raise UserError("stopped here by the test")

    monkeypatch.setattr(toolkit.ingest.synthetic, "make_synthetic_coco", stop)
    out = tmp_path / "demo"
    res = run_cli("demo", "--out", out, "--seed", 0, "--no-pictures", expect=2)
    assert "stopped here" in res.output and calls == [(100, 0)]
    res = run_cli("demo", "--out", out, "--seed", 1, "--no-pictures", expect=2)
    assert "--seed 0 --images 100" in res.output and "--seed 1" in res.output and len(calls) == 1
    res = run_cli("demo", "--out", out, "--images", 60, "--no-pictures", expect=2)
    assert "--images 60" in res.output and len(calls) == 1
    res = run_cli("demo", "--out", out, "--no-pictures", expect=2)  # the same settings (the defaults) go on
    assert "stopped here" in res.output and calls == [(100, 0), (100, 0)]
