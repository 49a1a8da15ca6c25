"""Triage (issue 16): instances ingest, evidence rules on generated failures, agreement views vs a plain reference."""

from __future__ import annotations

import importlib
import json
from decimal import ROUND_HALF_UP, Decimal

import duckdb
import numpy as np
import pandas as pd
import pytest
from helpers import register_hand_built

from toolkit.ingest.synthetic import Group, Scene, make_synthetic_coco
from toolkit.store import db
from toolkit.store.study import open_study


def _table(path, sql, params=None):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, params or []).df()
    finally:
        con.close()


# --- generated failures with a known difference ---------------------------------------------------

# Three pairs of scenes; in each pair the first is the ground truth of a query whose top-1 is the second.
PAIRS = {
    "Count": (
        Scene([Group(2, "red", "circle", "left", "large")]),
        Scene([Group(3, "red", "circle", "left", "large")]),
        "Two red circles on the left",
    ),
    "Object": (
        Scene([Group(2, "red", "circle", "left", "large")]),
        Scene([Group(2, "red", "square", "left", "large")]),
        "Two red circles on the left",
    ),
    "Spatial": (
        Scene([Group(2, "red", "circle", "left", "small"), Group(3, "blue", "square", "right", "small")]),
        Scene([Group(2, "red", "circle", "right", "small"), Group(3, "blue", "square", "left", "small")]),
        "Two red circles to the left of three blue squares",
    ),
}


def _scene_dataset(root):
    """Six drawn images (GT, top-1 per pair), three captions each; the first caption of a GT is the query."""
    scenes = []
    for _cat, (gt, top, query) in PAIRS.items():
        gt.captions = [query, "A drawing of shapes", "Shapes on a grey background"]
        top.captions = ["Some shapes drawn here", "A grey picture", "Coloured shapes"]
        scenes += [gt, top]
    make_synthetic_coco(root, len(scenes), seed=5, size=(160, 120), scenes=scenes)
    return root


