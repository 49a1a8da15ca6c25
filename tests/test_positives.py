"""Extended positives (issue 27): `clipfail positives import/rank` and the recall_extended view, checked against
the eccv_caption package's own metric code on a study whose ids are the package's real COCO ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_message, import_tool, register_seeded_embeddings, study_reader

from toolkit.store import db
from toolkit.store.study import open_study

# eccv_caption warns on import when ujson is missing (it then uses json): harmless here
pytestmark = pytest.mark.filterwarnings("ignore:failed to import `ujson`:UserWarning")
HINT = "pip install 'clipfail[positives]' (CI installs it with the dev extra)"


def _package_data() -> dict:
    pkg = import_tool("eccv_caption", HINT)
    folder = Path(pkg.__file__).parent / "data"
    out = {}
    for name in ("original", "eccv", "cxc"):
        for key in ("caption_to_image", "image_to_caption"):
            raw = json.loads((folder / f"{name}_{key}.json").read_text())
            out[name, key] = {int(k): [int(x) for x in v] for k, v in raw.items()}
    return out


def _study_ids(data: dict) -> tuple[list[int], dict[int, list[int]]]:
    """A small slice of the 5k test: the positive images of three ECCV caption queries (with their own
    images), and each image's five COCO captions; all ids are real."""
    eccv = data["eccv", "caption_to_image"]
    images: set[int] = set()
    for cap in sorted(eccv)[:3]:
        images |= set(eccv[cap])
    orig = data["original", "image_to_caption"]
    return sorted(images), {i: sorted(orig[i]) for i in sorted(images)}


def _make_study(root: Path, data: dict) -> tuple[str, list[int], dict[int, list[int]]]:
    """Generate drawn images in COCO format, give them the real ids, ingest, seeded embeddings, evaluate both
    directions. Returns the database path, the image ids and each image's caption ids."""
    from toolkit.ingest.stage import ingest
    from toolkit.ingest.synthetic import make_synthetic_coco
    from toolkit.retrieval.evaluate import evaluate

    image_ids, captions = _study_ids(data)
    make_synthetic_coco(root / "coco", len(image_ids), seed=3)
    ann = root / "coco" / "annotations"
    cap_json = json.loads((ann / "captions_val2017.json").read_text())
    remap = {img["id"]: real for img, real in zip(sorted(cap_json["images"], key=lambda x: x["id"]), image_ids)}
    for img in cap_json["images"]:
        img["id"] = remap[img["id"]]
    by_image: dict[int, list] = {}
    for a in cap_json["annotations"]:
        a["image_id"] = remap[a["image_id"]]
        by_image.setdefault(a["image_id"], []).append(a)
    kept = []
    for image_id, anns in by_image.items():
        for a, cid in zip(anns[:5], captions[image_id]):
            a["id"] = cid
            kept.append(a)
    cap_json["annotations"] = kept
    (ann / "captions_val2017.json").write_text(json.dumps(cap_json))
    (ann / "instances_val2017.json").unlink()
    dbp = str(root / "study.duckdb")
    with open_study(dbp) as con:
        ingest(con, coco_root=root / "coco", num_images="all", captions_per_image=5, seed=42, name="eccv-slice")
        register_seeded_embeddings(con, root, "eccv-slice", noise=0.9, seed=7)
        evaluate(con, "eccv-slice", device="cpu", direction="text-to-image")
        evaluate(con, "eccv-slice", device="cpu", direction="image-to-text")
    return dbp, image_ids, captions


@pytest.fixture(scope="module")
def study_master(tmp_path_factory):
    data = _package_data()
    root = tmp_path_factory.mktemp("positives")
    dbp, image_ids, captions = _make_study(root, data)
    return root, dbp, data, image_ids, captions


@pytest.fixture
def study(study_master, tmp_path):
    """A private copy of the study folder (database, embeddings and images: paths are stored relative to it)."""
    root, dbp, data, image_ids, captions = study_master
    dest = tmp_path / "study"
    shutil.copytree(root, dest)
    return str(dest / Path(dbp).name), data, image_ids, captions


def _restricted(gts: dict, queries: set[int], items: set[int], orig: dict) -> dict[int, list[int]]:
    """A source's lists inside the study: queries and positives both in it, plus the query's COCO pairs."""
    out = {}
    for q, ps in gts.items():
        if q in queries:
            kept = [p for p in ps if p in items]
            if kept:
                out[q] = sorted(set(kept) | {p for p in orig[q] if p in items})
    return out


def _ranked_lists(con, rrid: int) -> dict[int, list[int]]:
    """Each query's gallery ids by descending score, from the run's embedding files and the toolkit's scores."""
    from toolkit.retrieval.ranking import score_rows
    from toolkit.store import artifacts

    direction, img_set, txt_set = con.execute(
        "SELECT direction, image_embedding_set_id, text_embedding_set_id FROM retrieval_runs WHERE retrieval_run_id=?",
        [rrid],
    ).fetchone()
    images, texts = artifacts.load_embedding_set(con, img_set), artifacts.load_embedding_set(con, txt_set)
    q, g = (texts, images) if direction == "text-to-image" else (images, texts)
    S = score_rows(q.array, g.array)
    for row in S:  # the package compares lists, so a tie would make the order arbitrary: there is none
        assert len(np.unique(row)) == len(row)
    order = np.argsort(-S, axis=1, kind="stable")
    return {int(qid): [int(x) for x in g.item_ids[order[i]]] for i, qid in enumerate(q.item_ids)}


def test_import_coverage_and_idempotence(study, run_cli):
    dbp, data, image_ids, captions = study
    res = run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    n_caps = sum(len(v) for v in captions.values())
    assert f"of {n_caps} captions and" in res.output
    with open_study(dbp) as con:
        ps = con.execute("SELECT * FROM positive_sets").df()
        assert len(ps) == 1 and ps["source"][0] == "eccv" and ps["source_version"][0] == "0.1.0"
        pairs = con.execute("SELECT direction, query_id, positive_id FROM extra_positives").fetchall()
        cov = con.execute("SELECT * FROM positive_coverage ORDER BY direction DESC").df()
    imgs, caps = set(image_ids), {c for v in captions.values() for c in v}
    c2i, i2c = data["eccv", "caption_to_image"], data["eccv", "image_to_caption"]
    expected = {("text-to-image", c, i) for c, v in c2i.items() for i in v if c in caps and i in imgs} | {
        ("image-to-text", i, c) for i, v in i2c.items() for c in v if c in caps and i in imgs
    }
    assert set(pairs) == expected and len(pairs) == int(ps["n_pairs_kept"][0])
    t2i = _restricted(data["eccv", "caption_to_image"], caps, imgs, data["original", "caption_to_image"])
    i2t = _restricted(data["eccv", "image_to_caption"], imgs, caps, data["original", "image_to_caption"])
    assert int(ps["n_captions_covered"][0]) == len(t2i) >= 3 and int(ps["n_images_covered"][0]) == len(i2t)
    assert cov["n_covered"].tolist() == [len(t2i), len(i2t)]
    assert cov["mean_positives"][0] == pytest.approx(np.mean([len(v) for v in t2i.values()]))
    # unknown ids: every id of the package that the study does not hold, counted once
    all_caps = set(data["eccv", "caption_to_image"]) | {c for v in data["eccv", "image_to_caption"].values() for c in v}
    all_imgs = set(data["eccv", "image_to_caption"]) | {i for v in data["eccv", "caption_to_image"].values() for i in v}
    assert int(ps["n_unknown_ids"][0]) == len(all_caps - caps) + len(all_imgs - imgs)
    # the same source again changes nothing
    with open_study(dbp) as con:
        before = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "extra_positives")]
    again = run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    assert "already imported, nothing changed" in again.output
    with open_study(dbp) as con:
        after = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "extra_positives")]
    assert after == before


