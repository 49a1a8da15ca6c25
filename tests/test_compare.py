"""compare and benchmark (issue 18): paired comparison of two retrieval runs, and many models on one subset.

The comparison's numbers (R@K, ΔR@K, fixed / broken / shared / neither, McNemar p, per-category
overlap) are recomputed here from the two runs' retrieval_ranks rows with plain numpy/pandas. The
data: a generated COCO subset with hand-built embeddings for two "models" (built once per module).
The benchmark test runs the real embed and evaluate stages on the packaged tiny config, saved with
two different seeds as two checkpoints.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import register_hand_built

from toolkit import stats
from toolkit.ingest.stage import ingest
from toolkit.ingest.synthetic import make_synthetic_coco
from toolkit.labels.sample import sample_failures
from toolkit.labels.simulate import simulate_labels
from toolkit.retrieval.evaluate import evaluate
from toolkit.store import db
from toolkit.store.study import open_study


def _members(con, name):
    sid = int(db.get_subset(con, name)["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute(
        "SELECT c.caption_id, c.image_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
        "WHERE c.subset_id = ? ORDER BY i.position, c.position",
        [sid],
    ).df()
    return sid, imgs["image_id"].to_numpy(np.int64), caps


def _hand_built_model(con, root, subset, model, seed, noise=1.6):
    """Image and text sets of one 'model': captions are noisy copies of their image's embedding."""
    sid, img_ids, caps = _members(con, subset)
    rng = np.random.default_rng(seed)
    img = np.random.default_rng(7).normal(size=(len(img_ids), 16)).astype(np.float32)  # the same images
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    row = {int(i): k for k, i in enumerate(img_ids)}
    txt = img[[row[int(i)] for i in caps["image_id"]]] + noise * rng.normal(size=(len(caps), 16)).astype(np.float32) / 4
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    for kind, arr, ids in (("image", img, img_ids), ("text", txt, caps["caption_id"].to_numpy(np.int64))):
        cfg = {"kind": kind, "model": model, "subset": subset}
        register_hand_built(con, root / f"{subset}-{model}-{kind}.npy", kind, arr, ids, sid, model=model, config=cfg)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_study")
    make_synthetic_coco(root / "coco", 40, seed=3)
    path = root / "study.duckdb"
    con = open_study(path)
    ingest(con, coco_root=root / "coco", num_images=40, captions_per_image=5, seed=42, name="s40")
    ingest(con, coco_root=root / "coco", num_images=20, captions_per_image=5, seed=1, name="s20")
    _hand_built_model(con, root, "s40", "hand-a", seed=1)
    _hand_built_model(con, root, "s40", "hand-b", seed=2)
    _hand_built_model(con, root, "s20", "hand-a", seed=1)
    runs = {
        "a": evaluate(con, "s40", model="hand-a", device="cpu").retrieval_run_id,
        "b": evaluate(con, "s40", model="hand-b", device="cpu").retrieval_run_id,
        "a_i2t": evaluate(con, "s40", model="hand-a", device="cpu", direction="image-to-text").retrieval_run_id,
        "a_s20": evaluate(con, "s20", model="hand-a", device="cpu").retrieval_run_id,
    }
    for key in ("a", "b"):  # labelled failures of both runs (simulated annotators)
        sample_failures(con, runs[key], n=60, seed=0, overlap=10, per_annotator=15, out_dir=root / f"fa_{key}",
                        pictures=False)  # fmt: skip
        simulate_labels(con, root / f"fa_{key}", root / f"labels_{key}", seed=0, retrieval_run_id=runs[key])
    con.close()
    return path, runs, root


def _ranks(con, rrid) -> pd.DataFrame:
    return con.execute(
        "SELECT query_id, gt_rank FROM retrieval_ranks WHERE retrieval_run_id = ? ORDER BY query_id", [rrid]
    ).df()