def _hand_built_embeddings(con, tmp_path, subset_name):
    """Image k is basis e_k. Caption of image k: 0.3 e_k + f_k (a caption-only direction), so it finds its image.
    A query: 0.4 e_gt + 0.6 e_top + f_gt, so its top-1 is the chosen image while its nearest captions stay its own."""
    sid = int(db.get_subset(con, subset_name)["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute(
        "SELECT sc.caption_id, sc.image_id, c.text FROM subset_captions sc JOIN captions c USING (caption_id) "
        "WHERE sc.subset_id = ? ORDER BY sc.caption_id",
        [sid],
    ).df()
    ids = [int(i) for i in imgs["image_id"]]
    n = len(ids)
    img = np.eye(n, 2 * n, dtype=np.float32)
    txt = np.zeros((len(caps), 2 * n), dtype=np.float32)
    queries = {q: cat for cat, (_g, _t, q) in PAIRS.items()}
    for r, (iid, text) in enumerate(zip(caps["image_id"], caps["text"])):
        k = ids.index(int(iid))
        if text in queries and k % 2 == 0:
            txt[r, k], txt[r, k + 1], txt[r, n + k] = 0.4, 0.6, 1.0
        else:
            txt[r, k], txt[r, n + k] = 0.3, 1.0
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    register_hand_built(con, tmp_path / "image.npy", "image", img, ids, sid)
    register_hand_built(con, tmp_path / "text.npy", "text", txt, caps["caption_id"], sid)
    return ids, caps


def test_generated_failures_get_count_object_and_spatial(run_cli, tmp_path, tmp_db):
    root = _scene_dataset(tmp_path / "scenes")
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", root, "--num-images", "all", "--name", "scenes")
    assert "object instances: " in res.output
    con = open_study(tmp_db)
    ids, caps = _hand_built_embeddings(con, tmp_path, "scenes")
    con.close()
    run_cli("--db", tmp_db, "evaluate", "--subset", "scenes", "--device", "cpu")
    res = run_cli("--db", tmp_db, "triage")
    assert "3 R@1 failures triaged" in res.output

    got = _table(
        tmp_db,
        "SELECT t.*, c.text FROM triage_suggestions t JOIN captions c USING (caption_id) ORDER BY gt_image_id",
    )
    assert len(got) == 3  # only the three queries fail
    for k, (cat, (_gt, _top, query)) in enumerate(PAIRS.items()):
        row = got.iloc[k]
        assert row["text"] == query
        assert (row["gt_image_id"], row["top1_image_id"]) == (ids[2 * k], ids[2 * k + 1])
        assert row["suggested_category"] == cat, (cat, row["evidence"])
        assert row["evidence"].startswith(f"{cat}: ")
        assert not row["is_hub"]
        # the query's own captions stay closer than the top-1's: the cosine part of Ambiguous does not fire
        assert row["own_caption_cosine"] > row["top1_caption_cosine"]
    count, obj, spatial = (got.iloc[k] for k in range(3))
    assert count["count_evidence"] == "caption says 2 circle: GT has 2, top-1 has 3"
    assert pd.isna(count["object_evidence"]) and pd.isna(count["spatial_evidence"])
    assert obj["object_evidence"] == "circle in GT, not in top-1"
    assert spatial["spatial_evidence"] == "circle left of square: holds in GT, not in top-1"
    assert pd.isna(spatial["object_evidence"]) and pd.isna(spatial["count_evidence"])
    # the same category set also makes count and spatial failures Ambiguous, at a lower priority
    assert count["rules_fired"].split(",")[:2] == ["Count", "Ambiguous"]

    inst = _table(tmp_db, "SELECT image_id, category_name, count(*) AS n FROM image_instances GROUP BY ALL")
    assert inst.set_index(["image_id", "category_name"])["n"].to_dict() == {
        (ids[0], "circle"): 2, (ids[1], "circle"): 3, (ids[2], "circle"): 2, (ids[3], "square"): 2,
        (ids[4], "circle"): 2, (ids[4], "square"): 3, (ids[5], "circle"): 2, (ids[5], "square"): 3,
    }  # fmt: skip

    # re-running with the same inputs changes nothing
    res = run_cli("--db", tmp_db, "triage")
    assert "already triaged" in res.output
    assert _table(tmp_db, "SELECT count(*) AS n FROM triage_runs")["n"].iloc[0] == 1

    # the estimated distribution covers every failure
    dist = _table(tmp_db, "SELECT * FROM triage_distribution").set_index("category")
    assert dist.loc[["Count", "Object", "Spatial"], "n_triage"].tolist() == [1, 1, 1]
    assert dist["n_triage"].sum() == 3 and dist.loc["Count", "percent_of_failures"] == pytest.approx(33.33)


# --- rules on their own ------------------------------------------------------------------------------


def test_caption_facts_use_the_phrases_lexicon_and_category_names():
    T = importlib.import_module("toolkit.labels.triage")

    index = T.object_index(["circle"])
    facts = T.caption_facts("Two men riding horses to the left of 3 circles", index)
    assert facts.mentioned == ["person", "horse", "circle"]
    assert facts.counts == {"person": 2, "circle": 3}
    assert facts.relations == [("left", "horse", "circle")]
    assert T.caption_facts("A man with an orange shirt", index).mentioned == ["person"]  # a colour, not the fruit
    assert T.caption_facts("a dog sitting under a table", index).relations == [("below", "dog", "dining table")]


# --- agreement against a plain Python reference --------------------------------------------------------


def _kappa(pairs):
    n = len(pairs)
    agree = sum(a == b for a, b in pairs) / n
    cats = {c for p in pairs for c in p}
    pe = sum((sum(a == c for a, _ in pairs) / n) * (sum(b == c for _, b in pairs) / n) for c in cats)
    return agree, (None if pe == 1 else (agree - pe) / (1 - pe))


def test_agreement_views_match_a_python_reference(tmp_path, synthetic_coco):
    from toolkit.ingest.stage import ingest
    from toolkit.labels.sample import sample_failures
    from toolkit.labels.simulate import simulate_labels
    from toolkit.labels.triage import triage
    from toolkit.retrieval.evaluate import evaluate

    con = open_study(tmp_path / "agree.duckdb")
    ingest(con, coco_root=synthetic_coco, num_images=40, captions_per_image=5, seed=42, name="s40")
    sid = int(db.get_subset(con, "s40")["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute("SELECT caption_id FROM subset_captions WHERE subset_id = ? ORDER BY caption_id", [sid]).df()
    rng = np.random.default_rng(2)
    img = rng.normal(size=(len(imgs), 8)).astype(np.float32)
    txt = rng.normal(size=(len(caps), 8)).astype(np.float32)
    register_hand_built(con, tmp_path / "i.npy", "image", img, imgs["image_id"], sid)
    register_hand_built(con, tmp_path / "t.npy", "text", txt, caps["caption_id"], sid)
    evaluate(con, "s40", device="cpu")
    res = triage(con)
    assert res.is_instances_used and res.n_failures > 150
    sample_failures(con, n=100, seed=42, overlap=10, per_annotator=30, out_dir=tmp_path / "fa", pictures=False)
    sugg = dict(con.execute("SELECT caption_id, suggested_category FROM triage_suggestions").fetchall())
    evidence = dict(con.execute("SELECT caption_id, evidence FROM triage_suggestions").fetchall())

    # the annotators' CSVs carry the suggestion and its evidence; the overlap set's stay blank by default
    def csv(name):
        return pd.read_csv(tmp_path / "fa" / name, encoding="utf-8-sig", dtype=str, keep_default_na=False)

    a_csv = csv("assign_A.csv")
    assert list(a_csv["suggested_category"]) == [sugg[int(c)] or "" for c in a_csv["caption_id"]]
    assert list(a_csv["evidence"]) == [evidence[int(c)] if sugg[int(c)] else "" for c in a_csv["caption_id"]]
    assert (a_csv["suggested_category"] != "").sum() > 10
    assert (csv("assign_overlap.csv")[["suggested_category", "evidence"]] == "").all().all()
    assert (csv("failure_samples.csv").query("set_name == 'overlap'")["suggested_category"] == "").all()
    sample_failures(
        con, n=100, seed=42, overlap=10, per_annotator=30, out_dir=tmp_path / "fa", pictures=False,
        show_suggestions_on_overlap=True,
    )  # fmt: skip
    ov = csv("assign_overlap.csv")
    assert list(ov["suggested_category"]) == [sugg[int(c)] or "" for c in ov["caption_id"]]
    simulate_labels(con, tmp_path / "fa", tmp_path / "labels", seed=3)

    assert len(sugg) == res.n_failures and len(set(sugg.values()) - {None}) >= 3
    view = con.execute("SELECT * FROM triage_agreement").df().set_index("reference")
    refs = {}
    for annotator, set_name, caption_id, category in con.execute(
        "SELECT a.annotator, s.set_name, s.caption_id, a.category FROM annotations a "
        "JOIN failure_samples s USING (sample_id)"
    ).fetchall():
        if set_name in ("overlap", annotator):
            refs.setdefault(annotator, []).append((caption_id, category))
    labels = con.execute("SELECT caption_id, category, is_overlap FROM sample_labels").fetchall()
    refs["overlap majority"] = [(c, k) for c, k, o in labels if o]
    refs["all labels"] = [(c, k) for c, k, _ in labels]
    assert set(view.index) == set(refs) == {"A", "B", "C", "overlap majority", "all labels"}
    for ref, items in refs.items():
        pairs = [(sugg[c], k) for c, k in items if sugg[c] is not None]
        row = view.loc[ref]
        assert (row["n_labelled"], row["n"]) == (len(items), len(pairs))
        accuracy, kappa = _kappa(pairs)
        assert row["accuracy"] == pytest.approx(accuracy)
        assert row["kappa"] == pytest.approx(kappa)
        assert row["accuracy_labelled"] == pytest.approx(sum(a == b for a, b in pairs) / len(items))

    conf = con.execute("SELECT * FROM triage_confusion").df()
    expect = {}
    for c, k, _ in labels:
        key = (k, sugg[c] or "(none)")
        expect[key] = expect.get(key, 0) + 1
    assert dict(zip(zip(conf["human_category"], conf["suggested_category"]), conf["n"])) == expect

    dist = con.execute("SELECT * FROM triage_distribution").df().set_index("category")
    values = list(sugg.values())
    n_suggested = sum(v is not None for v in values)
    for cat in dist.index:
        n_cat = sum((v or "(none)") == cat for v in values)
        assert dist.loc[cat, "n_triage"] == n_cat
        half_up = Decimal(100 * n_cat) / len(values)
        assert dist.loc[cat, "percent_of_failures"] == float(half_up.quantize(Decimal("0.01"), ROUND_HALF_UP))
        if cat != "(none)":
            half_up = Decimal(100 * n_cat) / n_suggested
            assert dist.loc[cat, "percent_of_suggested"] == float(half_up.quantize(Decimal("0.01"), ROUND_HALF_UP))
    human = con.execute("SELECT category, count FROM taxonomy_distribution").fetchall()
    for cat, n in human:
        assert dist.loc[cat, "n_human"] == n

    # the report's triage section shows the views' rows and the confusion matrix as a figure
    from toolkit.report.page import write_report

    rep = write_report(con, out_dir=tmp_path / "report")
    assert "7. Automatic triage" in rep.sections
    table = pd.read_csv(tmp_path / "report" / "tables" / "triage_agreement.csv")
    assert table["kappa"].tolist() == pytest.approx(view.loc[table["reference"], "kappa"].tolist())
    assert any(p.name.endswith("_triage.png") for p in rep.figures)
    con.close()


# --- bad input -----------------------------------------------------------------------------------------


def _counts(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("subsets", "images", "captions", "image_instances", "coco_categories", "instance_files", "runs")
        }
    finally:
        con.close()


def test_instances_for_other_images_are_refused_with_a_count(run_cli, synthetic_coco, tmp_db):
    path = synthetic_coco / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    dropped = {im["id"] for im in data["images"][:3]}
    data["images"] = data["images"][3:]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in dropped]
    path.write_text(json.dumps(data))
    run_cli("--db", tmp_db, "init")
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all", expect=2)
    assert "does not match the captions: 3 of the subset's 40 images" in res.output
    assert "Traceback" not in res.output
    assert set(_counts(tmp_db).values()) == {0}


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"images": [], "annotations": []}), "no 'categories'"),
        (
            json.dumps(
                {
                    "images": [{"id": 1}],
                    "categories": [{"id": 1, "name": "dog"}],
                    "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, "w", 2]}],
                }
            ),
            "bbox of 4 numbers",
        ),
    ],
)
def test_a_malformed_instances_file_is_refused_with_nothing_written(run_cli, synthetic_coco, tmp_db, content, needle):
    bad = synthetic_coco / "bad_instances.json"
    bad.write_text(content)
    run_cli("--db", tmp_db, "init")
    args = ["--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--instances-json", bad, "--num-images", 10]
    res = run_cli(*args, expect=2)
    assert needle in res.output and str(bad) in res.output and "Traceback" not in res.output
    assert set(_counts(tmp_db).values()) == {0}