def test_recall_extended_equals_eccv_caption(study, run_cli):
    """Every metric of the view against eccv_caption.Metrics.compute_all_metrics (and the package's
    compute_eccv_metrics for R-Precision/mAP@R of coco and cxc), both directions, on the same ranked lists."""
    eccv_caption = import_tool("eccv_caption", HINT)
    from eccv_caption._metrics import compute_eccv_metrics

    dbp, data, image_ids, captions = study
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    imgs, caps = set(image_ids), {c for v in captions.values() for c in v}
    with open_study(dbp) as con:
        runs = dict(con.execute("SELECT direction, retrieval_run_id FROM retrieval_runs").fetchall())
        lists = {d: _ranked_lists(con, r) for d, r in runs.items()}
        view = con.execute("SELECT * FROM recall_extended").df()
    metrics = eccv_caption.Metrics()
    gts = {}
    for source in ("original", "cxc", "eccv"):
        oc, oi = data["original", "caption_to_image"], data["original", "image_to_caption"]
        gts[source] = {
            "t2i": _restricted(data[source, "caption_to_image"], caps, imgs, oc),
            "i2t": _restricted(data[source, "image_to_caption"], imgs, caps, oi),
        }
    metrics.coco_gts, metrics.cxc_gts, metrics.eccv_gts = gts["original"], gts["cxc"], gts["eccv"]
    i2t, t2i = lists["image-to-text"], lists["text-to-image"]
    ref = metrics.compute_all_metrics(
        i2t, t2i, target_metrics=("coco_5k_recalls", "cxc_recalls", "eccv_r1", "eccv_map_at_r", "eccv_rprecision"),
        Ks=(1, 5, 10),
    )  # fmt: skip
    expected = {}
    for mod, direction in (("t2i", "text-to-image"), ("i2t", "image-to-text")):
        for src, name in (("coco_5k", "coco"), ("cxc", "cxc")):
            for k in (1, 5, 10):
                expected[direction, name, "r_at_k", k] = ref[f"{src}_r{k}"][mod]
            rest = compute_eccv_metrics(lists[direction], gts["original" if name == "coco" else name][mod])
            expected[direction, name, "r_precision", None] = rest["eccv_rprecision"]
            expected[direction, name, "map_at_r", None] = rest["eccv_map_at_r"]
        expected[direction, "eccv", "r_at_k", 1] = ref["eccv_r1"][mod]
        expected[direction, "eccv", "r_precision", None] = ref["eccv_rprecision"][mod]
        expected[direction, "eccv", "map_at_r", None] = ref["eccv_map_at_r"][mod]
        for k in (5, 10):  # the package's R@K on ECCV lists: compute_r_at_k, which eccv_recalls calls
            expected[direction, "eccv", "r_at_k", k] = metrics.eccv_recalls({mod: lists[direction]}, mod, K=k)[mod]
    got = {(r.direction, r.source, r.metric, None if pd.isna(r.k) else int(r.k)): r.value for r in view.itertuples()}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key
    n = view.groupby(["direction", "source"])["n_queries"].first().to_dict()
    assert n["text-to-image", "eccv"] == len(gts["eccv"]["t2i"]) and n["image-to-text", "cxc"] == len(gts["cxc"]["i2t"])
    assert n["text-to-image", "coco"] == len(caps) and n["image-to-text", "coco"] == len(imgs)
    # the extended positives change something here (the slice is made of ECCV positives), so the check is not vacuous
    assert got["text-to-image", "eccv", "r_at_k", 1] != got["text-to-image", "coco", "r_at_k", 1]


def test_rank_after_a_later_evaluate(study, run_cli):
    """A run evaluated after the import gets its positive ranks from evaluate; `positives rank` fills in what is
    missing (here: deleted) and recall_extended shows a (run, source) only once all of its ranks are stored."""
    dbp, *_ = study
    with open_study(dbp) as con, db.transaction(con):
        con.execute("DELETE FROM retrieval_ranks WHERE retrieval_run_id = 2")
        con.execute("DELETE FROM retrieval_runs WHERE retrieval_run_id = 2")
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    from toolkit.retrieval.evaluate import evaluate

    query = "SELECT DISTINCT source FROM recall_extended WHERE retrieval_run_id = ? ORDER BY 1"
    with open_study(dbp) as con:
        rrid = evaluate(con, "eccv-slice", device="cpu", direction="image-to-text").retrieval_run_id
        assert con.execute(query, [rrid]).fetchall() == [("coco",), ("eccv",)]
        n = con.execute("SELECT count(*) FROM positive_ranks WHERE retrieval_run_id = ?", [rrid]).fetchone()[0]
        with db.transaction(con):
            con.execute(
                "DELETE FROM positive_ranks WHERE retrieval_run_id = ? AND (query_id, positive_id) IN "
                "(SELECT (e.query_id, e.positive_id) FROM extra_positives e WHERE e.direction = 'image-to-text' AND "
                "e.positive_id NOT IN (SELECT caption_id FROM subset_captions WHERE image_id = e.query_id) "
                "ORDER BY ALL LIMIT 1)",
                [rrid],
            )
        assert con.execute(query, [rrid]).fetchall() == [("coco",)]  # eccv incomplete: no rows, never partial ones
    res = run_cli("positives", "rank", "--db", dbp)
    assert f"Retrieval run {rrid}: 1 positive ranks stored" in res.output
    with open_study(dbp) as con:
        assert con.execute(query, [rrid]).fetchall() == [("coco",), ("eccv",)]
        assert con.execute("SELECT count(*) FROM positive_ranks WHERE retrieval_run_id = ?", [rrid]).fetchone()[0] == n
    again = run_cli("positives", "rank", "--run", rrid, "--db", dbp)
    assert "none missing" in again.output