def _mcnemar_reference(a_hit, b_hit) -> float:
    b = int((a_hit & ~b_hit).sum())
    c = int((~a_hit & b_hit).sum())
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def _count(con, table):
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_comparison_numbers_equal_a_plain_recomputation_from_the_rank_rows(study, run_cli):
    path, runs, _ = study
    out = run_cli("--db", path, "compare", runs["a"], runs["b"], "--k", "1,5,10,3")
    assert "paired queries" in out.output and "delta_pp" in out.output
    con = open_study(path, read_only=True)
    try:
        ra, rb = _ranks(con, runs["a"]), _ranks(con, runs["b"])
        cid = con.execute(
            "SELECT run_comparison_id FROM run_comparisons WHERE retrieval_run_a_id = ? AND retrieval_run_b_id = ?",
            [runs["a"], runs["b"]],
        ).fetchone()[0]
        view = con.execute("SELECT * FROM run_comparison WHERE run_comparison_id = ? ORDER BY k", [cid]).df()
        pairs = con.execute("SELECT * FROM run_pairs WHERE run_comparison_id = ? ORDER BY query_id", [cid]).df()
        stored = con.execute("SELECT * FROM run_comparison_stats WHERE run_comparison_id = ? ORDER BY k", [cid]).df()
        run = con.execute(
            "SELECT r.stage, r.config_json, r.seed FROM runs r JOIN run_comparisons c USING (run_id) "
            "WHERE c.run_comparison_id = ?",
            [cid],
        ).fetchone()
    finally:
        con.close()
    assert run[0] == "compare" and run[2] == 42 and '"ks":[1,3,5,10]' in run[1]
    assert list(view["k"]) == [1, 3, 5, 10]
    # run_pairs: the two runs' rank rows side by side
    assert pairs["query_id"].tolist() == ra["query_id"].tolist() == rb["query_id"].tolist()
    a, b = ra["gt_rank"].to_numpy(), rb["gt_rank"].to_numpy()
    assert (pairs["rank_a"].to_numpy() == a).all() and (pairs["rank_b"].to_numpy() == b).all()
    assert (pairs["rank_change"].to_numpy() == b - a).all()
    for k in (1, 5, 10):
        assert (pairs[f"is_hit_a_at_{k}"].to_numpy() == (a <= k)).all()
        assert (pairs[f"is_hit_b_at_{k}"].to_numpy() == (b <= k)).all()
    n = len(a)
    some_change = False
    for row, st in zip(view.itertuples(), stored.itertuples()):
        k = row.k
        ha, hb = a <= k, b <= k
        assert row.n_queries == n
        assert row.r_at_k_a == pytest.approx(ha.mean(), abs=1e-12)
        assert row.r_at_k_b == pytest.approx(hb.mean(), abs=1e-12)
        assert row.delta_pp == pytest.approx(round(100 * (hb.sum() - ha.sum()) / n, 2), abs=1e-9)
        assert row.n_fixed == int((~ha & hb).sum()) == st.n_fixed
        assert row.n_broken == int((ha & ~hb).sum()) == st.n_broken
        assert row.n_shared == int((~ha & ~hb).sum())
        assert row.n_neither == int((ha & hb).sum())
        assert row.n_fixed + row.n_broken + row.n_shared + row.n_neither == n
        assert row.mcnemar_p == pytest.approx(_mcnemar_reference(ha, hb), rel=1e-12)
        some_change = some_change or row.n_fixed > 0 or row.n_broken > 0
        # the stored interval is toolkit.stats' seeded paired bootstrap of these very hit vectors ...
        lo, hi = stats.paired_bootstrap_ci(ha, hb, seed=42)
        assert (st.ci_low_pp, st.ci_high_pp) == pytest.approx((100 * lo, 100 * hi), abs=1e-9)
        assert row.ci_low_pp == pytest.approx(round(100 * lo, 2))
        assert row.ci_high_pp == pytest.approx(round(100 * hi, 2))
        # ... and agrees with a plain index-resampling bootstrap (a different draw: within 1.5 pp)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, n, size=(4000, n))
        means = 100 * (hb[idx].mean(axis=1) - ha[idx].mean(axis=1))
        ref_lo, ref_hi = np.quantile(means, [0.025, 0.975])
        assert abs(st.ci_low_pp - ref_lo) < 1.5 and abs(st.ci_high_pp - ref_hi) < 1.5
        assert st.ci_low_pp <= 100 * (hb.mean() - ha.mean()) <= st.ci_high_pp
    assert some_change  # the two hand-built models differ, so the test exercises real deltas


