"""End to end: `clipfail demo` into a temporary folder, then the database, the report's tables and the
page as headless Chromium renders it.

The demo runs once per module, without the annotators' pictures (sample-failures' own tests cover
them), in about 20-30 s on 2 cores: a real tiny open_clip model loaded from a saved checkpoint,
every stage, simulated labels, improve, report.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import query_rows, require_tool
from PIL import Image

from toolkit.report.status import study_status
from toolkit.store import paths
from toolkit.store.study import open_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]

# Appended to a copy of the page: after load, write what the page holds into the DOM for --dump-dom.
CHECK_SCRIPT = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e)));
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const result = {
    n_images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight]),
    n_tables: document.querySelectorAll('table').length,
    resources: performance.getEntriesByType('resource').map(r => r.name),
    errors: window.__errors,
    title: document.title,
  };
  const pre = document.createElement('pre');
  pre.id = 'clipfail-check';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def test_demo_fills_every_table(demo):
    out, output = demo
    assert f"Report:   {out / 'report' / 'report.html'}" in output
    con = open_study(out / "demo.duckdb", read_only=True)
    try:
        q = lambda sql, *p: con.execute(sql, list(p)).fetchall()  # noqa: E731
        assert q("SELECT num_images, captions_per_image FROM subsets") == [(100, 5)]
        assert q("SELECT count(*) FROM subset_captions") == [(500,)]
        # the embeddings came from the saved checkpoint, not from a random model in memory
        ckpt = out / "model" / "tiny-clip-random.safetensors"
        sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
        sets = con.execute("SELECT kind, rows, checkpoint_sha256, pretrained FROM embedding_sets ORDER BY kind").df()
        assert sets.loc[sets["kind"] == "image", "rows"].tolist() == [100]
        assert sets.loc[sets["kind"] == "text", "rows"].tolist() == [500]
        assert set(sets["checkpoint_sha256"]) == {sha}
        emb = np.load(
            paths.resolve(con, con.execute("SELECT path FROM embedding_sets WHERE kind = 'image'").fetchone()[0])
        )
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

        rrid = q("SELECT retrieval_run_id FROM retrieval_runs WHERE direction = 'text-to-image'")[0][0]
        assert q("SELECT n_queries FROM recall_summary WHERE retrieval_run_id = ?", rrid) == [(500,)]
        sizes = dict(q("SELECT set_name, count(*) FROM failure_samples GROUP BY ALL"))
        assert sizes == {"overlap": 30, "A": 50, "B": 50, "C": 50, "backup": 20}
        # simulated labels, flagged; every annotator labelled the overlap set
        assert q("SELECT count(*), bool_and(is_simulated) FROM annotations") == [(3 * 50 + 3 * 30, True)]
        assert q("SELECT count(DISTINCT annotator) FROM annotations JOIN failure_samples USING (sample_id) "
                 "WHERE set_name = 'overlap'") == [(3,)]  # fmt: skip
        agree = q("SELECT percent_agreement FROM annotator_agreement WHERE measure = 'fleiss'")[0][0]
        assert 0 < agree < 100  # the simulated annotators disagree on part of the overlap set
        # improve: four failure subsets x three poolings, plus one control configuration x three poolings
        runs = con.execute("SELECT categories, population, pooling FROM improvement_runs").df()
        fail = runs[runs["population"] == "failures"]
        assert fail.groupby("categories")["pooling"].apply(sorted).tolist() == [["logsumexp", "max", "mean"]] * 4
        assert len(runs[runs["population"] != "failures"]) == 3
        assert q("SELECT count(*) FROM improvement_stats WHERE category = '*'") == [(len(runs) * 3,)]
        stages = {r[0] for r in q("SELECT stage FROM runs")}
        assert {"ingest", "embed", "evaluate", "sample-failures", "import-labels", "improve", "report"} <= stages
        assert "explain" in stages  # issue 28
        n_sampled = q("SELECT count(DISTINCT caption_id) FROM failure_samples")[0][0]
        assert q("SELECT scope, n_failures FROM explain_runs") == [("sample", n_sampled)]
        assert q("SELECT count(*) FROM failure_blame")[0][0] == n_sampled

        status = study_status(con)
        assert list(status.stages["stage"].drop_duplicates()) == [  # every stage, in the study's order
            "ingest",
            "embed",
            "evaluate",
            "compare",
            "triage",
            "sample-failures",
            "import-labels",
            "explain",  # issue 28: the demo explains its sample
            "improve",
            "method-comparison",
            "report",
        ]
        assert status.has_simulated_labels
    finally:
        con.close()


def test_status_names_the_triage_run_and_the_comparisons(demo):
    """clipfail status on the demo lists every stage: its triage run, its comparison of improvement methods, that
    no two retrieval runs were compared yet, and each with what comes next, --db spelt out."""
    from click.testing import CliRunner

    from cli import cli

    out, _ = demo
    db_path = str(out / "demo.duckdb")
    res = CliRunner().invoke(cli, ["--db", db_path, "status"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines()[2:] if line.strip()}
    assert "triage run 1 of retrieval run 1" in lines["triage"]
    con = open_study(db_path, read_only=True)
    try:
        n_fail = con.execute("SELECT n_r1_failures FROM recall_summary").fetchone()[0]
        n_suggested = con.execute("SELECT count(suggested_category) FROM triage_suggestions").fetchone()[0]
    finally:
        con.close()
    assert f"{n_suggested} suggestions for {n_fail} R@1 failures" in lines["triage"]
    assert f'clipfail --db {db_path} sql "select * from triage_agreement where retrieval_run_id = 1"' in lines["triage"]
    assert "retrieval run 1, methods templates" in lines["method-comparison"]
    assert f"clipfail --db {db_path} improve --method qb-norm" in lines["method-comparison"]
    assert "no comparison of two retrieval runs yet" in lines["compare"]
    assert f"clipfail --db {db_path} compare RUN_A RUN_B" in lines["compare"]
    assert "method templates, populations failures,successes" in lines["improve"]
    assert "Everything is up to date" in res.output  # optional next steps do not hold the study up


def test_demo_report_tables(demo):
    out, _ = demo
    rep = out / "report"
    con = open_study(out / "demo.duckdb", read_only=True)
    try:
        pd.testing.assert_frame_equal(
            pd.read_csv(rep / "tables" / "recall_summary.csv"),
            con.execute("SELECT * FROM recall_summary").df(),
            check_dtype=False,
        )
        dist = pd.read_csv(rep / "tables" / "taxonomy_distribution.csv")
        view = con.execute("SELECT category, count FROM taxonomy_distribution ORDER BY rank").df()
        assert dist[["category", "count"]].values.tolist() == view.values.tolist()
        consolidated = pd.read_csv(rep / "tables" / "improvement_runs_consolidated.csv")
        recall = con.execute("SELECT improvement_id, k, improved_pct FROM improvement_recall").df()
        for row in consolidated.itertuples():
            for k, col in ((1, "improved_r1"), (5, "improved_r5"), (10, "improved_r10")):
                want = recall[(recall["improvement_id"] == row.improvement_id) & (recall["k"] == k)]["improved_pct"]
                assert getattr(row, col) == pytest.approx(float(want.iloc[0]), abs=0)
    finally:
        con.close()
    study_tables = sorted(p.name for p in (rep / "tables").glob("improvement_*_own.csv"))
    assert len(study_tables) == 3
    assert len(list((rep / "tables").glob("improvement_*_union_k15.csv"))) == 1
    for name in study_tables:
        t = pd.read_csv(rep / "tables" / name)
        assert t["pooling"].tolist() == ["max", "mean", "logsumexp (tau=1)"]
    figures = sorted((p.name for p in (rep / "figures").glob("*.png")), key=lambda f: int(f.split("_")[0][6:]))
    assert [f.split("_")[0] for f in figures] == [f"figure{i}" for i in range(1, len(figures) + 1)]
    assert figures[6] == "figure7_triage.png"  # the triage confusion matrix (issue 16)
    # issue 17: the k-occurrence histogram, the top hubs, then one method-comparison chart per category
    assert figures[7:9] == ["figure8_hubness.png", "figure9_hubs.png"]
    assert len(figures) > 11 and all("_methods_" in f for f in figures[9:-2])
    # issue 28: what the model hangs on (blame per category, the examples' thumbnails), after the methods
    assert [f.split("_", 1)[1] for f in figures[-2:]] == ["blame.png", "blame_examples.png"]
    page = (rep / "report.html").read_text(encoding="utf-8")
    assert 'id="simulated-banner"' in page and "randomly initialised" in page
    assert '<h2 id="triage">7. Automatic triage</h2>' in page
    assert '<h2 id="blame">11. What the model hangs on</h2>' in page and "No explain run yet" not in page
    assert "Made with the model of this report: DEMO." in page and "randomly initialised" in page
    con = open_study(out / "demo.duckdb", read_only=True)
    try:  # the demo triaged every failure of its run, and the report's table is the view
        n_fail = con.execute("SELECT n_r1_failures FROM recall_summary").fetchone()[0]
        assert con.execute("SELECT count(*) FROM triage_suggestions").fetchone()[0] == n_fail
        view = con.execute("SELECT category, n_triage, n_human FROM triage_distribution").df()
    finally:
        con.close()
    table = pd.read_csv(rep / "tables" / "triage_distribution.csv")
    pd.testing.assert_frame_equal(table[["category", "n_triage", "n_human"]], view, check_dtype=False)


def test_demo_report_says_why_no_positive_applies(demo):
    """Section 12 on the demo (issue 27): its images are generated, not COCO's, so it says that no ECCV Caption /
    CxC positive can apply and what a COCO study runs, shows no table, and no positive row was made up."""
    from html import unescape

    from toolkit.report.sections.positives import GENERATED

    out, _ = demo
    page = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert '<h2 id="positives">12. Are the misses real?</h2>' in page
    section = page.split('<h2 id="positives">')[1].split("<h2 ")[0]
    assert unescape(section) == f'12. Are the misses real?</h2><p class="missing">{GENERATED}</p>'
    for needle in ("generated (clipfail demo), not COCO's", "no ECCV Caption or CxC positive can apply",
                   "rather than simulate positives", "clipfail positives import --source eccv"):  # fmt: skip
        assert needle in GENERATED
    with open_study(out / "demo.duckdb", read_only=True) as con:
        for table in ("positive_sets", "extra_positives", "positive_ranks", "improvement_positive_ranks",
                      "improvement_stats_extended", "improvement_positives", "improvement_recall_extended",
                      "false_negatives_triage_agreement"):  # fmt: skip
            assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def test_report_renders_in_headless_chromium_without_broken_images(demo, tmp_path):
    if CHROMIUM is None:
        require_tool("chromium", "not installed (Debian: apt-get install chromium)")
    out, _ = demo
    page = (out / "report" / "report.html").read_text(encoding="utf-8")
    check = out / "report" / "report_check.html"  # beside the report: same relative links
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
         check.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r'<pre id="clipfail-check">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"the check did not run; chromium said:\n{dom.stderr[-2000:]}"
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    n_figures = len(list((out / "report" / "figures").glob("*.png")))
    assert n_figures > 9  # 6 + the triage confusion matrix + hubness (2) + method comparison (issue 17)
    assert found["n_images"] == n_figures and found["broken"] == []
    assert all(w > 300 and h > 200 for w, h in found["sizes"])
    assert found["n_tables"] >= 10 and found["errors"] == []
    assert [r for r in found["resources"] if not r.startswith("data:")] == []  # nothing fetched

    shot = out / "report" / "screenshot.png"
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,4000",
         f"--screenshot={shot}", (out / "report" / "report.html").as_uri()],
        capture_output=True, timeout=120,
    )  # fmt: skip
    im = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert im.shape == (4000, 1280)
    assert im.std() > 20  # text, tables and charts, not a blank page


def test_the_readmes_example_queries_run_on_the_demo(demo):
    # README.md's "Asking the database" block: every query runs read-only and returns rows
    from toolkit.store.sql import run_query
    from toolkit.store.study import open_study

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sql\n(.*?)```", text, re.S).group(1)
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) >= 4
    out, _ = demo
    with open_study(out / "demo.duckdb", read_only=True) as con:
        for query in queries:
            assert not run_query(con, query).empty, query


# ----------------------------------------------------------------------------- the demo folder: reused, moved, refused


def rows(db_path, sql, params=()):
    return query_rows(db_path, sql, params)


def test_demo_in_a_copied_folder_reuses_every_stage(demo, run_cli, tmp_path):
    out = tmp_path / "demo"  # a copy of the module's demo, as it was written (not the files the tests above added)
    shutil.copytree(demo[0], out, ignore=shutil.ignore_patterns("report_check.html", "screenshot.png"))
    dbp = out / "demo.duckdb"
    counts = "SELECT (SELECT count(*) FROM embedding_sets), (SELECT count(*) FROM improvement_runs), " \
        "(SELECT count(*) FROM retrieval_runs), (SELECT count(*) FROM annotations)"  # fmt: skip
    stages = "SELECT stage, count(*) FROM runs WHERE stage <> 'report' GROUP BY stage ORDER BY stage"
    before = rows(dbp, counts), rows(dbp, stages)
    copy = tmp_path / "moved"
    shutil.copytree(out, copy)
    shutil.rmtree(out)

    res = run_cli("demo", "--out", copy, "--no-pictures", "--no-figures")
    assert "Report:" in res.output
    page = (copy / "report" / "report.html").read_text(encoding="utf-8")  # rewritten, without drawing a chart
    assert "Tables only: written with --no-figures" in page and not (copy / "report" / "figures").exists()
    cdb = copy / "demo.duckdb"
    assert (rows(cdb, counts), rows(cdb, stages)) == before  # nothing embedded, ranked, improved or labelled again
    status = run_cli("--db", cdb, "status").output
    assert "MISSING" not in status
    # new prompts are encoded with the checkpoint recorded (relative to the folder) with the text embeddings
    assert rows(cdb, "SELECT DISTINCT json_extract_string(config_json, '$.checkpoint') FROM embedding_sets "
                     "WHERE kind = 'text'") == [("model/tiny-clip-random.safetensors",)]  # fmt: skip
    n_prompt_sets = rows(cdb, "SELECT count(*) FROM embedding_sets WHERE kind = 'prompt'")[0][0]
    cat = rows(
        cdb,
        "SELECT s.category FROM sample_labels s JOIN categories c ON c.name = s.category WHERE c.is_actionable "
        "AND s.category NOT IN (SELECT categories FROM improvement_runs) GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1",
    )[0][0]
    run_cli("--db", cdb, "improve", "--categories", cat, "--pooling", "max", "--device", "cpu")
    assert rows(cdb, "SELECT count(*) FROM embedding_sets WHERE kind = 'prompt'")[0][0] == n_prompt_sets + 1


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