def _tables(dbp) -> list[int]:
    with study_reader(dbp) as con:
        return [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("positive_sets", "extra_positives")]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"caption_to_image": {"1": [2.5]}}', "a whole number"),
        ('{"caption_to_image": {"abc": [2]}}', "key 'abc'"),
        ('{"caption_to_image": {"7": [1], "007": [2]}}', "without leading zeros"),  # one id named twice
        ('{"caption_to_image": {"1": [true]}}', "a whole number"),
        ('{"caption_to_image": {"1": 2}}', "a list"),
        ('{"captions": {}}', "caption_to_image"),
        ("[1, 2]", "an object"),
    ],
)
def test_file_of_wrong_shape_writes_nothing(study, run_cli, tmp_path, content, needle):
    dbp, *_ = study
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = run_cli("positives", "import", "--file", bad, "--db", dbp, expect=None)
    assert_one_message(res, needle, "bad.json")
    assert _tables(dbp) == [0, 0]


def test_file_source_and_unknown_ids(study, run_cli, tmp_path):
    """A file of the same shape imports like a packaged source; ids the study lacks are counted, not errors."""
    dbp, data, image_ids, captions = study
    cap = captions[image_ids[0]][0]
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"caption_to_image": {str(cap): [image_ids[1], 999999999]}, "image_to_caption": {}}))
    res = run_cli("positives", "import", "--file", f, "--db", dbp)
    assert "1 of 2 pairs" in res.output and "1 ids of the source are not in it" in res.output
    with open_study(dbp) as con:
        assert con.execute("SELECT source, n_unknown_ids FROM positive_sets").fetchall() == [("file:mine.json", 1)]
        assert con.execute("SELECT query_id, positive_id FROM extra_positives").fetchall() == [(cap, image_ids[1])]
        src = con.execute("SELECT DISTINCT source FROM recall_extended ORDER BY 1").fetchall()
    assert src == [("coco",), ("file:mine.json",)]


def test_no_overlap_two_sources_and_missing_package(run_cli, synthetic_coco, tmp_db, tmp_path, monkeypatch):
    """The generated dataset's ids are not COCO's: 0 of N covered, with what to ingest; nothing written."""
    run_cli("ingest", "--coco-root", synthetic_coco, "--num-images", "10", "--db", tmp_db)
    res = run_cli("positives", "import", "--source", "eccv", "--db", tmp_db, expect=None)
    assert_one_message(res, "0 of 50 captions", "captions_val2014.json")
    assert _tables(tmp_db) == [0, 0]
    res = run_cli("positives", "import", "--source", "eccv", "--source", "cxc", "--db", tmp_db, expect=None)
    assert_one_message(res, "one source of positives per import", "--source cxc")
    res = run_cli("positives", "import", "--source", "eccv", "--file", tmp_path / "x.json", "--db", tmp_db, expect=None)
    assert_one_message(res, "one source of positives per import")
    import sys

    monkeypatch.setitem(sys.modules, "eccv_caption", None)  # as if it were not installed
    res = run_cli("positives", "import", "--source", "cxc", "--db", tmp_db, expect=None)
    assert_one_message(res, "eccv_caption", "pip install 'clipfail[positives]'")
    assert _tables(tmp_db) == [0, 0]