def test_status_lists_each_comparison(study, run_cli):
    path, runs, _ = study
    run_cli("--db", path, "compare", runs["a"], runs["b"])
    con = open_study(path, read_only=True)
    try:
        cid, n, delta = con.execute(
            "SELECT run_comparison_id, n_queries, delta_pp FROM run_comparison "
            "WHERE retrieval_run_a_id = ? AND retrieval_run_b_id = ? AND k = 1 ORDER BY run_comparison_id LIMIT 1",
            [runs["a"], runs["b"]],
        ).fetchone()
    finally:
        con.close()
    out = run_cli("--db", path, "status").output
    row = next(line for line in out.splitlines() if f"comparison {cid}:" in line)
    assert row.split()[0] == "compare" and "hand-b vs hand-a" in row
    assert f"comparison {cid}: run {runs['b']} against run {runs['a']} (text-to-image)" in row
    assert f"{n} paired queries, ΔR@1 {delta:+.2f} pp" in row
    assert "no comparison of two retrieval runs yet" not in out


def test_failure_overlap_by_category_equals_the_labels_joined_with_both_ranks(study, run_cli):
    path, runs, _ = study
    run_cli("--db", path, "compare", runs["a"], runs["b"])
    con = open_study(path, read_only=True)
    try:
        cid = con.execute(
            "SELECT max(run_comparison_id) FROM run_comparisons "
            "WHERE retrieval_run_a_id = ? AND retrieval_run_b_id = ?",
            [runs["a"], runs["b"]],
        ).fetchone()[0]
        view = con.execute("SELECT * FROM failure_overlap_by_category WHERE run_comparison_id = ?", [cid]).df()
        labels = {
            key: con.execute(
                "SELECT caption_id, category FROM sample_labels WHERE retrieval_run_id = ?", [runs[key]]
            ).df()
            for key in ("a", "b")
        }
        ra, rb = _ranks(con, runs["a"]), _ranks(con, runs["b"])
    finally:
        con.close()
    rank_a = dict(zip(ra["query_id"], ra["gt_rank"]))
    rank_b = dict(zip(rb["query_id"], rb["gt_rank"]))
    la, lb = labels["a"], labels["b"]
    assert len(la) and len(lb)
    expected = {}
    for cat, g in la.groupby("category"):
        rb_ = np.array([rank_b[c] for c in g["caption_id"]])
        expected[cat] = {"n_labelled_a": len(g), "n_fixed": int((rb_ <= 1).sum()), "n_shared": int((rb_ > 1).sum())}
    for cat, g in lb.groupby("category"):
        ra_ = np.array([rank_a[c] for c in g["caption_id"]])
        expected.setdefault(cat, {"n_labelled_a": 0, "n_fixed": 0, "n_shared": 0})
        expected[cat] |= {"n_labelled_b": len(g), "n_broken": int((ra_ <= 1).sum())}
    got = view.set_index("category")
    assert set(got.index) == set(expected)
    for cat, e in expected.items():
        for col, value in e.items():
            assert got.loc[cat, col] == value, (cat, col)
        if "n_labelled_b" not in e:
            assert got.loc[cat, "n_broken"] == 0  # B has labels, just none in this category
        if e["n_labelled_a"]:
            assert float(got.loc[cat, "percent_fixed"]) == pytest.approx(
                math.floor(100 * 100 * e["n_fixed"] / e["n_labelled_a"] + 0.5) / 100
            )
    assert bool(view["is_simulated"].all())
    assert sum(e["n_labelled_a"] for e in expected.values()) == len(la)