def test_without_instances_triage_still_runs_and_says_what_is_missing(run_cli, synthetic_coco, tmp_db, tmp_path):
    (synthetic_coco / "annotations" / "instances_val2017.json").unlink()
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 20, "--name", "s20")
    assert "object instances" not in res.output
    con = open_study(tmp_db)
    sid = int(db.get_subset(con, "s20")["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute("SELECT caption_id FROM subset_captions WHERE subset_id = ? ORDER BY caption_id", [sid]).df()
    rng = np.random.default_rng(0)
    register_hand_built(con, tmp_path / "i.npy", "image", rng.normal(size=(len(imgs), 8)), imgs["image_id"], sid)
    register_hand_built(con, tmp_path / "t.npy", "text", rng.normal(size=(len(caps), 8)), caps["caption_id"], sid)
    con.close()
    run_cli("--db", tmp_db, "evaluate", "--device", "cpu")
    res = run_cli("--db", tmp_db, "triage")
    assert "No object instances for this subset" in res.output
    got = _table(tmp_db, "SELECT suggested_category, evidence FROM triage_suggestions")
    assert len(got) > 0
    assert not set(got["suggested_category"].dropna()) & {"Object", "Count", "Spatial"}
    assert got["evidence"].str.contains("no object instances ingested").all()


def test_triage_on_a_run_without_failures_says_so(run_cli, synthetic_coco, tmp_db, tmp_path):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--name", "s10")
    con = open_study(tmp_db)
    sid = int(db.get_subset(con, "s10")["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute("SELECT caption_id, image_id FROM subset_captions WHERE subset_id = ?", [sid]).df()
    eye = np.eye(len(imgs), dtype=np.float32)
    row = {int(i): k for k, i in enumerate(imgs["image_id"])}
    register_hand_built(con, tmp_path / "i.npy", "image", eye, imgs["image_id"], sid)
    register_hand_built(
        con, tmp_path / "t.npy", "text", eye[[row[int(i)] for i in caps["image_id"]]], caps["caption_id"], sid
    )
    con.close()
    run_cli("--db", tmp_db, "evaluate", "--device", "cpu")
    res = run_cli("--db", tmp_db, "triage")
    assert "has no R@1 failures: nothing to triage" in res.output
    assert _table(tmp_db, "SELECT count(*) AS n FROM triage_runs")["n"].iloc[0] == 0
    res = run_cli("--db", tmp_db, "triage", "--run", 99, expect=2)
    assert "No retrieval run with id 99" in res.output
    run_cli("--db", tmp_db, "evaluate", "--device", "cpu", "--direction", "image-to-text")
    res = run_cli("--db", tmp_db, "triage", "--run", 2, expect=2)
    assert "Retrieval run 2 is image-to-text; triage needs a text-to-image run" in res.output


def test_a_missing_instances_file_is_refused(run_cli, synthetic_coco, tmp_db):
    missing = synthetic_coco / "nope.json"
    args = ["--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--instances-json", missing, "--num-images", 5]
    res = run_cli(*args, expect=2)
    assert f"Instances file {missing} not found" in res.output and "Traceback" not in res.output
    assert set(_counts(tmp_db).values()) == {0}


def test_instances_added_to_a_subset_ingested_without_them(run_cli, synthetic_coco, tmp_db):
    inst = synthetic_coco / "annotations" / "instances_val2017.json"
    kept = inst.read_bytes()
    inst.unlink()
    args = ["--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--name", "s10"]
    run_cli(*args)
    assert _counts(tmp_db)["instance_files"] == 0
    inst.write_bytes(kept)
    res = run_cli(*args)
    assert "already ingested" in res.output
    n = _table(tmp_db, "SELECT count(*) AS n FROM image_instances")["n"].iloc[0]
    subset_images = set(_table(tmp_db, "SELECT image_id FROM subset_images")["image_id"])
    expected = sum(a["image_id"] in subset_images for a in json.loads(kept)["annotations"])
    assert n == expected > 0 and f"object instances: {n} stored" in res.output
    before = _counts(tmp_db)
    res = run_cli(*args)  # nothing new
    assert _counts(tmp_db) == before and "object instances: 0 stored" in res.output


def test_karpathy_ingest_does_not_pick_up_the_val2017_instances(run_cli, synthetic_coco, tmp_db):
    """Karpathy's split holds val2014 images: instances_val2017.json under --coco-root is not theirs."""
    coco = json.loads((synthetic_coco / "annotations" / "captions_val2017.json").read_text())
    inst = synthetic_coco / "annotations" / "instances_val2017.json"
    data = json.loads(inst.read_text())
    data["images"] = data["images"][:5]  # would be refused if it were read
    inst.write_text(json.dumps({**data, "annotations": []}))
    images = [
        {
            "filepath": "val2017", "filename": im["file_name"], "cocoid": im["id"], "split": "test",
            "sentences": [
                {"raw": a["caption"], "sentid": a["id"]} for a in coco["annotations"] if a["image_id"] == im["id"]
            ],
        }
        for im in coco["images"][:8]
    ]  # fmt: skip
    path = synthetic_coco / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    run_cli("--db", tmp_db, "ingest", "--karpathy-json", path, "--coco-root", synthetic_coco, "--num-images", "all")
    assert _counts(tmp_db)["instance_files"] == 0 and _counts(tmp_db)["subsets"] == 1


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e7", "1e400"])
def test_a_hub_factor_that_is_not_a_usable_number_is_one_message(run_cli, tmp_db, value):
    """Issue 24.14e: --hub-factor inf ended in a traceback (OverflowError in ceil); NaN passed click's range.
    Each is one message naming the option and its range, before anything opens the database."""
    res = run_cli("--db", tmp_db, "triage", "--hub-factor", value, expect=2)
    assert "Invalid value for '--hub-factor'" in res.output and "0<x<=1000000.0" in res.output
    assert "Traceback" not in res.output and res.output.count("Error:") == 1
    from toolkit.errors import UserError
    from toolkit.labels.triage import triage

    run_cli("--db", tmp_db, "init")
    with open_study(tmp_db) as con, pytest.raises(UserError, match="--hub-factor must be a number greater than 0"):
        triage(con, hub_factor=float(value))  # the Python API refuses the same values