def test_ties_are_placed_both_ways_and_the_headline_counts_them_pessimistically(study, run_cli, tmp_path):
    """A caption whose image A, a verified positive B and a negative N all score exactly alike: A and B take
    places 1 and 2 before N (optimistic), so R@1, R-Precision and mAP@R are 1; positive_ranks records the tie.
    Pessimistically they take places 2 and 3, and that is the headline value of the tie-affected source."""
    from helpers import register_hand_built

    from toolkit.retrieval.evaluate import evaluate

    dbp, data, image_ids, captions = study
    with open_study(dbp) as con:
        sid = int(db.get_subset(con, "eccv-slice")["subset_id"])
        imgs = [
            int(i) for i in con.execute("SELECT image_id FROM subset_images ORDER BY position").fetchnumpy()["image_id"]
        ]
        caps = con.execute("SELECT caption_id, image_id FROM subset_captions ORDER BY caption_id").df()
        rng = np.random.default_rng(1)
        img = rng.normal(size=(len(imgs), 8)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = rng.normal(size=(len(caps), 8)).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        c, a = int(caps["caption_id"][0]), int(caps["image_id"][0])
        b, n = [i for i in imgs if i != a][:2]
        v = np.float32([1, 0, 0, 0, 0, 0, 0, 0])
        for i in (a, b, n):
            img[imgs.index(i)] = v
        img[:, 0] = np.where(np.isin(imgs, [a, b, n]), img[:, 0], np.minimum(img[:, 0], 0.5))  # the rest lower
        txt[0] = v
        register_hand_built(con, tmp_path / "ti.npy", "image", img, imgs, sid, model="tied")
        register_hand_built(con, tmp_path / "tt.npy", "text", txt, caps["caption_id"].to_numpy(), sid, model="tied")
        rrid = evaluate(con, "eccv-slice", model="tied", device="cpu").retrieval_run_id
    f = tmp_path / "tie.json"
    f.write_text(json.dumps({"caption_to_image": {str(c): [b]}}))
    run_cli("positives", "import", "--file", f, "--db", dbp)
    with open_study(dbp) as con:
        ranks = con.execute(
            "SELECT positive_id, rank, n_tied FROM positive_ranks WHERE retrieval_run_id = ? AND query_id = ? "
            "ORDER BY positive_id",
            [rrid, c],
        ).fetchall()
        rows = con.execute(
            "SELECT metric || coalesce(k::VARCHAR, ''), value_optimistic, value_pessimistic, value, tie_count "
            "FROM recall_extended WHERE retrieval_run_id = ? AND source = 'file:tie.json'",
            [rrid],
        ).fetchall()
    assert ranks == sorted([(a, 1, 2), (b, 1, 2)])
    optimistic = {m: o for m, o, _p, _v, _t in rows}
    pessimistic = {m: p for m, _o, p, _v, _t in rows}
    assert optimistic == {"r_at_k1": 1.0, "r_at_k5": 1.0, "r_at_k10": 1.0, "r_precision": 1.0, "map_at_r": 1.0}
    # no run gains from ties: the two positives at the end of their three-item tie group take places 2 and 3, so
    # R@1 = 0, R-Precision (R = 2) = 1/2 and mAP@R = (1/2) / 2; the headline value is the pessimistic one
    assert pessimistic == {"r_at_k1": 0.0, "r_at_k5": 1.0, "r_at_k10": 1.0, "r_precision": 0.5, "map_at_r": 0.25}
    assert all(v == p and t == "pessimistic" for _m, _o, p, v, t in rows)


def test_failure_false_negatives(study, run_cli):
    """Per R@1 failure: whether its top-1 item is a verified positive, which sources verify and cover it, and
    the rank of its first extended positive, against the package's lists and the ranked lists."""
    dbp, data, image_ids, captions = study
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    imgs, caps = set(image_ids), {c for v in captions.values() for c in v}
    with open_study(dbp) as con:
        runs = dict(con.execute("SELECT direction, retrieval_run_id FROM retrieval_runs").fetchall())
        lists = {d: _ranked_lists(con, r) for d, r in runs.items()}
        view = con.execute("SELECT * FROM failure_false_negatives").df()
    expected = []
    for direction, key, queries, items, orig in (
        ("text-to-image", "caption_to_image", caps, imgs, data["original", "caption_to_image"]),
        ("image-to-text", "image_to_caption", imgs, caps, data["original", "image_to_caption"]),
    ):
        src = {s: _restricted(data[s, key], queries, items, orig) for s in ("cxc", "eccv")}
        for q, ranked in lists[direction].items():
            if ranked[0] in orig[q]:
                continue  # a hit at 1
            covering = [s for s in ("cxc", "eccv") if q in src[s]]
            verifying = [s for s in covering if ranked[0] in src[s][q]]
            extended = {p for s in covering for p in src[s][q]} - set(orig[q])
            first = min((ranked.index(p) + 1 for p in extended), default=None)
            expected.append(
                (runs[direction], q, ranked[0], bool(verifying), ", ".join(verifying) or None,
                 ", ".join(covering) or None, first)
            )  # fmt: skip
    cols = ["retrieval_run_id", "query_id", "top1_id", "is_top1_extended_positive", "verifying_sources"]
    got = [
        tuple(None if pd.isna(v) else v for v in row)
        for row in view[[*cols, "covering_sources", "first_extended_rank"]].itertuples(index=False)
    ]
    assert sorted(got, key=str) == sorted(expected, key=str)
    assert any(e[3] for e in expected) and any(not e[3] for e in expected)  # both kinds occur here


def test_false_negatives_by_category(study, run_cli, tmp_path):
    """Per human category of the labelled R@1 failures: checkable, verified false negatives and the shares,
    against a plain join of sample_labels and failure_false_negatives."""
    from toolkit.labels.sample import sample_failures
    from toolkit.labels.simulate import simulate_labels

    dbp, *_ = study
    with open_study(dbp) as con:
        sample_failures(con, n=30, seed=42, overlap=6, per_annotator=8, out_dir=tmp_path / "fa", pictures=False)
        simulate_labels(con, tmp_path / "fa", tmp_path / "labels", seed=0)
        assert con.execute("SELECT count(*) FROM false_negatives_by_category").fetchone()[0] == 0  # nothing imported
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    with open_study(dbp) as con:
        labels = con.execute("SELECT retrieval_run_id, caption_id AS query_id, category FROM sample_labels").df()
        fn = con.execute("SELECT * FROM failure_false_negatives").df()
        view = con.execute("SELECT * FROM false_negatives_by_category").df()
    joined = labels.merge(fn, on=["retrieval_run_id", "query_id"], how="left")
    assert len(joined) == len(labels) >= 20
    joined["checkable"] = joined["covering_sources"].notna()
    joined["verified"] = joined["is_top1_extended_positive"].fillna(False).astype(bool)
    exp = joined.groupby("category").agg(
        n_labelled=("query_id", "size"), n_checkable=("checkable", "sum"), n_verified=("verified", "sum")
    )
    got = view.set_index("category")
    assert got["n_labelled"].to_dict() == exp["n_labelled"].to_dict()
    assert got["n_checkable"].to_dict() == exp["n_checkable"].to_dict()
    assert got["n_verified"].to_dict() == exp["n_verified"].to_dict()
    assert exp["n_checkable"].sum() > 0  # CxC covers every caption of the study: the shares are not all NULL
    total = exp["n_verified"].sum()
    for cat, row in exp.iterrows():
        share = row.n_verified / row.n_checkable if row.n_checkable else None
        assert (got.loc[cat, "share_verified"] if pd.notna(got.loc[cat, "share_verified"]) else None) == share
        mine = got.loc[cat, "share_of_verified"]
        assert (None if pd.isna(mine) else mine) == (row.n_verified / total if total else None)


def test_sample_failures_exclude_verified_positives(study, run_cli, tmp_path):
    """--exclude-verified-positives draws from the failures whose top-1 is not a verified positive, records the
    positive sets it used in the sample's config, and is refused before any positives are imported."""
    dbp, *_ = study
    args = ("sample-failures", "--run", 1, "--overlap", 0, "--per-annotator", 1, "--annotators", "A", "--no-pictures")
    res = run_cli(*args, "--n", 5, "--out", tmp_path / "fa0", "--exclude-verified-positives", "--db", dbp, expect=None)
    assert_one_message(res, "clipfail positives import")
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    with open_study(dbp) as con:
        verified = {
            int(r[0])
            for r in con.execute(
                "SELECT query_id FROM failure_false_negatives WHERE retrieval_run_id = 1 AND is_top1_extended_positive"
            ).fetchall()
        }
        n_fail = con.execute(
            "SELECT count(*) FROM retrieval_ranks WHERE retrieval_run_id = 1 AND gt_rank > 1"
        ).fetchone()[0]
    assert verified  # the study has at least one known false negative to keep away
    n = n_fail - len(verified)
    run_cli(*args, "--n", n, "--out", tmp_path / "fa", "--exclude-verified-positives", "--db", dbp)
    with open_study(dbp) as con:
        drawn = {int(r[0]) for r in con.execute("SELECT caption_id FROM failure_samples").fetchall()}
        cfg = json.loads(
            con.execute("SELECT config_json FROM runs WHERE stage = 'sample-failures' ORDER BY run_id DESC").fetchone()[
                0
            ]
        )
    assert len(drawn) == n and not drawn & verified  # every other failure, none of the verified ones
    assert cfg["exclude_verified_positives"] == [1, 2]
    # one more than that pool is refused: the verified ones are not in it
    res = run_cli(*args, "--n", n + 1, "--out", tmp_path / "fb", "--exclude-verified-positives", "--replace",
                  "--db", dbp, expect=None)  # fmt: skip
    assert_one_message(res, f"more than the {n} R@1 failures")


def test_triage_verified_rule_comes_first(study, run_cli):
    """Once positives are imported, a failure whose top-1 image is a verified positive is suggested Ambiguous by the
    Verified rule, before every other rule, with the sources as evidence; before the import no rule says so."""
    dbp, *_ = study
    run_cli("triage", "--run", 1, "--db", dbp)
    with open_study(dbp) as con:
        assert (
            con.execute("SELECT count(*) FROM triage_suggestions WHERE rules_fired LIKE 'Verified%'").fetchone()[0] == 0
        )
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    run_cli("triage", "--run", 1, "--db", dbp)
    with open_study(dbp) as con:
        fn = con.execute(
            "SELECT query_id, is_top1_extended_positive, verifying_sources FROM failure_false_negatives "
            "WHERE retrieval_run_id = 1"
        ).df()
        sug = con.execute(
            "SELECT caption_id, suggested_category, score, evidence, rules_fired FROM triage_suggestions "
            "WHERE triage_run_id = (SELECT max(triage_run_id) FROM triage_runs)"
        ).df()
        cfg = json.loads(
            con.execute("SELECT config_json FROM runs WHERE stage = 'triage' ORDER BY run_id DESC").fetchone()[0]
        )
    assert cfg["verified_positive_sets"] == [1, 2]
    merged = sug.merge(fn, left_on="caption_id", right_on="query_id")
    assert len(merged) == len(sug) == len(fn)
    hits = merged[merged["is_top1_extended_positive"]]
    assert len(hits) >= 1
    for row in hits.itertuples():
        assert row.suggested_category == "Ambiguous" and row.score == 1.0
        assert row.rules_fired.split(",")[0] == "Verified"
        assert f"verified positive of this caption (ECCV Caption / CxC: {row.verifying_sources})" in row.evidence
    assert not merged.loc[~merged["is_top1_extended_positive"], "rules_fired"].str.contains("Verified").any()


def test_false_negatives_by_triage_rule(study, run_cli):
    """Per deciding heuristic rule of the newest triage run (Verified set aside): failures, checkable, verified."""
    dbp, *_ = study
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    run_cli("triage", "--run", 1, "--db", dbp)
    with open_study(dbp) as con:
        sug = con.execute("SELECT caption_id AS query_id, rules_fired FROM triage_suggestions").df()
        fn = con.execute("SELECT * FROM failure_false_negatives WHERE retrieval_run_id = 1").df()
        view = con.execute("SELECT * FROM false_negatives_by_triage_rule").df()
    j = sug.merge(fn, on="query_id")
    assert len(j) == len(sug) > 0
    j["rule"] = j["rules_fired"].map(lambda s: next((r for r in s.split(",") if r and r != "Verified"), "(none)"))
    exp = j.groupby("rule").agg(
        n_failures=("query_id", "size"),
        n_checkable=("covering_sources", lambda c: int(c.notna().sum())),
        n_verified=("is_top1_extended_positive", "sum"),
    )
    got = view.assign(rule=view["rule"].fillna("(none)")).set_index("rule")
    for col in ("n_failures", "n_checkable", "n_verified"):
        assert got[col].to_dict() == exp[col].astype(int).to_dict(), col
    assert exp["n_verified"].sum() >= 1
    share = got["share_of_verified"].dropna()
    assert abs(share.sum() - 1.0) < 1e-12


def test_status_lists_the_positive_sets(study, run_cli):
    dbp, data, image_ids, captions = study
    before = run_cli("status", "--db", dbp).output
    assert "positives" not in before  # optional stage: nothing said while none was imported
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    out = run_cli("status", "--db", dbp).output
    n_caps = sum(len(v) for v in captions.values())
    assert "positive set 1: cxc 0.1.0" in out and f"{n_caps} of {n_caps} captions" in out
    assert out.index("positive set 1") < out.index("retrieval run")  # after ingest, before evaluate


# ----------------------------------------------------------------------------- improvement runs (issue 27, part 5)

CATEGORIES = "Ambiguous,Object,Attribute,Action,Context,Count,Spatial"


@pytest.fixture(scope="module")
def labelled_master(study_master, tmp_path_factory):
    """The study with a failure sample of run 1 (30 failures: 6 overlap, 8 per annotator) and simulated labels."""
    from toolkit.labels.sample import sample_failures
    from toolkit.labels.simulate import simulate_labels

    root, dbp, *_ = study_master
    dest = tmp_path_factory.mktemp("positives_labelled") / "study"
    shutil.copytree(root, dest)
    with open_study(dest / Path(dbp).name) as con:
        sample_failures(con, 1, n=30, seed=42, overlap=6, per_annotator=8, out_dir=dest / "fa", pictures=False)
        simulate_labels(con, dest / "fa", dest / "labels", seed=0)
    return dest, Path(dbp).name


@pytest.fixture
def labelled(labelled_master, study_master, tmp_path):
    """A private copy of the labelled study: (database path, package data, image ids, captions)."""
    root, name = labelled_master
    dest = tmp_path / "labelled"
    shutil.copytree(root, dest)
    return str(dest / name), *study_master[2:]


class _Oracle:
    """Test methods (registered by the `test_methods` fixture, as a plugin would be): each caption's own image
    on top (oracle), a per-image bias (bias), or the raw scores rounded to one decimal, so that images tie
    (quantize). `transform(S, G, gt)` is the same arithmetic, for the numpy reference."""

    @staticmethod
    def transform(S, G, gt):
        S = np.array(S, dtype=np.float64, copy=True)
        S[np.arange(len(gt)), gt] = S.max(axis=1) + 1.0
        return S


class _Bias:
    @staticmethod
    def transform(S, G, gt):
        return S + np.float32(0.25) * G[:, 0][None, :]


class _Quantize:
    @staticmethod
    def transform(S, G, gt):
        return np.round(np.asarray(S, dtype=np.float64), 1)


TEST_METHODS = {"test-oracle": _Oracle, "test-bias": _Bias, "test-quantize": _Quantize}


@pytest.fixture
def test_methods(monkeypatch):
    from toolkit.improve import methods as M

    def make(name, impl):
        class TestMethod(M.Method):
            def load(self, con, run, pops, images, texts):
                return {int(c): int(g) for p in pops for c, g in zip(p.captions["caption_id"], p.captions["gt_index"])}

            def score(self, block):
                gt = np.array([block.state[int(c)] for c in block.caption_ids], dtype=np.int64)
                return impl.transform(block.scores, block.images, gt)

        m = TestMethod()
        m.name, m.summary = name, f"test method {name}"
        return M.Entry(name, f"tests.test_positives:{impl.__name__}", "clipfail-test-methods", method=m)

    real = M.registry()
    extra = {name: make(name, impl) for name, impl in TEST_METHODS.items()}
    monkeypatch.setattr(M, "registry", lambda: {**real, **extra})


def _improve(dbp, method, **kw):
    from toolkit.improve.stage import improve

    with open_study(dbp) as con:
        return improve(con, CATEGORIES, retrieval_run_id=1, method=method, max_subset=None, **kw)


def _place(row, positives, pessimistic: bool) -> int:
    """The first place of any positive in one query's score row: 1 + items scoring strictly higher (optimistic), or,
    per score value of the positives, the end of its tie group less the positives in it (pessimistic)."""
    best = None
    for v in {row[p] for p in positives}:
        higher, equal = int((row > v).sum()), int((row == v).sum())
        inside = sum(row[p] == v for p in positives)
        place = higher + 1 if not pessimistic else higher + equal - inside + 1
        best = place if best is None else min(best, place)
    return best


def _mcnemar(b, a) -> float:
    """The exact two-sided McNemar p, written out with math.comb."""
    import math

    lose, gain = int((b & ~a).sum()), int((~b & a).sum())
    n = lose + gain
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(lose, gain) + 1)) / 2**n)