def test_a_run_compared_with_itself_has_zero_deltas_and_says_so(study, run_cli):
    path, runs, _ = study
    out = run_cli("--db", path, "compare", runs["a"], runs["a"]).output
    assert "same run: every delta is zero" in out
    con = open_study(path, read_only=True)
    try:
        cid = con.execute(
            "SELECT run_comparison_id FROM run_comparisons WHERE retrieval_run_a_id = ? AND retrieval_run_b_id = ?",
            [runs["a"], runs["a"]],
        ).fetchone()[0]
        view = con.execute("SELECT * FROM run_comparison WHERE run_comparison_id = ?", [cid]).df()
        overlap = con.execute("SELECT * FROM failure_overlap_by_category WHERE run_comparison_id = ?", [cid]).df()
    finally:
        con.close()
    assert (view["delta_pp"] == 0).all() and (view["ci_low_pp"] == 0).all() and (view["ci_high_pp"] == 0).all()
    assert (view["n_fixed"] == 0).all() and (view["n_broken"] == 0).all() and (view["mcnemar_p"] == 1).all()
    assert view["is_same_run"].all()
    assert (overlap["n_fixed"] == 0).all() and (overlap["n_broken"] == 0).all()
    # another run of the same embeddings (top-5 stored instead of top-10) ranks identically: said too
    con = open_study(path)
    try:
        twin = evaluate(con, "s40", model="hand-a", device="cpu", topk=5).retrieval_run_id
    finally:
        con.close()
    assert twin != runs["a"]
    out = run_cli("--db", path, "compare", runs["a"], twin).output
    assert "rank every query identically: every delta is zero" in out


def test_the_same_comparison_again_is_a_noop_and_other_options_add_one(study, run_cli):
    path, runs, _ = study
    run_cli("--db", path, "compare", runs["b"], runs["a"], "--k", "1")
    con = open_study(path, read_only=True)
    before = (_count(con, "runs"), _count(con, "run_comparisons"), _count(con, "run_comparison_stats"))
    con.close()
    out = run_cli("--db", path, "compare", runs["b"], runs["a"], "--k", "1").output
    assert "already stored, nothing changed" in out
    con = open_study(path, read_only=True)
    assert (_count(con, "runs"), _count(con, "run_comparisons"), _count(con, "run_comparison_stats")) == before
    con.close()
    run_cli("--db", path, "compare", runs["b"], runs["a"], "--k", "1", "--seed", "7")
    con = open_study(path, read_only=True)
    assert _count(con, "run_comparisons") == before[1] + 1
    con.close()


def test_no_run_gains_from_ties_in_a_comparison(study, run_cli, tmp_path):
    """Run B gives every image the same score: counted optimistically every ground truth is first (R@1 = 100%),
    pessimistically last. The comparison's headline (view run_comparison, the stored interval and p-value,
    failure_overlap_by_category) counts the pessimistic hits, recomputed here from the rank rows."""
    import shutil

    path, runs, _ = study
    copy = tmp_path / "ties.duckdb"
    shutil.copy(path, copy)
    con = open_study(copy)
    try:
        sid, img_ids, caps = _members(con, "s40")
        img = np.tile(np.float32([1.0] + [0.0] * 15), (len(img_ids), 1))  # every image the same embedding
        txt = np.random.default_rng(5).normal(size=(len(caps), 16)).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        for kind, arr, ids in (("image", img, img_ids), ("text", txt, caps["caption_id"].to_numpy(np.int64))):
            cfg = {"kind": kind, "model": "hand-tied", "subset": "s40"}
            register_hand_built(con, tmp_path / f"{kind}.npy", kind, arr, ids, sid, model="hand-tied", config=cfg)
        tied = evaluate(con, "s40", model="hand-tied", device="cpu").retrieval_run_id
    finally:
        con.close()
    out = run_cli("--db", copy, "compare", runs["a"], tied, "--k", "1,5,10").output
    assert "Ties:" in out and "pessimistically" in out
    run_cli("--db", copy, "report", "--run", runs["a"], "--out", tmp_path / "report", "--no-figures")
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "TIES: the ground truth ties with other items for 0 queries in A and 200 in B" in html
    con = open_study(copy, read_only=True)
    try:
        cid = con.execute(
            "SELECT run_comparison_id FROM run_comparisons WHERE retrieval_run_b_id = ?", [tied]
        ).fetchone()[0]
        view = con.execute("SELECT * FROM run_comparison WHERE run_comparison_id = ? ORDER BY k", [cid]).df()
        ranks = {
            rr: con.execute(
                "SELECT gt_rank, n_tied FROM retrieval_ranks WHERE retrieval_run_id = ? ORDER BY query_id", [rr]
            ).df()
            for rr in (runs["a"], tied)
        }
        overlap = con.execute("SELECT * FROM failure_overlap_by_category WHERE run_comparison_id = ?", [cid]).df()
        labelled = con.execute("SELECT count(*) FROM sample_labels WHERE retrieval_run_id = ?", [runs["a"]]).fetchone()[
            0
        ]
    finally:
        con.close()
    a_rank = ranks[runs["a"]]["gt_rank"].to_numpy() + ranks[runs["a"]]["n_tied"].to_numpy()
    b_opt = ranks[tied]["gt_rank"].to_numpy()
    b_rank = b_opt + ranks[tied]["n_tied"].to_numpy()
    assert (b_opt == 1).all() and (b_rank == len(img_ids)).all()  # the premise: every image ties
    n = len(a_rank)
    assert view["is_tie_affected"].all() and (view["tie_count"] == "pessimistic").all()
    for row in view.itertuples():
        ha, hb = a_rank <= row.k, b_rank <= row.k
        assert row.r_at_k_b_optimistic == 1.0 and row.r_at_k_b == 0.0 == hb.mean()
        assert row.r_at_k_a == pytest.approx(ha.mean(), abs=1e-12)
        assert row.delta_pp == pytest.approx(round(100 * (hb.sum() - ha.sum()) / n, 2), abs=1e-9)
        assert row.delta_pp <= 0  # optimistically B would have gained up to 100 pp from its ties
        assert (row.n_fixed, row.n_broken) == (int((~ha & hb).sum()), int((ha & ~hb).sum()))
        assert (row.n_shared, row.n_neither) == (int((~ha & ~hb).sum()), int((ha & hb).sum()))
        assert row.mcnemar_p == pytest.approx(_mcnemar_reference(ha, hb), rel=1e-12)
        lo, hi = stats.paired_bootstrap_ci(ha, hb, seed=42)
        assert (row.ci_low_pp, row.ci_high_pp) == pytest.approx((round(100 * lo, 2), round(100 * hi, 2)))
        assert row.n_tied_queries_b == n
    # A's labelled failures: none is "fixed" by B's ties
    assert labelled > 0 and int(overlap["n_labelled_a"].sum()) == labelled
    assert int(overlap["n_fixed"].sum()) == 0 and (overlap["tie_count"] == "pessimistic").all()


