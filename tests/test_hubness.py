"""Hubness diagnostics (views image_hubness, hubness_summary) and the training-free methods of
toolkit.improve.transforms (inverted softmax, QB-Norm with the Dynamic Inverted Softmax, query expansion),
each checked against a plain full-matrix NumPy reference on seeded random data."""

from __future__ import annotations

import csv
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from toolkit.improve import stage as imp
from toolkit.improve import transforms as H
from toolkit.retrieval import ranking as R
from toolkit.store import db
from toolkit.store.study import open_study


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def np_ranks(T, gt):
    g = T[np.arange(len(gt)), gt]
    return 1 + (T > g[:, None]).sum(1), (T == g[:, None]).sum(1) - 1


def np_logsumexp_cols(S, beta):
    x = beta * S.astype(np.float64)
    m = x.max(0)
    return m + np.log(np.exp(x - m).sum(0))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    G = unit(rng, 300)
    Q = unit(rng, 700)  # more than one GEMM block
    B = unit(rng, 1100)
    gt = rng.integers(0, 300, size=700)
    return Q, G, B, gt


def test_baseline_ranks_equal_evaluate(data):
    Q, G, _, gt = data
    ours = H.rank_baseline(Q, G, gt)
    ev = R.rank_text_to_image(Q, G, gt, device="cpu")
    assert np.array_equal(ours.gt_rank, ev.gt_rank)
    assert np.array_equal(ours.n_tied, ev.n_tied)
    assert np.array_equal(ours.gt_score.astype(np.float32), ev.gt_score)


def test_inverted_softmax_matches_numpy(data):
    Q, G, B, gt = data
    beta = 20.0
    r = H.rank_inverted_softmax(Q, G, gt, B, beta)
    S = Q @ G.T
    T = beta * S.astype(np.float64) - np_logsumexp_cols(B @ G.T, beta)[None, :]
    rank, tied = np_ranks(T, gt)
    assert np.array_equal(r.gt_rank, rank) and np.array_equal(r.n_tied, tied)
    # the change is real on this data (a test that cannot fail would pass on baseline ranks too)
    assert not np.array_equal(r.gt_rank, np_ranks(S, gt)[0])


def test_bank_normaliser_does_not_depend_on_block_split(data):
    _, G, B, _ = data
    st = H.bank_stats(B, G, 20.0, 1)
    # the reference folds the same float32 scores (evaluate's GEMM blocks; NumPy's own BLAS may round B @ G.T
    # differently in the last bit, which beta scales to ~1e-6) in one piece
    assert np.allclose(st.log_norm, np_logsumexp_cols(H.raw_scores(B, G), 20.0), rtol=0, atol=1e-12)
    # large beta: no overflow in the log domain
    st = H.bank_stats(B, G, 5000.0, 1)
    assert np.isfinite(st.log_norm).all()


def test_qb_norm_matches_numpy_reference(data):
    Q, G, B, gt = data
    beta, kb, B = 20.0, 2, B[:60]  # a small bank: some items are activated, not all
    r = H.rank_qb_norm(Q, G, gt, B, beta, kb)
    SB = B @ G.T
    act = np.zeros(G.shape[0], bool)
    act[np.argsort(-SB, axis=1, kind="stable")[:, :kb].reshape(-1)] = True
    S = Q @ G.T
    T = S.astype(np.float64)
    norm = act[np.argmax(S, axis=1)]
    T[norm] = beta * T[norm] - np_logsumexp_cols(SB, beta)[None, :]
    rank, tied = np_ranks(T, gt)
    assert np.array_equal(r.gt_rank, rank) and np.array_equal(r.n_tied, tied)
    assert r.n_normalised == int(norm.sum()) and 0 < r.n_normalised < len(Q)


def test_qb_norm_empty_effect_changes_no_rank():
    """A bank whose activated items are never an evaluated query's top-1 leaves every rank unchanged."""
    rng = np.random.default_rng(1)
    G = unit(rng, 40)
    noise = lambda n: 0.05 * rng.standard_normal((n, 16)).astype(np.float32)  # noqa: E731
    Q = G[np.arange(200) % 20] + noise(200)  # queries near items 0..19
    B = G[20 + np.arange(300) % 20] + noise(300)  # bank near items 20..39
    gt = rng.integers(0, 40, size=200)
    base = H.rank_baseline(Q, G, gt)
    st = H.bank_stats(B, G, 20.0, 1)
    assert st.n_activated > 0 and not st.activated[np.argmax(Q @ G.T, axis=1)].any()  # the premise
    r = H.rank_qb_norm_with(Q, G, gt, st)
    assert r.n_normalised == 0
    assert np.array_equal(r.gt_rank, base.gt_rank) and np.array_equal(r.n_tied, base.n_tied)
    # the same bank with every item activated (k_bank = M) is the plain inverted softmax
    full = H.rank_qb_norm(Q, G, gt, B, 20.0, 40)
    inv = H.rank_inverted_softmax(Q, G, gt, B, 20.0)
    assert np.array_equal(full.gt_rank, inv.gt_rank) and not np.array_equal(full.gt_rank, base.gt_rank)


def test_uniform_normaliser_changes_no_rank():
    """Inverted softmax with a normaliser that is the same for every item (a bank with no hub: every bank
    query is equally far from every item, here orthogonal to them all) keeps every rank."""
    rng = np.random.default_rng(2)
    G, B = unit(rng, 50), unit(rng, 30)
    G[:, 8:] = 0  # the gallery in the first 8 dimensions, the bank in the last 8: every bank score is 0
    B[:, :8] = 0
    Q = unit(rng, 100)
    gt = rng.integers(0, 50, size=100)
    assert np.ptp(H.bank_stats(B, G, 7.0).log_norm) == 0
    r = H.rank_inverted_softmax(Q, G, gt, B, 7.0)
    base = H.rank_baseline(Q, G, gt)
    assert np.array_equal(r.gt_rank, base.gt_rank) and np.array_equal(r.n_tied, base.n_tied)


def test_query_expansion_matches_numpy_and_alpha_zero_is_baseline(data):
    Q, G, _, gt = data
    top, alpha = 3, 0.7
    r = H.rank_query_expansion(Q, G, gt, top, alpha)
    S = Q @ G.T
    ti = np.argsort(-S, axis=1, kind="stable")[:, :top]
    Qe = Q + np.float32(alpha) * G[ti].mean(axis=1)
    rank, tied = np_ranks(Qe @ G.T, gt)
    assert np.array_equal(r.gt_rank, rank) and np.array_equal(r.n_tied, tied)
    assert not np.array_equal(r.gt_rank, np_ranks(S, gt)[0])
    zero = H.rank_query_expansion(Q, G, gt, top, 0.0)
    base = H.rank_baseline(Q, G, gt)
    assert np.array_equal(zero.gt_rank, base.gt_rank) and np.array_equal(zero.gt_score, base.gt_score)