def _reference(con, iid: int, transform, positives_of) -> dict:
    """{k: (baseline hits, improved hits) under both counts} of improvement run `iid`, from the embedding files:
    the toolkit's scores, the test method's transform of them, and each caption's positives (positives_of)."""
    from toolkit.retrieval.ranking import score_rows
    from toolkit.store import artifacts

    img_set, txt_set = con.execute(
        "SELECT image_embedding_set_id, text_embedding_set_id FROM retrieval_runs WHERE retrieval_run_id = 1"
    ).fetchone()
    images, texts = artifacts.load_embedding_set(con, img_set), artifacts.load_embedding_set(con, txt_set)
    caps = con.execute(
        "SELECT caption_id, improved_rank, improved_n_tied FROM improvement_ranks WHERE improvement_id = ? "
        "ORDER BY caption_id",
        [iid],
    ).df()
    gt_of = dict(con.execute("SELECT caption_id, image_id FROM subset_captions").fetchall())
    col = {int(i): j for j, i in enumerate(images.item_ids)}
    row = {int(c): j for j, c in enumerate(texts.item_ids)}
    S = score_rows(texts.array[[row[c] for c in caps["caption_id"]]], images.array)
    gt = np.array([col[gt_of[c]] for c in caps["caption_id"]])
    S2 = np.asarray(transform(S, images.array, gt))
    # the reference scores are the method's: its own image's rank and ties come back as improve stored them
    own = [_place(S2[i], [gt[i]], False) for i in range(len(gt))]
    assert own == caps["improved_rank"].tolist()
    assert [int((S2[i] == S2[i, gt[i]]).sum()) - 1 for i in range(len(gt))] == caps["improved_n_tied"].tolist()
    places = {}
    for side, M in (("baseline", S), ("improved", S2)):
        for pess in (False, True):
            places[side, pess] = np.array(
                [_place(M[i], [col[p] for p in positives_of(int(c))], pess) for i, c in enumerate(caps["caption_id"])]
            )
    return {
        "caption_id": caps["caption_id"].to_numpy(),
        "places": places,
        "hits": {(k, side, pess): places[side, pess] <= k for k in (1, 5, 10) for side, pess in places},
    }