def test_a_comparison_stored_before_ties_were_compared_gets_its_pessimistic_statistics(study, run_cli, tmp_path):
    """The pessimistic columns of an older comparison are NULL; the same compare again fills them in and changes
    nothing else. Two untied runs: the comparison is not tie-affected and headlines the optimistic count."""
    import shutil

    path, runs, _ = study
    copy = tmp_path / "old.duckdb"
    shutil.copy(path, copy)
    run_cli("--db", copy, "compare", runs["a"], runs["b"], "--k", "1,5", "--seed", "3")
    cols = "hits_a, hits_b, n_fixed, n_broken, ci_low_pp, ci_high_pp, mcnemar_p"
    pess = ", ".join(f"{c}_pessimistic" for c in cols.split(", "))
    con = open_study(copy)
    try:
        cid = con.execute("SELECT max(run_comparison_id) FROM run_comparisons").fetchone()[0]
        full = con.execute(f"SELECT k, {cols}, {pess} FROM run_comparison_stats WHERE run_comparison_id = ?", [cid])
        full = full.fetchall()
        con.execute(f"UPDATE run_comparison_stats SET ({pess}) = ({', '.join(['NULL'] * 7)})")
        n_runs = _count(con, "runs")
    finally:
        con.close()
    assert all(v is not None for row in full for v in row)
    out = run_cli("--db", copy, "compare", runs["a"], runs["b"], "--k", "1,5", "--seed", "3").output
    assert "already stored, nothing changed" in out and "Ties:" not in out
    con = open_study(copy, read_only=True)
    try:
        again = con.execute(f"SELECT k, {cols}, {pess} FROM run_comparison_stats WHERE run_comparison_id = ?", [cid])
        assert again.fetchall() == full and _count(con, "runs") == n_runs
        view = con.execute("SELECT * FROM run_comparison WHERE run_comparison_id = ?", [cid]).df()
    finally:
        con.close()
    assert not view["is_tie_affected"].any() and (view["tie_count"] == "optimistic").all()
    assert (view["r_at_k_a"] == view["r_at_k_a_optimistic"]).all()