def test_stable_topk_breaks_ties_by_lower_index():
    S = np.array([[0.5, 0.9, 0.9, 0.1, 0.9]], np.float32)
    assert H.stable_topk(S, 2).tolist() == [[1, 2]]
    assert H.stable_topk(S, 4).tolist() == [[1, 2, 4, 0]]


@pytest.mark.parametrize("beta", [0, -1.0, float("nan"), float("inf"), 1e-20, 5e-324, 1e7])
def test_non_positive_beta_refused(data, beta):
    Q, G, B, gt = data
    with pytest.raises(ValueError, match="beta"):
        H.rank_qb_norm(Q, G, gt, B, beta, 1)


def test_bad_top_and_alpha_refused(data):
    Q, G, _, gt = data
    with pytest.raises(ValueError, match="top"):
        H.rank_query_expansion(Q, G, gt, 0, 0.5)
    for alpha in (-0.1, float("nan"), float("inf"), 1e308):  # 1e308 overflowed float32 into NaN scores
        with pytest.raises(ValueError, match="alpha"):
            H.rank_query_expansion(Q, G, gt, 2, alpha)


# ------------------------------------------------------------------------------ views on a real database

MODEL = "hand-built-16d"


def _skew(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.mean()
    return ((x - m) ** 3).mean() / ((x - m) ** 2).mean() ** 1.5


@pytest.fixture(scope="module")
def hub_world(synthetic_coco_master, tmp_path_factory):
    """A 30-image study with hand-built embeddings (image 0 is a planted hub) and both directions evaluated."""
    from helpers import register_hand_built

    from toolkit.ingest.stage import ingest
    from toolkit.retrieval.evaluate import evaluate

    root = tmp_path_factory.mktemp("hub_world")
    path = str(root / "hub.duckdb")
    con = open_study(path)
    ingest(con, coco_root=synthetic_coco_master, num_images=30, captions_per_image=5, seed=42, name="s30")
    sid = int(db.get_subset(con, "s30")["subset_id"])
    img_ids = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute(
        "SELECT c.caption_id, c.image_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
        "WHERE c.subset_id = ? ORDER BY i.position, c.position",
        [sid],
    ).df()
    img_ids = img_ids["image_id"].to_numpy(np.int64)
    rng = np.random.default_rng(5)
    img = unit(rng, len(img_ids))
    row_of = {int(i): r for r, i in enumerate(img_ids)}
    gt_rows = np.array([row_of[int(i)] for i in caps["image_id"]])
    hub = unit(rng, 1)[0]
    img[0] = hub  # a hub: every caption leans towards it
    txt = img[gt_rows] + 0.8 * hub + 1.5 * rng.standard_normal((len(gt_rows), 16)).astype(np.float32) / 4
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    txt[1] = img.sum(0) / np.linalg.norm(img.sum(0))  # a caption hub for image-to-text
    img, txt = img.astype(np.float32), txt.astype(np.float32)
    cfg = {"test": "hub"}
    register_hand_built(con, root / "img.npy", "image", img, img_ids, sid, model=MODEL, config=cfg | {"k": "i"})
    register_hand_built(con, root / "txt.npy", "text", txt, caps["caption_id"], sid, model=MODEL, config=cfg)
    t2i = evaluate(con, "s30", model=MODEL, device="cpu").retrieval_run_id
    i2t = evaluate(con, "s30", model=MODEL, device="cpu", direction="image-to-text").retrieval_run_id
    con.close()
    shutil.copy(path, root / "unlabelled.duckdb")  # beside it: the .npy paths are stored relative to the folder
    _label(path, root / "fa")
    return {
        "path": path,
        "unlabelled": str(root / "unlabelled.duckdb"),
        "img": img,
        "txt": txt,
        "img_ids": img_ids,
        "cap_ids": caps["caption_id"].to_numpy(np.int64),
        "gt_rows": gt_rows,
        "t2i": t2i,
        "i2t": i2t,
    }


CATS = ["Object", "Attribute", "Count", "Ambiguous", "Action", "Spatial", "Context"]


def _label(path, out):
    """sample-failures, then every annotator file labelled by cycling through the categories."""
    from click.testing import CliRunner

    from cli import cli

    def run(*args):
        res = CliRunner().invoke(cli, ["--db", str(path), *map(str, args)])
        assert res.exit_code == 0, res.output

    run("sample-failures", "--run", 1, "--n", 40, "--overlap", 4, "--per-annotator", 12, "--out", out, "--no-pictures")
    k = 0
    for name in ["assign_A.csv", "assign_B.csv", "assign_C.csv", "assign_overlap.csv"]:
        with open(out / name, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            r["category"] = CATS[k % len(CATS)]
            k += 1
        with open(out / name, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    run("import-labels", out / "assign_A.csv", out / "assign_B.csv", out / "assign_C.csv")
    for a in "ABC":
        run("import-labels", out / "assign_overlap.csv", "--annotator", a)


def _reference(Qm, Gm, gallery_ids, gt_of_query):
    """N_1, N_10, hub flags and the failures' hub share from a plain full score matrix."""
    S = Qm @ Gm.T
    order = np.argsort(-S, axis=1, kind="stable")
    n1 = np.bincount(order[:, 0], minlength=len(Gm))
    n10 = np.bincount(order[:, :10].reshape(-1), minlength=len(Gm))
    thr = int(np.ceil(3.0 * min(10, len(Gm)) * len(Qm) / len(Gm)))
    hub = n10 >= thr
    return dict(zip(gallery_ids, zip(n1, n10, hub))), thr, n1, n10, order[:, 0]


def test_image_hubness_and_summary_equal_numpy(hub_world):
    w = hub_world
    con = open_study(w["path"], read_only=True)
    try:
        for direction, rrid in (("text-to-image", w["t2i"]), ("image-to-text", w["i2t"])):
            if direction == "text-to-image":
                Qm, Gm, gids = w["txt"], w["img"], w["img_ids"]
                gt = w["gt_rows"]
                S = Qm @ Gm.T
                failed = S[np.arange(len(gt)), gt][:, None] < S
                is_fail = failed.any(1)
            else:
                Qm, Gm, gids = w["img"], w["txt"], w["cap_ids"]
                S = Qm @ Gm.T
                best = np.array([S[j, w["gt_rows"] == j].max() for j in range(len(Qm))])
                is_fail = (S > best[:, None]).any(1)
            ref, thr, n1, n10, top1 = _reference(Qm, Gm, gids, None)
            got = con.execute(
                "SELECT gallery_id, n_1, n_10, is_hub, hub_threshold FROM image_hubness WHERE retrieval_run_id = ?",
                [rrid],
            ).fetchall()
            assert len(got) == len(Gm)
            assert {int(g): (int(a), int(b), bool(h)) for g, a, b, h, _ in got} == {
                int(g): (int(a), int(b), bool(h)) for g, (a, b, h) in ref.items()
            }
            assert {int(t) for *_, t in got} == {thr}
            s = con.execute("SELECT * FROM hubness_summary WHERE retrieval_run_id = ?", [rrid]).df().iloc[0]
            assert s["direction"] == direction
            assert s["skewness_n10"] == pytest.approx(_skew(n10), rel=1e-9)
            assert s["skewness_n1"] == pytest.approx(_skew(n1), rel=1e-9)
            assert s["share_never_top10"] == pytest.approx(float((n10 == 0).mean()))
            hub = n10 >= thr
            assert int(s["n_hubs"]) == int(hub.sum())
            assert int(s["n_r1_failures"]) == int(is_fail.sum())
            assert s["share_r1_failures_top1_hub"] == pytest.approx(float(hub[top1[is_fail]].mean()))
        t2i = con.execute("SELECT * FROM hubness_summary WHERE retrieval_run_id = ?", [w["t2i"]]).df().iloc[0]
        assert t2i["skewness_n10"] > 0 and t2i["max_n1"] > 30  # the planted hub shows
        # 150 captions x top 10 over 30 images: the threshold is every caption, which no image reaches
        assert t2i["hub_threshold"] == 150 and t2i["n_hubs"] == 0
        i2t = con.execute("SELECT * FROM hubness_summary WHERE retrieval_run_id = ?", [w["i2t"]]).df().iloc[0]
        assert i2t["hub_threshold"] == 6 and i2t["n_hubs"] >= 1  # flags are checked against NumPy above
        top = con.execute(
            "SELECT gallery_id FROM image_hubness WHERE retrieval_run_id = ? ORDER BY n_10 DESC LIMIT 1", [w["t2i"]]
        ).fetchone()[0]
        assert top == w["img_ids"][0]
    finally:
        con.close()


def test_report_has_hubness_section(hub_world, tmp_path, run_cli):

    w = hub_world
    path = tmp_path / "copy.duckdb"
    shutil.copy(w["path"], path)
    out = tmp_path / "rep"
    res = run_cli("--db", path, "report", "--out", out, "--run", w["t2i"])
    assert "9. Hubness" in res.output
    html = (out / "report.html").read_text()
    assert 'id="hubness"' in html and "images most often retrieved in a top 10" in html
    import pandas as pd

    csv = pd.read_csv(out / "tables" / "hubness_summary.csv")
    assert sorted(csv["direction"]) == ["image-to-text", "text-to-image"]
    con = open_study(path, read_only=True)
    try:
        view = con.execute("SELECT skewness_n10 FROM hubness_summary WHERE retrieval_run_id = ?", [w["t2i"]]).fetchone()
    finally:
        con.close()
    assert csv.loc[csv["retrieval_run_id"] == w["t2i"], "skewness_n10"].iloc[0] == pytest.approx(view[0])
    top = pd.read_csv(out / "tables" / "top_hubs.csv")
    assert top["gallery_id"].iloc[0] == w["img_ids"][0]
    assert len(list((out / "figures").glob("*_hubness.png"))) == 1 and len(list((out / "figures").glob("*_hubs.png")))


# ------------------------------------------------------------------------------ improvement runs of the methods


@pytest.fixture
def lab(hub_world, tmp_path):
    """A private copy of the labelled hub world, in the same folder (embedding paths are stored relative)."""
    import uuid
    from pathlib import Path

    w = dict(hub_world)
    dest = Path(w["path"]).with_name(f"copy-{uuid.uuid4().hex[:8]}.duckdb")
    shutil.copy(w["path"], dest)
    w["path"] = str(dest)
    yield w
    dest.unlink()


def _ranks(con, imp_id):
    return con.execute(
        "SELECT caption_id, baseline_rank, improved_rank, improved_score, category FROM improvement_ranks "
        "WHERE improvement_id = ? ORDER BY caption_id",
        [imp_id],
    ).df()


def _rows(w, caption_ids):
    cap_row = {int(c): i for i, c in enumerate(w["cap_ids"])}
    rows = np.array([cap_row[int(c)] for c in caption_ids])
    return rows, w["gt_rows"][rows]


def test_qb_norm_run_matches_numpy_and_is_recorded(lab):
    w = lab
    con = open_study(w["path"])
    try:
        res = imp.improve_method(con, "qb-norm", "Object,Attribute,Count", beta=20.0, k_bank=1,
                               control="successes:20", retrieval_run_id=w["t2i"])  # fmt: skip
        assert res.run_id is not None and len(res.improvement_ids) == 2
        runs = con.execute(
            "SELECT improvement_id, population, method, method_params, bank_subset, n_bank, is_bank_overlap, pooling "
            "FROM improvement_runs ORDER BY improvement_id"
        ).df()
        evaluated = set()
        for imp_id in res.improvement_ids:
            evaluated |= set(_ranks(con, imp_id)["caption_id"])
        assert list(runs["method"]) == ["qb-norm", "qb-norm"] and runs["pooling"].isna().all()  # NULL: no pooling
        assert runs["method_params"].iloc[0] == "beta=20 k_bank=1 bank=s30"
        assert runs["bank_subset"].iloc[0] == "s30" and not runs["is_bank_overlap"].iloc[0]
        assert int(runs["n_bank"].iloc[0]) == 150 - len(evaluated)
        # NumPy reference: the bank is every caption not evaluated
        bank_mask = ~np.isin(w["cap_ids"], list(evaluated))
        SB = w["txt"][bank_mask] @ w["img"].T
        act = np.zeros(len(w["img"]), bool)
        act[np.argmax(SB, axis=1)] = True
        lse = np_logsumexp_cols(SB, 20.0)
        for imp_id in res.improvement_ids:
            df = _ranks(con, imp_id)
            rows, gt = _rows(w, df["caption_id"])
            S = w["txt"][rows] @ w["img"].T
            T = S.astype(np.float64)
            norm = act[np.argmax(S, axis=1)]
            T[norm] = 20.0 * T[norm] - lse[None, :]
            assert np.array_equal(df["improved_rank"].to_numpy(), np_ranks(T, gt)[0])
            assert np.array_equal(df["baseline_rank"].to_numpy(), np_ranks(S, gt)[0])
        stats = con.execute("SELECT count(*) FROM improvement_stats WHERE improvement_id = ?", [res.improvement_ids[0]])
        assert stats.fetchone()[0] >= 3
        # the same call again is a no-op
        n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        again = imp.improve_method(con, "qb-norm", "Object,Attribute,Count", beta=20.0, k_bank=1,
                                 control="successes:20", retrieval_run_id=w["t2i"])  # fmt: skip
        assert again.is_noop and again.improvement_ids == res.improvement_ids
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_runs
    finally:
        con.close()


def test_inverted_softmax_and_query_expansion_runs(lab):
    w = lab
    con = open_study(w["path"])
    try:
        inv = imp.improve_method(con, "inverted-softmax", "Object,Attribute", beta=10.0, retrieval_run_id=w["t2i"])
        df = _ranks(con, inv.improvement_ids[0])
        rows, gt = _rows(w, df["caption_id"])
        S = w["txt"][rows] @ w["img"].T
        T = 10.0 * S.astype(np.float64) - np_logsumexp_cols(w["txt"] @ w["img"].T, 10.0)[None, :]
        assert np.array_equal(df["improved_rank"].to_numpy(), np_ranks(T, gt)[0])
        qe = imp.improve_method(con, "query-expansion", "Object,Attribute", top=2, alpha=0.0, retrieval_run_id=w["t2i"])
        df0 = _ranks(con, qe.improvement_ids[0])
        assert np.array_equal(df0["improved_rank"], df0["baseline_rank"])  # alpha 0 reproduces the baseline
        qe1 = imp.improve_method(
            con, "query-expansion", "Object,Attribute", top=2, alpha=1.0, retrieval_run_id=w["t2i"]
        )
        df1 = _ranks(con, qe1.improvement_ids[0])
        ti = np.argsort(-S, axis=1, kind="stable")[:, :2]
        Qe = w["txt"][rows] + np.float32(1.0) * w["img"][ti].mean(axis=1)
        assert np.array_equal(df1["improved_rank"].to_numpy(), np_ranks(Qe @ w["img"].T, gt)[0])
    finally:
        con.close()


def test_bank_overlap_refused_unless_allowed_and_empty_bank_refused(lab):
    from toolkit.errors import UserError

    w = lab
    con = open_study(w["path"])
    try:
        before = con.execute("SELECT count(*) FROM improvement_runs").fetchone()[0]
        with pytest.raises(UserError, match="allow-bank-overlap"):
            imp.improve_method(con, "qb-norm", "Object", bank="s30", retrieval_run_id=w["t2i"])
        with pytest.raises(UserError, match="bank is empty"):
            imp.improve_method(con, "qb-norm", "Object", control="all", retrieval_run_id=w["t2i"])
        assert con.execute("SELECT count(*) FROM improvement_runs").fetchone()[0] == before
        res = imp.improve_method(
            con, "qb-norm", "Object", bank="s30", allow_bank_overlap=True, retrieval_run_id=w["t2i"]
        )
        flag = con.execute(
            "SELECT is_bank_overlap, n_bank FROM improvement_runs WHERE improvement_id = ?", [res.improvement_ids[0]]
        ).fetchone()
        assert flag == (True, 150)
    finally:
        con.close()


def test_methods_refuse_bad_parameters_and_missing_labels(lab):
    from toolkit.errors import UserError

    w = lab
    con = open_study(w["unlabelled"])
    try:
        with pytest.raises(UserError, match="No labels have been imported"):
            imp.improve_method(con, "qb-norm", "Object")
    finally:
        con.close()
    con = open_study(w["path"])
    try:
        for kw, msg in (({"beta": 0}, "--beta"), ({"beta": -2}, "--beta"), ({"k_bank": 0}, "--k-bank")):
            with pytest.raises(UserError, match=msg):
                imp.improve_method(con, "qb-norm", "Object", **kw)
        with pytest.raises(UserError, match="--top"):
            imp.improve_method(con, "query-expansion", "Object", top=0)
        with pytest.raises(UserError, match="--alpha"):
            imp.improve_method(con, "query-expansion", "Object", alpha=-1)
        with pytest.raises(UserError, match="--beta"):
            imp.improve_method(con, "inverted-softmax", "Object", beta=float("nan"))
        assert con.execute("SELECT count(*) FROM improvement_runs").fetchone()[0] == 0
    finally:
        con.close()


def test_method_comparison_view_equals_python(lab):
    w = lab
    con = open_study(w["path"])
    try:
        qb = imp.improve_method(con, "qb-norm", "Object,Attribute,Count", beta=30.0, control="all", bank="s30",
                              allow_bank_overlap=True,
                              retrieval_run_id=w["t2i"])  # fmt: skip
        qe = imp.improve_method(con, "query-expansion", "Object,Attribute,Count", top=2, alpha=1.0,
                              retrieval_run_id=w["t2i"])  # fmt: skip
        mc = con.execute("SELECT * FROM method_comparison WHERE retrieval_run_id = ?", [w["t2i"]]).df()
        for imp_id in (qb.improvement_ids[0], qe.improvement_ids[0]):
            ranks = _ranks(con, imp_id)
            groups = [("*", ranks)] + list(ranks.groupby("category"))
            for cat, g in groups:
                row = mc[(mc["improvement_id"] == imp_id) & (mc["category"] == cat)]
                assert len(row) == 1
                row = row.iloc[0]
                assert row["n"] == len(g)
                for k in (1, 5, 10):
                    b = 100 * (g["baseline_rank"] <= k).mean()
                    a = 100 * (g["improved_rank"] <= k).mean()
                    assert row[f"baseline_r{k}_pct"] == pytest.approx(round(b, 2))
                    assert row[f"improved_r{k}_pct"] == pytest.approx(round(a, 2))
                    assert row[f"delta_r{k}_pp"] == pytest.approx(round(a - b, 2))
                st = con.execute(
                    "SELECT ci_low_pp, mcnemar_p FROM improvement_stats WHERE improvement_id = ? AND category = ? "
                    "AND k = 1",
                    [imp_id, cat],
                ).fetchone()
                assert row["ci_low_r1_pp"] == pytest.approx(round(st[0], 2)) and row["mcnemar_p_r1"] == st[1]
        ctl = _ranks(con, qb.improvement_ids[1])
        share = ((ctl["baseline_rank"] <= 1) & (ctl["improved_rank"] > 1)).sum() / (ctl["baseline_rank"] <= 1).sum()
        qb_rows = mc[mc["improvement_id"] == qb.improvement_ids[0]]
        assert share > 0  # the control run breaks some successes, so the share is not trivially 0
        assert list(qb_rows["share_r1_successes_broken"]) == pytest.approx([share] * len(qb_rows))
        assert set(qb_rows["control_population"]) == {"all"} and qb_rows["is_bank_overlap"].all()
        assert mc.loc[mc["improvement_id"] == qe.improvement_ids[0], "share_r1_successes_broken"].isna().all()
        assert set(qb_rows["method_label"]) == {"qb-norm beta=30 k_bank=1 bank=s30"}
        for _cat, g in mc.groupby("category"):  # rank 1 = the largest R@1 gain
            best = g.loc[g["method_rank_r1"] == 1, "delta_r1_pp"]
            assert (best >= g["delta_r1_pp"].max() - 0.005).all()
    finally:
        con.close()


def test_report_method_comparison_section_flags_bank_overlap(lab, tmp_path, run_cli):
    w = lab
    con = open_study(w["path"])
    try:
        imp.improve_method(con, "qb-norm", "Object,Attribute", control="successes:20", retrieval_run_id=w["t2i"])
        imp.improve_method(con, "query-expansion", "Object,Attribute", retrieval_run_id=w["t2i"])
        view = con.execute(
            "SELECT category, method_label, delta_r1_pp FROM method_comparison WHERE retrieval_run_id = ? ORDER BY ALL",
            [w["t2i"]],
        ).df()
    finally:
        con.close()
    out = tmp_path / "rep"
    res = run_cli("--db", w["path"], "report", "--out", out, "--run", w["t2i"])
    assert "10. Which fix helps which category" in res.output
    import pandas as pd

    table = pd.read_csv(out / "tables" / "method_comparison.csv")
    got = table[["category", "method_label", "delta_r1_pp"]].sort_values(list(view.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, view, check_dtype=False)
    html = (out / "report.html").read_text()
    assert "held evaluated captions" not in html
    assert len(list((out / "figures").glob("*_methods_*.png"))) == view["category"].nunique()
    # a run whose bank overlapped the evaluated captions is flagged on the page
    con = open_study(w["path"])
    try:
        imp.improve_method(con, "qb-norm", "Object", bank="s30", allow_bank_overlap=True, retrieval_run_id=w["t2i"])
    finally:
        con.close()
    run_cli("--db", w["path"], "report", "--out", out, "--run", w["t2i"], "--no-figures")
    assert "held evaluated captions (--allow-bank-overlap)" in (out / "report.html").read_text()


# ------------------------------------------------------------------------------ the CLI: clipfail improve --method


def test_cli_improve_methods_record_runs_and_refuse_bad_input(lab, run_cli):
    w = lab
    db_ = w["path"]

    def n_runs():
        with open_study(db_, read_only=True) as con:
            return con.execute("SELECT count(*) FROM improvement_runs").fetchone()[0]

    out = run_cli("--db", db_, "improve", "--categories", "Object,Attribute", "--method", "qb-norm", "--beta", 25,
                  "--control", "successes:10").output  # fmt: skip
    assert "method qb-norm" in out
    with open_study(db_, read_only=True) as con:
        rows = con.execute("SELECT method, method_params, population FROM improvement_runs ORDER BY 1, 3").fetchall()
    assert rows == [("qb-norm", "beta=25 k_bank=1 bank=s30", "failures"), ("qb-norm", "beta=25 k_bank=1 bank=s30",
                                                                           "successes")]  # fmt: skip
    again = run_cli("--db", db_, "improve", "--categories", "Object,Attribute", "--method", "qb-norm", "--beta", 25,
                    "--control", "successes:10").output  # fmt: skip
    assert "Already computed" in again and n_runs() == 2
    for args, msg in (
        (
            ["--method", "qb-norm", "--beta", 0],
            "Invalid value for '--beta': 0.0 is not in the range 1e-06<=x<=1000000.0",
        ),
        (["--method", "inverted-softmax", "--beta", -1], "Invalid value for '--beta'"),
        (["--method", "qb-norm", "--k-bank", 0], "Invalid value for '--k-bank'"),
        (["--method", "query-expansion", "--top", 0], "Invalid value for '--top'"),
        (["--method", "query-expansion", "--alpha", -0.5], "Invalid value for '--alpha'"),
        (["--method", "qb-norm", "--bank", "s30"], "--allow-bank-overlap"),
        (["--method", "query-expansion", "--bank", "s30"], "--bank does not apply to --method query-expansion"),
        (["--method", "qb-norm", "--pooling", "max"], "--pooling does not apply to --method qb-norm"),
        (["--beta", 5], "--beta does not apply to --method templates"),
        (["--method", "templates+qb-norm", "--top", 2], "--top does not apply"),
        (["--method", "templates+qb-norm", "--bank", "s30", "--k", 1], "--allow-bank-overlap"),
    ):
        res = run_cli("--db", db_, "improve", "--categories", "Object", *args, expect=2)
        assert msg in res.output and "Traceback" not in res.output, (args, res.output)
    assert n_runs() == 2  # nothing written by a refused call
    res = run_cli("--db", w["unlabelled"], "improve", "--categories", "Object", "--method", "qb-norm", expect=2)
    assert "No labels have been imported" in res.output


def test_templates_then_qb_norm_with_the_caption_alone_is_qb_norm(lab):
    """K = 1 (each caption's only prompt is itself) and max pooling: templates+qb-norm ranks exactly as qb-norm."""
    from toolkit.improve.stage import improve

    w = lab
    with open_study(w["path"]) as con:
        combo = improve(con, "Object,Attribute", method="templates+qb-norm", k=1, poolings="max", beta=20.0,
                        retrieval_run_id=w["t2i"])  # fmt: skip
        alone = imp.improve_method(con, "qb-norm", "Object,Attribute", beta=20.0, retrieval_run_id=w["t2i"])
        a, b = _ranks(con, combo.improvement_ids[0]), _ranks(con, alone.improvement_ids[0])
        assert list(a["caption_id"]) == list(b["caption_id"])
        assert np.array_equal(a["improved_rank"], b["improved_rank"])
        assert not np.array_equal(a["improved_rank"], a["baseline_rank"])  # the normalisation did something
        row = con.execute(
            "SELECT method, method_params, bank_subset, pooling FROM improvement_runs WHERE improvement_id = ?",
            [combo.improvement_ids[0]],
        ).fetchone()
        assert row == ("templates+qb-norm", "beta=20 k_bank=1 bank=s30", "s30", "max")
        plain = improve(con, "Object,Attribute", k=1, poolings="max", retrieval_run_id=w["t2i"])
        assert con.execute(
            "SELECT method FROM improvement_runs WHERE improvement_id = ?", [plain.improvement_ids[0]]
        ).fetchone() == ("templates",)
        p = _ranks(con, plain.improvement_ids[0])
        assert np.array_equal(p["improved_rank"], p["baseline_rank"])  # K = 1 templates is the baseline itself
        mc = con.execute(
            "SELECT DISTINCT method FROM method_comparison WHERE retrieval_run_id = ? ORDER BY 1", [w["t2i"]]
        ).fetchall()
        assert mc == [("qb-norm",), ("templates",), ("templates+qb-norm",)]


# ------------------------------------------------------------------------------ ties (issue 24.7)


def _file_sha(path):
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_method_whose_scores_all_tie_gains_nothing_and_is_flagged(lab, run_cli, monkeypatch, tmp_path):
    """`--beta 1e-20` gave every image the same score, and an optimistic rank (1 + images scoring strictly higher)
    put every ground truth first: R@1 100%, +100 pp. Any method whose scores tie the ground truth with other images
    (here inverted-softmax made to score every image 0, as a plugin might) must gain nothing: its pessimistic
    figures are headlined, in every view, the CLI table and the flag."""
    w = lab
    monkeypatch.setattr(H, "inverted_softmax", lambda S, log_norm, beta: np.zeros(S.shape))
    out = run_cli("--db", w["path"], "improve", "--categories", "Object,Attribute", "--method", "inverted-softmax",
                  "--control", "successes:10").output  # fmt: skip
    with open_study(w["path"], read_only=True) as con:
        ranks = con.execute(
            "SELECT r.*, t.n_tied FROM improvement_ranks r JOIN improvement_runs u USING (improvement_id) "
            "JOIN retrieval_ranks t ON t.retrieval_run_id = u.retrieval_run_id AND t.query_id = r.caption_id"
        ).df()
        rec = con.execute("SELECT * FROM improvement_recall ORDER BY improvement_id, k").df()
        ties = con.execute("SELECT * FROM improvement_ties ORDER BY improvement_id").df()
        cat = con.execute("SELECT * FROM category_recall_delta").df()
        mc = con.execute("SELECT * FROM method_comparison").df()
    M = len(w["img"])
    assert (ranks["improved_rank"] == 1).all() and (ranks["improved_n_tied"] == M - 1).all()
    assert np.array_equal(ranks["baseline_n_tied"], ranks["n_tied"])  # the baseline's ties: retrieval_ranks.n_tied
    assert ties["is_tie_affected"].all() and (ties["tie_count"] == "pessimistic").all()
    assert (ties["n_improved_tied"] == ties["n_captions"]).all() and (ties["max_gap_pp"] == 100).all()
    # what used to be the headline is still there, under its name...
    assert (rec["improved_pct_optimistic"] == 100).all()
    # ...but every headline is the pessimistic count: the GT image is last of the 30 tied images, never in the top 10
    assert (rec["improved_pct"] == 0).all() and (rec["improved_pct_pessimistic"] == 0).all()
    assert (rec["tie_count"] == "pessimistic").all() and rec["is_tie_affected"].all()
    assert (rec["delta_pp"] == -rec["baseline_pct_pessimistic"]).all() and (rec["n_fixed"] == 0).all()
    assert (rec["baseline_pct"] == rec["baseline_pct_pessimistic"]).all()
    successes = rec[rec["population"] == "successes"]
    assert (successes["n_broken"] == successes["n"]).all() and (successes["delta_pp"] == -100).all()
    assert (cat["improved_pct"] == 0).all() and (cat["delta_pp"] <= 0).all() and (cat["n_fixed"].fillna(0) == 0).all()
    assert (mc["improved_r1_pct"] == 0).all() and (mc["delta_r1_pp"] <= 0).all() and (mc["n_fixed_r1"] == 0).all()
    assert (mc["improved_r1_pct_optimistic"] == 100).all() and (mc["tie_count"] == "pessimistic").all()
    assert (mc["share_r1_successes_broken"] == 1).all()
    # the CLI prints the pessimistic figures, names the count, and says why
    assert re.search(r"none\s+pessimistic\s+0\.00\s+0\.00\s+0\.00\s+\+?0\.00", out), out
    assert "TIES: improvement run 1 (inverted-softmax, failures)" in out and "of its 11 captions" in out
    assert "+100.00" not in out
    # and so does the report: the method table's figures are the view's pessimistic ones, with the flag beside them
    run_cli("--db", w["path"], "report", "--out", tmp_path / "rep", "--run", w["t2i"], "--no-figures")
    table = pd.read_csv(tmp_path / "rep" / "tables" / "method_comparison.csv")
    assert (table["improved_r1_pct"] == 0).all() and (table["tie_count"] == "pessimistic").all()
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "TIES: improvement run 1 (inverted-softmax, failures)" in page


def test_ties_under_both_counts_equal_a_numpy_reference(lab, monkeypatch):
    """A transform with partial ties (scores rounded to a grid): the stored tie counts, improvement_ties,
    improvement_recall, category_recall_delta and method_comparison under both counts, against NumPy on the
    embeddings (the optimistic columns keep their meaning; the headline is the pessimistic count)."""
    import pandas as pd

    from toolkit import stats

    w = lab
    monkeypatch.setattr(H, "inverted_softmax", lambda S, log_norm, beta: np.round(S.astype(np.float64) * 8) / 8)
    con = open_study(w["path"])
    try:
        res = imp.improve_method(con, "inverted-softmax", "Object,Attribute,Count", retrieval_run_id=w["t2i"])
        imp_id = res.improvement_ids[0]
        got = _ranks(con, imp_id).merge(
            con.execute("SELECT caption_id, baseline_n_tied, improved_n_tied FROM improvement_ranks "
                        "WHERE improvement_id = ?", [imp_id]).df()
        )  # fmt: skip
        views = {
            name: con.execute(f"SELECT * FROM {name} WHERE improvement_id = ?", [imp_id]).df()
            for name in ("improvement_recall", "category_recall_delta", "method_comparison", "improvement_ties")
        }
        st = con.execute("SELECT * FROM improvement_stats WHERE improvement_id = ?", [imp_id]).df()
    finally:
        con.close()
    rows, gt = _rows(w, got["caption_id"])
    S = H.raw_scores(w["txt"][rows], w["img"])  # evaluate's own float32 scores
    rank, tied = np_ranks(np.round(S.astype(np.float64) * 8) / 8, gt)
    base_rank, base_tied = np_ranks(S, gt)
    assert np.array_equal(got["improved_rank"], rank) and np.array_equal(got["improved_n_tied"], tied)
    assert np.array_equal(got["baseline_rank"], base_rank) and np.array_equal(got["baseline_n_tied"], base_tied)
    assert (tied > 0).mean() > 0.5 and ((rank <= 5) & (rank + tied > 5)).any()  # ties that change hits
    ref = pd.DataFrame({"category": got["category"], "b": base_rank, "bt": base_tied, "a": rank, "at": tied})

    def recall(g, k):
        o = (100 * (g["b"] <= k).mean(), 100 * (g["a"] <= k).mean())
        p = (100 * (g["b"] + g["bt"] <= k).mean(), 100 * (g["a"] + g["at"] <= k).mean())
        return o, p

    groups = [("*", ref)] + list(ref.groupby("category"))
    gaps = [max(o[0] - p[0], o[1] - p[1]) for _c, g in groups for k in (1, 5, 10) for o, p in [recall(g, k)]]
    t = views["improvement_ties"].iloc[0]
    assert t["is_tie_recorded"] and t["is_tie_affected"] and t["tie_count"] == "pessimistic"
    assert t["max_gap_pp"] == pytest.approx(round(max(gaps), 2))
    assert t["n_improved_tied"] == (tied > 0).sum() and t["n_baseline_tied"] == (base_tied > 0).sum()
    for cat, g in groups:
        for k in (1, 5, 10):
            (bo, ao), (bp, ap) = recall(g, k)
            if cat == "*":
                row = views["improvement_recall"].set_index("k").loc[k]
            else:
                cv = views["category_recall_delta"]
                row = cv[(cv["category"] == cat) & (cv["k"] == k)].iloc[0]
            assert (row["baseline_pct_optimistic"], row["improved_pct_optimistic"]) == (round(bo, 2), round(ao, 2))
            assert (row["baseline_pct_pessimistic"], row["improved_pct_pessimistic"]) == (round(bp, 2), round(ap, 2))
            assert row["delta_pp_optimistic"] == pytest.approx(round(ao - bo, 2))
            assert row["delta_pp_pessimistic"] == pytest.approx(round(ap - bp, 2))
            # the headline is the pessimistic count, statistics included
            assert (row["baseline_pct"], row["improved_pct"]) == (round(bp, 2), round(ap, 2))
            b = (g["b"] + g["bt"] <= k).to_numpy()
            a = (g["a"] + g["at"] <= k).to_numpy()
            lo, hi = stats.paired_bootstrap_ci(b, a, seed=42)
            assert (row["ci_low_pp"], row["ci_high_pp"]) == (round(100 * lo, 2), round(100 * hi, 2))
            assert row["mcnemar_p"] == stats.mcnemar_exact(b, a)
            assert (row["n_fixed"], row["n_broken"]) == ((~b & a).sum(), (b & ~a).sum())
            s = st[(st["category"] == cat) & (st["k"] == k)].iloc[0]
            assert (s["baseline_hits"], s["improved_hits"]) == ((g["b"] <= k).sum(), (g["a"] <= k).sum())
            mc = views["method_comparison"]
            m = mc[mc["category"] == cat].iloc[0]
            assert m[f"improved_r{k}_pct"] == round(ap, 2) and m[f"baseline_r{k}_pct"] == round(bp, 2)
            assert m[f"improved_r{k}_pct_optimistic"] == round(ao, 2)
            assert m[f"improved_r{k}_pct_pessimistic"] == round(ap, 2)
            assert m[f"delta_r{k}_pp"] == pytest.approx(round(ap - bp, 2))


BAD_METHOD_NUMBERS = [
    (["--method", "inverted-softmax", "--beta", "1e-20"], "--beta"),  # every image tied (issue 24.7)
    (["--method", "qb-norm", "--beta", "1e-320"], "--beta"),  # a subnormal: R@1 97.73 against 0.00
    (["--method", "qb-norm", "--beta", "0"], "--beta"),
    (["--method", "qb-norm", "--beta", "-1"], "--beta"),
    (["--method", "qb-norm", "--beta", "1e7"], "--beta"),
    (["--method", "inverted-softmax", "--beta", "inf"], "--beta"),
    (["--method", "inverted-softmax", "--beta", "nan"], "--beta"),
    (["--method", "templates+qb-norm", "--beta", "nan", "--k", "1"], "--beta"),
    (["--method", "query-expansion", "--alpha", "1e308"], "--alpha"),  # was a NOT NULL constraint error
    (["--method", "query-expansion", "--alpha", "inf"], "--alpha"),
    (["--method", "query-expansion", "--alpha", "nan"], "--alpha"),
    (["--method", "query-expansion", "--alpha", "-0.5"], "--alpha"),
    (["--method", "query-expansion", "--top", "0"], "--top"),
    (["--method", "query-expansion", "--top", str(2**40)], "--top"),
    (["--method", "query-expansion", "--top", "1.5"], "--top"),
    (["--method", "qb-norm", "--k-bank", "0"], "--k-bank"),
    (["--method", "qb-norm", "--k-bank", str(2**40)], "--k-bank"),
    (["--pooling", "logsumexp", "--tau", "nan"], "--tau"),
    (["--pooling", "logsumexp", "--tau", "inf"], "--tau"),
    (["--pooling", "logsumexp", "--tau", "0"], "--tau"),
    (["--pooling", "logsumexp", "--tau", "1e-320"], "--tau"),
    (["--pooling", "logsumexp", "--tau", "1e7"], "--tau"),
]


def test_numbers_that_over_or_underflow_a_transform_are_refused(lab, run_cli):
    """Every real-valued or count option of every method: NaN, infinities, out-of-range values are one message
    that names the option and its range; nothing runs and the database is byte-identical."""
    from toolkit.errors import UserError

    w = lab
    before = _file_sha(w["path"])
    for args, flag in BAD_METHOD_NUMBERS:
        res = run_cli("--db", w["path"], "improve", "--categories", "Object", *args, expect=2)
        assert f"Invalid value for '{flag}'" in res.output and "Traceback" not in res.output, (args, res.output)
        assert res.output.count("Error:") == 1, res.output  # one message (after click's usage line)
    assert _file_sha(w["path"]) == before
    # the same ranges through the Python API
    with open_study(w["path"]) as con:
        for method, kw, flag in (
            ("inverted-softmax", {"beta": 1e-20}, "--beta must be a number from 1e-06 to 1e\\+06"),
            ("qb-norm", {"beta": 5e-324}, "--beta"),
            ("qb-norm", {"k_bank": 2**40}, "--k-bank"),
            ("query-expansion", {"alpha": 1e308}, "--alpha must be a number from 0 to 1e\\+06"),
            ("query-expansion", {"top": 2.5}, "--top"),
        ):
            with pytest.raises(UserError, match=flag):
                imp.improve_method(con, method, "Object", retrieval_run_id=w["t2i"], **kw)
        for tau in (float("nan"), float("inf"), 0.0, 1e-320, 1e7):
            with pytest.raises(UserError, match="--tau must be a number from 1e-06 to 1e\\+06"):
                imp.improve(con, "Object", poolings="logsumexp", tau=tau, retrieval_run_id=w["t2i"])
        assert con.execute("SELECT count(*) FROM improvement_runs").fetchone()[0] == 0


@pytest.mark.parametrize(
    "method,patch,extra",
    [
        ("inverted-softmax", "inverted_softmax", []),
        ("templates+inverted-softmax", "inverted_softmax", ["--k", "1", "--pooling", "max"]),
        ("query-expansion", "expand_queries", []),
    ],
)
def test_scores_that_are_not_finite_are_one_message_and_nothing_is_written(lab, run_cli, monkeypatch, method, patch,
                                                                          extra):  # fmt: skip
    """Whatever the parameters, a transform whose scores come out NaN or infinite (an overflow) is refused after
    computing and before writing: one message, exit 2, the database byte-identical."""
    w = lab
    real = getattr(H, patch)

    def overflowing(*args):
        out = real(*args).copy()
        out[0] = np.inf if patch == "expand_queries" else np.nan  # an expanded query of inf: NaN / inf scores
        return out

    monkeypatch.setattr(H, patch, overflowing)
    before = _file_sha(w["path"])
    res = run_cli("--db", w["path"], "improve", "--categories", "Object,Attribute", "--method", method, *extra,
                  expect=2)  # fmt: skip
    assert "gave scores that are not finite numbers (NaN or infinite)" in res.output, res.output
    assert "Nothing was written" in res.output and "Traceback" not in res.output
    assert _file_sha(w["path"]) == before


NEW_TIE_COLUMNS = {
    "improvement_ranks": ["baseline_n_tied", "improved_n_tied"],
    "improvement_stats": [
        "baseline_hits_pessimistic", "improved_hits_pessimistic", "n_fixed_pessimistic", "n_broken_pessimistic",
        "ci_low_pp_pessimistic", "ci_high_pp_pessimistic", "mcnemar_p_pessimistic",
    ],
}  # fmt: skip


def test_a_study_made_before_ties_were_recorded_opens_and_its_runs_show_as_unknown(lab, run_cli, tmp_path):
    """An older clipfail stored no tie counts (the columns did not exist). Such a study upgrades on its next writing
    command; its runs keep every figure they had (their existing columns are those of the same runs with ties
    recorded, here where nothing ties), their tie columns are NULL and say 'ties unknown', the report says so, and
    the same configuration runs again (not reused) to record them."""
    w = lab
    views = ("improvement_hits", "improvement_recall", "category_recall_delta", "method_comparison")
    with open_study(w["path"]) as con:
        imp.improve_method(con, "qb-norm", "Object,Attribute", control="successes:10", retrieval_run_id=w["t2i"])
        imp.improve_method(con, "query-expansion", "Object,Attribute", retrieval_run_id=w["t2i"])
        assert not con.execute("SELECT bool_or(is_tie_affected) FROM improvement_ties").fetchone()[0]
        recorded = {v: con.execute(f"SELECT * FROM {v}").df() for v in views}
        for table, cols in NEW_TIE_COLUMNS.items():  # what an older clipfail wrote
            for col in cols:
                con.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
        con.execute("UPDATE schema_info SET value = 'older' WHERE key = 'schema_hash'")
    run_cli("--db", w["path"], "init")  # any writing command upgrades
    with open_study(w["path"], read_only=True) as con:
        assert con.execute("SELECT count(*) FROM improvement_ranks WHERE improved_n_tied IS NOT NULL").fetchone() == (
            0,
        )
        for v in views:
            old = con.execute(f"SELECT * FROM {v}").df()
            kept = [c for c in recorded[v].columns if not re.search(r"tie|optimistic|pessimistic", c)]
            pd.testing.assert_frame_equal(old[kept], recorded[v][kept])  # every existing column, row for row
            tie_cols = [c for c in old.columns if re.search(r"pessimistic|tied|is_tie_affected", c)]
            assert old[tie_cols].isna().all().all(), v  # unknown, never 0
        ties = con.execute("SELECT * FROM improvement_ties").df()
        assert (ties["tie_count"] == "optimistic (ties unknown)").all() and not ties["is_tie_recorded"].any()
        assert ties[["is_tie_affected", "n_improved_tied", "max_gap_pp"]].isna().all().all()
    run_cli("--db", w["path"], "report", "--out", tmp_path / "rep", "--run", w["t2i"], "--no-figures")
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "was made before ties were recorded" in page
    # the same configuration again: a new run that records its ties; the old ones stay
    out = run_cli(
        "--db", w["path"], "improve", "--categories", "Object,Attribute", "--method", "query-expansion"
    ).output
    assert "Improvement run(s) 3 had this configuration but were made before tie counts were recorded" in out
    with open_study(w["path"], read_only=True) as con:
        rows = con.execute("SELECT improvement_id, tie_count FROM improvement_ties ORDER BY 1").fetchall()
    assert rows == [(1, "optimistic (ties unknown)"), (2, "optimistic (ties unknown)"),
                    (3, "optimistic (ties unknown)"), (4, "optimistic")]  # fmt: skip