def _positives_of(con, source: str, data) -> callable:
    """Each caption's positives for `source`: the package's pairs inside the study plus the COCO pair (data), or
    its COCO image alone for a caption the source does not cover."""
    imgs = {int(r[0]) for r in con.execute("SELECT image_id FROM subset_images").fetchall()}
    gt_of = dict(con.execute("SELECT caption_id, image_id FROM subset_captions").fetchall())
    lists = _restricted(data[source, "caption_to_image"], set(gt_of), imgs, data["original", "caption_to_image"])
    return lambda c: lists.get(c, [gt_of[c]])


@pytest.mark.parametrize("method", ["test-bias", "test-quantize"])
def test_improvement_recall_extended_equals_a_numpy_recomputation(labelled, run_cli, test_methods, method):
    """improvement_hits_extended and improvement_recall_extended (both counts, the headline, the interval and the
    McNemar p) against the hits recomputed from the embeddings, the method's arithmetic and the package's lists.
    test-quantize makes images tie (rounded scores): the pessimistic count is then the headline, and no gain comes
    from the ties."""
    from toolkit import stats

    dbp, data, *_ = labelled
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    res = _improve(dbp, method)
    iid = res.improvement_ids[0]
    assert res.extended_ids == [iid]
    with open_study(dbp) as con:
        view = con.execute("SELECT * FROM improvement_recall_extended WHERE improvement_id = ?", [iid]).df()
        plain = con.execute("SELECT k, delta_pp, tie_count FROM improvement_recall WHERE improvement_id = ?", [iid])
        plain = plain.df().set_index("k")
        assert sorted(set(view["source"])) == ["cxc", "eccv"] and len(view) == 6
        gaps = []
        for source in ("cxc", "eccv"):
            ref = _reference(con, iid, TEST_METHODS[method].transform, _positives_of(con, source, data))
            hits = con.execute(
                "SELECT caption_id, k, baseline_first_rank, baseline_first_rank_pessimistic, improved_first_rank, "
                "improved_first_rank_pessimistic, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic, "
                "is_improved_hit_pessimistic FROM improvement_hits_extended WHERE improvement_id = ? AND source = ? "
                "ORDER BY caption_id, k",
                [iid, source],
            ).df()
            one = hits[hits["k"] == 1]
            assert one["caption_id"].tolist() == ref["caption_id"].tolist()
            for side in ("baseline", "improved"):
                assert one[f"{side}_first_rank"].tolist() == ref["places"][side, False].tolist()
                assert one[f"{side}_first_rank_pessimistic"].tolist() == ref["places"][side, True].tolist()
            rows = view[view["source"] == source].set_index("k")
            n = len(ref["caption_id"])
            affected = False
            for k in (1, 5, 10):
                h = {key[1:]: v for key, v in ref["hits"].items() if key[0] == k}
                got = hits[hits["k"] == k]
                assert got["is_improved_hit_pessimistic"].tolist() == h["improved", True].tolist()
                gap = max(int(h[s, False].sum()) - int(h[s, True].sum()) for s in ("baseline", "improved"))
                affected |= gap * 10000 > n
                gaps.append(gap)
                r = rows.loc[k]
                assert r["n"] == n
                for side in ("baseline", "improved"):
                    assert r[f"{side}_pct_optimistic"] == round(100 * h[side, False].mean(), 2)
                    assert r[f"{side}_pct_pessimistic"] == round(100 * h[side, True].mean(), 2)
                assert r["coco_delta_pp"] == plain.loc[k, "delta_pp"]
            for k in (1, 5, 10):
                h = {key[1:]: v for key, v in ref["hits"].items() if key[0] == k}
                r = rows.loc[k]
                b, a = h["baseline", affected], h["improved", affected]  # the headline count
                assert r["tie_count"] == ("pessimistic" if affected else "optimistic")
                assert r["delta_pp"] == round(100 * (a.mean() - b.mean()), 2)
                assert (r["n_fixed"], r["n_broken"]) == (int((~b & a).sum()), int((b & ~a).sum()))
                assert r["mcnemar_p"] == pytest.approx(_mcnemar(b, a), rel=1e-12)
                lo, hi = stats.paired_bootstrap_ci(b, a, seed=42)
                assert (r["ci_low_pp"], r["ci_high_pp"]) == (round(100 * lo, 2), round(100 * hi, 2))
    if method == "test-quantize":  # the ties are real here, and they are counted against the method
        assert max(gaps) > 0 and set(view["tie_count"]) == {"pessimistic"}
        assert (view["improved_pct"] <= view["improved_pct_optimistic"]).all()
        assert (view["improved_pct"] < view["improved_pct_optimistic"]).any()
    else:
        assert max(gaps) == 0 and set(view["tie_count"]) == {"optimistic"}