@pytest.mark.parametrize(
    "which, args, message",
    [
        ("subset", ("a", "a_s20"), "subset 's40' and run"),
        ("direction", ("a", "a_i2t"), "is text-to-image and run"),
        ("unknown run", ("a", None), "There is no retrieval run 999"),
        ("bad k", ("a", "b", "--k", "1,x"), "--k must be comma-separated"),
        ("zero k", ("a", "b", "--k", "0,5"), "--k values must be from 1"),
    ],
)
def test_bad_input_is_one_message_and_writes_nothing(study, run_cli, which, args, message):
    path, runs, _ = study
    con = open_study(path, read_only=True)
    before = (_count(con, "runs"), _count(con, "run_comparisons"), _count(con, "run_comparison_stats"))
    con.close()
    ids = [str(runs[a]) if a in runs else ("999" if a is None else a) for a in args]
    out = run_cli("--db", path, "compare", *ids, expect=2)
    assert message in out.output and "Traceback" not in out.output
    con = open_study(path, read_only=True)
    assert (_count(con, "runs"), _count(con, "run_comparisons"), _count(con, "run_comparison_stats")) == before
    con.close()


def test_runs_that_do_not_rank_the_same_queries_are_refused(study, run_cli):
    path, runs, _ = study
    con = open_study(path)
    try:  # a copy of run B that lost one query (as if its subset had changed under it)
        copy = con.execute(
            """
            INSERT INTO retrieval_runs (subset_id, model, text_embedding_set_id, image_embedding_set_id, direction,
                                        tie_policy, topk, config_hash, created_at, run_id)
            SELECT subset_id, model, text_embedding_set_id, image_embedding_set_id, direction, tie_policy, topk,
                   'test-copy', created_at, run_id
            FROM retrieval_runs WHERE retrieval_run_id = ? RETURNING retrieval_run_id
            """,
            [runs["b"]],
        ).fetchone()[0]
        con.execute(
            "INSERT INTO retrieval_ranks SELECT * REPLACE (? AS retrieval_run_id) FROM retrieval_ranks "
            "WHERE retrieval_run_id = ? AND query_id > (SELECT min(query_id) FROM retrieval_ranks "
            "WHERE retrieval_run_id = ?)",
            [copy, runs["b"], runs["b"]],
        )
        before = _count(con, "run_comparisons")
    finally:
        con.close()
    try:
        out = run_cli("--db", path, "compare", runs["a"], copy, expect=2).output
        assert "do not rank the same queries (1 only in run" in out and "0 only in run" in out
        con = open_study(path, read_only=True)
        assert _count(con, "run_comparisons") == before
        con.close()
    finally:
        con = open_study(path)
        con.execute("DELETE FROM retrieval_ranks WHERE retrieval_run_id = ?", [copy])
        con.execute("DELETE FROM retrieval_runs WHERE retrieval_run_id = ?", [copy])
        con.close()


def test_report_has_the_comparison_section(study, tmp_path):
    from toolkit.report.page import write_report

    path, runs, _ = study
    con = open_study(path)
    try:
        from toolkit.retrieval.compare import compare

        res = compare(con, runs["a"], runs["b"])
        out = write_report(con, out_dir=tmp_path / "report", db_path=str(path))
        view = con.execute(
            "SELECT k, delta_pp FROM run_comparison WHERE run_comparison_id = ? ORDER BY k", [res.run_comparison_id]
        ).df()
    finally:
        con.close()
    html = out.html_path.read_text(encoding="utf-8")
    assert any("comparison" in s.lower() for s in out.sections)
    cid = res.run_comparison_id
    assert f'data-name="run_comparison_{cid}"' in html and f'data-name="failure_overlap_{cid}"' in html
    names = {p.name for p in out.figures}
    assert any(n.endswith(f"rank_scatter_{cid}.png") for n in names)
    assert any(n.endswith(f"fixed_broken_shared_{cid}.png") for n in names)
    csv = pd.read_csv(tmp_path / "report" / "tables" / f"run_comparison_{cid}.csv")
    assert csv["delta_pp"].tolist() == pytest.approx(view["delta_pp"].tolist())


# --------------------------------------------------------------------------- benchmark


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    save_random_checkpoint(root / "tiny-seed0.safetensors", spec=TINY_CONFIG, seed=0)
    save_random_checkpoint(root / "tiny-seed1.safetensors", spec=TINY_CONFIG, seed=1)
    return root