def test_a_swap_of_one_valid_image_for_another_gains_nothing_with_extended_positives(labelled, run_cli, test_methods,
                                                                                      tmp_path):  # fmt: skip
    """Hand-built: the top-1 image of one labelled failure is declared a verified positive of its caption (a file
    source). The oracle method puts every caption's own image on top: plain R@1 counts that caption as fixed,
    extended R@1 does not (a valid image was on top before and after), so its delta is one caption smaller."""
    dbp, *_ = labelled
    with open_study(dbp) as con:
        c0, b0 = con.execute(
            "SELECT r.query_id, r.top1_id FROM retrieval_ranks r JOIN sample_labels l "
            "ON l.retrieval_run_id = r.retrieval_run_id AND l.caption_id = r.query_id "
            "WHERE r.retrieval_run_id = 1 AND NOT l.is_overlap ORDER BY r.query_id LIMIT 1"  # improve leaves it out
        ).fetchone()
    f = tmp_path / "swap.json"
    f.write_text(json.dumps({"caption_to_image": {str(c0): [b0]}}))
    run_cli("positives", "import", "--file", f, "--db", dbp)
    iid = _improve(dbp, "test-oracle").improvement_ids[0]
    with open_study(dbp) as con:
        plain = con.execute("SELECT * FROM improvement_recall WHERE improvement_id = ? AND k = 1", [iid]).df().iloc[0]
        ext = con.execute("SELECT * FROM improvement_recall_extended WHERE improvement_id = ? AND k = 1", [iid]).df()
        hit = con.execute(
            "SELECT baseline_first_rank, improved_first_rank, is_covered, n_extra_positives "
            "FROM improvement_hits_extended WHERE improvement_id = ? AND caption_id = ? AND k = 1",
            [iid, c0],
        ).fetchone()
    n = int(plain["n"])
    assert len(ext) == 1 and ext["source"][0] == "file:swap.json" and int(ext["n"][0]) == n
    assert (plain["baseline_pct"], plain["improved_pct"], plain["n_fixed"]) == (0.0, 100.0, n)
    e = ext.iloc[0]
    assert hit == (1, 1, True, 1)  # its verified positive first before, its own image first after
    assert int(e["n_covered"]) == 1 and (e["n_fixed"], e["n_broken"]) == (n - 1, 0)
    assert e["baseline_pct"] == round(100 / n, 2) and e["improved_pct"] == 100.0
    assert e["delta_pp"] == round(100 * (n - 1) / n, 2) < plain["delta_pp"] == e["coco_delta_pp"]
    assert e["tie_count"] == "optimistic"


def test_improve_again_ranks_a_run_made_before_the_import(labelled, run_cli, tmp_path):
    """A study without positives gets no extended row. After the import, the same `clipfail improve` again
    (a no-op for its runs) scores them once more and stores their extended ranks and statistics, without a new
    runs row; they equal those of the same run made after the import. A third time is a no-op."""
    dbp, *_ = labelled
    first = tmp_path / "first"  # the other order: import, then improve
    shutil.copytree(Path(dbp).parent, first)
    args = ("improve", "--categories", CATEGORIES, "--run", 1, "--method", "inverted-softmax", "--max-subset", 1000)
    run_cli(*args, "--db", dbp)
    tables = ("improvement_positive_ranks", "improvement_stats_extended", "positive_ranks")
    with open_study(dbp) as con:
        assert [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables] == [0, 0, 0]
        n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    for db_path, order in ((dbp, "improve first"), (str(first / Path(dbp).name), "import first")):
        imported = run_cli("positives", "import", "--source", "eccv", "--db", db_path)
        late = "Improvement run(s) 1 were made before the positives were imported: run their clipfail improve"
        assert (late in imported.output) == (order == "improve first")
        res = run_cli(*args, "--db", db_path)
        if order == "improve first":
            assert "Extended positives ranked for improvement run(s) 1" in res.output
            assert "Already computed" not in res.output
    again = run_cli(*args, "--db", dbp)
    assert "Already computed with exactly this configuration; nothing changed." in again.output
    with open_study(dbp) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_runs + 1  # the import's own run
        got = {t: con.execute(f"SELECT * EXCLUDE (improvement_id) FROM {t} ORDER BY ALL").df() for t in tables[:2]}
        view = con.execute("SELECT * EXCLUDE (run_id) FROM improvement_recall_extended").df()
    with open_study(str(first / Path(dbp).name)) as con:
        want = {t: con.execute(f"SELECT * EXCLUDE (improvement_id) FROM {t} ORDER BY ALL").df() for t in tables[:2]}
        view_first = con.execute("SELECT * EXCLUDE (run_id) FROM improvement_recall_extended").df()
    assert len(got["improvement_positive_ranks"]) > 0 and len(view) == 3
    for t in tables[:2]:
        pd.testing.assert_frame_equal(got[t], want[t])
    pd.testing.assert_frame_equal(view, view_first)