def test_benchmark_runs_each_model_reuses_done_runs_and_names_a_bad_line(
    run_cli, tmp_path, synthetic_coco, two_checkpoints
):
    dbp = str(tmp_path / "bench.duckdb")
    run_cli("--db", dbp, "ingest", "--coco-root", synthetic_coco, "--num-images", "8", "--name", "s8")
    models = tmp_path / "models.txt"
    models.write_text(
        "# two seeds of the tiny config, saved as checkpoints\n"
        f"tiny-clip,{two_checkpoints / 'tiny-seed0.safetensors'}\n"
        "\n"
        "no-such-model-xyz,openai\n"
        f"tiny-clip,{two_checkpoints / 'tiny-seed1.safetensors'}\n",
        encoding="utf-8",
    )
    csv = tmp_path / "bench.csv"
    args = ("--db", dbp, "benchmark", "--models", models, "--device", "cpu", "--csv", csv)
    out = run_cli(*args, expect=1)
    assert "line 4 (no-such-model-xyz,openai): failed" in out.output
    assert "Unknown model 'no-such-model-xyz'" in out.output
    con = open_study(dbp, read_only=True)
    try:
        recall = con.execute("SELECT * FROM recall_summary ORDER BY retrieval_run_id").df()
        sets = con.execute("SELECT checkpoint_sha256, kind FROM embedding_sets").df()
        n_runs = _count(con, "runs")
    finally:
        con.close()
    assert len(recall) == 4 and sorted(recall["direction"]) == ["image-to-text"] * 2 + ["text-to-image"] * 2
    assert sets["checkpoint_sha256"].nunique() == 2 and len(sets) == 4  # nothing for the bad line
    table = pd.read_csv(csv)
    assert table["line"].tolist() == [2, 5]
    for row in table.itertuples():
        for d, col in (("text-to-image", "t2i"), ("image-to-text", "i2t")):
            rid = getattr(row, f"{col}_retrieval_run_id")
            rec = recall.set_index("retrieval_run_id").loc[rid]
            assert rec["direction"] == d
            for k in (1, 5, 10):
                assert getattr(row, f"{col}_r_at_{k}") == pytest.approx(rec[f"r_at_{k}"], abs=1e-12)
        assert row.device == "cpu" and row.embed_seconds > 0
    # run again: every done run is reused, nothing is added; the CSV (unchanged lines) may be rewritten
    out2 = run_cli(*args, expect=1)
    assert out2.output.count(": already done") == 2
    con = open_study(dbp, read_only=True)
    assert _count(con, "runs") == n_runs
    con.close()
    # a CSV edited by hand is never overwritten
    csv.write_text(csv.read_text(encoding="utf-8") + "my note,,,\n", encoding="utf-8")
    edited = csv.read_bytes()
    bad = run_cli(*args, expect=2)
    assert "holds lines this table would not keep" in bad.output and csv.read_bytes() == edited

    # the two checkpoints are two models: compare their text-to-image runs, numbers from the rank rows
    t2i = table["t2i_retrieval_run_id"].tolist()
    run_cli("--db", dbp, "compare", t2i[0], t2i[1])
    con = open_study(dbp, read_only=True)
    try:
        view = con.execute(
            "SELECT * FROM run_comparison WHERE retrieval_run_a_id = ? AND retrieval_run_b_id = ? ORDER BY k", t2i
        ).df()
        a, b = _ranks(con, t2i[0])["gt_rank"].to_numpy(), _ranks(con, t2i[1])["gt_rank"].to_numpy()
    finally:
        con.close()
    assert list(view["weights_a"].str[:10]) == ["checkpoint"] * 3 and view["weights_a"][0] != view["weights_b"][0]
    for row in view.itertuples():
        ha, hb = a <= row.k, b <= row.k
        assert row.r_at_k_a == pytest.approx(ha.mean()) and row.r_at_k_b == pytest.approx(hb.mean())
        assert (row.n_fixed, row.n_broken) == (int((~ha & hb).sum()), int((ha & ~hb).sum()))


def test_benchmark_file_problems_are_one_message(run_cli, tmp_path, synthetic_coco):
    dbp = str(tmp_path / "bench.duckdb")
    run_cli("--db", dbp, "ingest", "--coco-root", synthetic_coco, "--num-images", "4", "--name", "s4")
    missing = run_cli("--db", dbp, "benchmark", "--models", tmp_path / "nope.txt", expect=2)
    assert "Models file" in missing.output and "not found" in missing.output
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n", encoding="utf-8")
    assert "names no model" in run_cli("--db", dbp, "benchmark", "--models", empty, expect=2).output
    bad = tmp_path / "bad.txt"
    bad.write_text("tiny-clip,a,b\ntiny-clip,/no/such/weights.pt\n", encoding="utf-8")
    out = run_cli("--db", dbp, "benchmark", "--models", bad, "--device", "cpu", expect=1).output
    assert "line 1 (tiny-clip,a,b)" in out and "more than two fields" in out
    assert "line 2" in out and "does not exist" in out
    con = open_study(dbp, read_only=True)
    assert _count(con, "embedding_sets") == 0 and _count(con, "retrieval_runs") == 0
    con.close()


def test_benchmark_reports_a_line_whose_stage_fails_and_runs_the_next(run_cli, tmp_path, synthetic_coco, monkeypatch):
    import toolkit.embed.stage

    dbp = str(tmp_path / "bench.duckdb")
    run_cli("--db", dbp, "ingest", "--coco-root", synthetic_coco, "--num-images", "4", "--name", "s4")
    calls = []

    def failing_embed(database, subset_name=None, model="", **kwargs):
        calls.append(model)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(toolkit.embed.stage, "embed", failing_embed)
    models = tmp_path / "models.txt"
    models.write_text("tiny-clip\ntiny-clip,tiny.safetensors\n", encoding="utf-8")
    (tmp_path / "tiny.safetensors").write_bytes(b"x")
    out = run_cli("--db", dbp, "benchmark", "--models", models, "--device", "cpu", expect=1).output
    assert calls == ["tiny-clip", "tiny-clip"]  # the second line ran after the first one failed
    assert "line 1 (tiny-clip): unexpected RuntimeError: CUDA out of memory (simulated)" in out
    assert "line 2 (tiny-clip,tiny.safetensors): unexpected RuntimeError" in out


def test_benchmark_checks_its_csv_before_any_model_runs(run_cli, tmp_path, synthetic_coco, monkeypatch):
    """Issue 24, items 5, 13 and 14d: a --csv that cannot or must not be written is refused before the work."""
    import duckdb

    import toolkit.embed.stage

    dbp = tmp_path / "bench.duckdb"
    run_cli("--db", dbp, "ingest", "--coco-root", synthetic_coco, "--num-images", "4", "--name", "s4")
    calls = []

    def embed_that_records(database, subset_name=None, model="", **kwargs):
        calls.append(model)
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(toolkit.embed.stage, "embed", embed_that_records)
    models = tmp_path / "models.txt"
    models.write_text("tiny-clip\n", encoding="utf-8")
    (tmp_path / "bench_cache" / "embeddings").mkdir(parents=True)
    duckdb.connect(str(tmp_path / "other.duckdb")).close()
    os.mkfifo(tmp_path / "pipe.csv")
    for target, needle in (
        ("/proc/1/x.csv", "does not take new files"),
        (tmp_path / "no" / "such" / "b.csv", "does not exist"),
        (f"{dbp}.wal", "write-ahead log"),
        (tmp_path / "bench_cache" / "embeddings" / "b.csv", "cache folder"),
        (tmp_path / "other.duckdb", "DuckDB database file"),
        (tmp_path / "pipe.csv", "FIFO"),
    ):
        res = run_cli("--db", dbp, "benchmark", "--models", models, "--device", "cpu", "--csv", target, expect=None)
        assert res.exit_code == 2 and res.output.count("Error:") == 1 and needle in res.output, (target, res.output)
        assert calls == [], target  # no model ran
    assert not Path(f"{dbp}.wal").exists() and not (tmp_path / "no").exists()
    res = run_cli("--db", dbp, "benchmark", "--models", tmp_path / "pipe.csv", expect=2)
    assert "Models file" in res.output and "FIFO" in res.output and calls == []