def test_false_negatives_triage_agreement(labelled, run_cli):
    """Triage against the human labels on the verified false negatives only, per reference, against a plain pandas
    join and toolkit.stats.cohen_kappa; a triage run made before the import decided them with the heuristic rules,
    the next one with the Verified rule (Ambiguous)."""
    from toolkit.stats import cohen_kappa

    dbp, *_ = labelled
    run_cli("triage", "--run", 1, "--db", dbp)
    with open_study(dbp) as con:
        assert con.execute("SELECT count(*) FROM false_negatives_triage_agreement").fetchone()[0] == 0  # no positives
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    for when in ("triage before the import", "triage after the import"):
        if when == "triage after the import":
            run_cli("triage", "--run", 1, "--db", dbp)
        with open_study(dbp) as con:
            verified = {
                int(r[0])
                for r in con.execute(
                    "SELECT query_id FROM failure_false_negatives "
                    "WHERE retrieval_run_id = 1 AND is_top1_extended_positive"
                ).fetchall()
            }
            sug = con.execute(
                "SELECT caption_id, suggested_category, rules_fired FROM triage_suggestions "
                "WHERE triage_run_id = (SELECT max(triage_run_id) FROM triage_runs)"
            ).df()
            labels = con.execute(
                "SELECT s.caption_id, a.annotator AS reference, a.category FROM annotations a "
                "JOIN failure_samples s USING (sample_id) WHERE s.set_name = 'overlap' OR a.annotator = s.set_name"
            ).df()
            everyone = con.execute(
                "SELECT caption_id, 'all labels' AS reference, category FROM sample_labels UNION ALL "
                "SELECT caption_id, 'overlap majority', category FROM sample_labels WHERE is_overlap"
            ).df()
            view = con.execute("SELECT * FROM false_negatives_triage_agreement WHERE retrieval_run_id = 1").df()
        refs = pd.concat([labels, everyone])
        refs = refs[refs["caption_id"].isin(verified)].merge(sug, on="caption_id")
        assert len(refs) > 0  # some labelled failure is a verified false negative here
        got = view.set_index("reference")
        for ref, g in refs.groupby("reference"):
            s = g[g["suggested_category"].notna()]
            row = got.loc[ref]
            assert (row["n_labelled"], row["n"]) == (len(g), len(s))
            assert row["n_agree"] == int((s["suggested_category"] == s["category"]).sum())
            assert row["n_human_ambiguous"] == int((g["category"] == "Ambiguous").sum())
            assert row["n_suggested_ambiguous"] == int((g["suggested_category"] == "Ambiguous").sum())
            by_rule = int(s["rules_fired"].str.startswith("Verified").sum())
            assert row["n_by_verified_rule"] == by_rule
            assert by_rule == (len(s) if when == "triage after the import" else 0)
            kappa = cohen_kappa(s["category"].tolist(), s["suggested_category"].tolist())
            assert (None if pd.isna(row["kappa"]) else row["kappa"]) == (
                None if np.isnan(kappa) else pytest.approx(kappa, abs=1e-12)
            )
        assert sorted(got.index) == sorted(set(refs["reference"]))


def test_report_section_are_the_misses_real(labelled, run_cli, tmp_path):
    """Section 12 on a study with positives: every table is its view (the CSVs), the figure of the verified
    false-negative share per category is embedded, a source's name is escaped, and an improvement run made before
    the import is named with what to run until `clipfail improve` again adds its extended deltas."""
    from html import unescape

    from toolkit.report.display import extended_improvement_table
    from toolkit.report.htmlpage import Context, Page
    from toolkit.report.sections import positives as positives_section

    dbp, *_ = labelled
    args = ("improve", "--categories", CATEGORIES, "--run", 1, "--method", "inverted-softmax", "--max-subset", 1000)
    run_cli(*args, "--db", dbp)
    run_cli("positives", "import", "--source", "eccv", "--db", dbp)
    run_cli("positives", "import", "--source", "cxc", "--db", dbp)
    with open_study(dbp) as con:
        c, i = con.execute("SELECT caption_id, image_id FROM subset_captions ORDER BY 1 LIMIT 1").fetchone()
        other = con.execute("SELECT min(image_id) FROM subset_images WHERE image_id <> ?", [i]).fetchone()[0]
    odd = tmp_path / "mine<b>&.json"
    odd.write_text(json.dumps({"caption_to_image": {str(c): [other]}}))
    run_cli("positives", "import", "--file", odd, "--db", dbp)
    run_cli("triage", "--run", 1, "--db", dbp)
    with open_study(dbp, read_only=True) as con:  # the section alone, before improve ranks the positives
        ctx = Context(con, Page(tmp_path / "section"), 1)
        positives_section.render(ctx)
    late = "".join(ctx.page.parts)
    assert "Improvement run(s) 1 were made before the positives were imported" in late
    assert ctx.missing == ["extended positives of improvement run(s) 1: clipfail improve (the same options)"]
    assert 'data-name="improvement_recall_extended"' not in late
    run_cli(*args, "--db", dbp)
    out = tmp_path / "report"
    res = run_cli("report", "--out", out, "--db", dbp)
    assert "extended positives of improvement run" not in res.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<h2 id="positives">12. Are the misses real?</h2>' in page
    assert "were made before the positives were imported" not in page
    assert "mine<b>" not in page and "file:mine&lt;b&gt;&amp;.json" in page
    tables = out / "tables"
    with open_study(dbp) as con:
        views = {
            "positive_coverage": "SELECT * FROM positive_coverage ORDER BY positive_set_id, direction DESC",
            "false_negatives_by_category": "SELECT * EXCLUDE (retrieval_run_id) FROM false_negatives_by_category",
            "false_negatives_triage_agreement": "SELECT reference, n_labelled, n, n_agree, accuracy, kappa, "
            "n_human_ambiguous, n_suggested_ambiguous, n_by_verified_rule FROM false_negatives_triage_agreement",
            "false_negatives_by_triage_rule": "SELECT * EXCLUDE (retrieval_run_id) FROM false_negatives_by_triage_rule",
        }
        want = {name: con.execute(sql).df() for name, sql in views.items()}
        metrics = con.execute("SELECT * FROM recall_extended").df()
        extended = con.execute("SELECT * FROM improvement_recall_extended ORDER BY improvement_id, source, k").df()
    for name, df in want.items():
        assert len(df) > 0, name
        pd.testing.assert_frame_equal(pd.read_csv(tables / f"{name}.csv"), df, check_dtype=False)
    shown = pd.read_csv(tables / "recall_extended.csv")
    key = ["retrieval_run_id", "source", "metric", "k"]
    joined = shown.merge(metrics, on=key, how="outer", suffixes=("", "_view"), indicator=True)
    assert len(shown) == len(metrics) and (joined["_merge"] == "both").all()
    assert np.allclose(joined["value"], joined["value_view"], rtol=1e-15, atol=0)
    assert sorted(set(shown["source"])) == ["coco", "cxc", "eccv", "file:mine<b>&.json"]
    assert len(extended) == 9  # eccv, cxc and the file, K 1/5/10
    pd.testing.assert_frame_equal(
        pd.read_csv(tables / "improvement_recall_extended.csv"),
        extended_improvement_table(extended),
        check_dtype=False,
    )
    figure = next((out / "figures").glob("figure*_false_negatives.png"))
    assert figure.with_suffix(".svg").exists()
    caption = "Share of each category's checkable R@1 failures whose top-1 image is a verified positive"
    assert f"{figure.stem.split('_')[0].replace('figure', 'Figure ')}. {caption}" in unescape(page)
