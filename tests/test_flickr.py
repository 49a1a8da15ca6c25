"""Flickr30k through Karpathy's dataset_flickr30k.json (issue 18), on a generated file in that format.

The expected subset is read straight from the generated JSON here: the test split's records, their
`imgid`s as image ids, their `sentid`s as caption ids, images under flickr30k-images/.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolkit.ingest.synthetic import make_synthetic_flickr30k
from toolkit.store import db
from toolkit.store.study import open_study


@pytest.fixture(scope="module")
def flickr_master(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    make_synthetic_flickr30k(root, 24, seed=5, n_test=9)
    return root


def _rows(dbp, sql, params=()):
    con = open_study(dbp, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def _expected_test_split(root):
    data = json.loads((root / "dataset_flickr30k.json").read_text(encoding="utf-8"))
    assert data["dataset"] == "flickr30k" and all("cocoid" not in im and "filepath" not in im for im in data["images"])
    test = [im for im in data["images"] if im["split"] == "test"]
    assert {im["split"] for im in data["images"]} == {"test", "val", "train"}
    return test


def test_the_test_split_is_ingested_whole_with_karpathys_ids(run_cli, tmp_path, flickr_master):
    dbp = str(tmp_path / "f.duckdb")
    out = run_cli(
        "--db", dbp, "ingest", "--karpathy-json", flickr_master / "dataset_flickr30k.json", "--split", "test",
        "--images-dir", flickr_master,
    ).output  # fmt: skip
    assert "flickr30k-test" in out
    test = _expected_test_split(flickr_master)
    assert _rows(dbp, "SELECT name, split, num_images FROM subsets") == [("flickr30k-test", "test", len(test))]
    got_images = _rows(
        dbp,
        "SELECT i.image_id, i.file_name, i.rel_path, i.width FROM subset_images s JOIN images i USING (image_id) "
        "ORDER BY s.position",
    )
    want = sorted((im["imgid"], im["filename"]) for im in test)
    assert [(g[0], g[1]) for g in got_images] == want
    assert all(g[2] == f"flickr30k-images/{g[1]}" and g[3] is not None for g in got_images)
    got_caps = _rows(dbp, "SELECT caption_id, image_id, position FROM subset_captions ORDER BY image_id, position")
    # each image keeps its first 5 captions (the default --captions-per-image) in ascending sentid
    want_caps = [
        (sid, im["imgid"])
        for im in sorted(test, key=lambda im: im["imgid"])
        for sid in sorted(s["sentid"] for s in im["sentences"])[:5]
    ]
    assert [(c[0], c[1]) for c in got_caps] == want_caps
    texts = dict(_rows(dbp, "SELECT caption_id, text FROM captions"))
    assert all(texts[s["sentid"]] == s["raw"].strip() for im in test for s in im["sentences"])
    # the same command again is a no-op
    again = run_cli(
        "--db", dbp, "ingest", "--karpathy-json", flickr_master / "dataset_flickr30k.json", "--split", "test",
        "--images-dir", flickr_master,
    ).output  # fmt: skip
    assert "nothing changed" in again


def test_images_dir_may_be_the_flickr30k_images_folder_itself(run_cli, tmp_path, flickr_master):
    dbp = str(tmp_path / "f.duckdb")
    run_cli(
        "--db", dbp, "ingest", "--karpathy-json", flickr_master / "dataset_flickr30k.json",
        "--images-dir", flickr_master / "flickr30k-images", "--split", "val",
    )  # fmt: skip
    rows = _rows(dbp, "SELECT file_name, rel_path FROM images")
    assert rows and all(f == r for f, r in rows)


def test_the_flickr_subset_goes_through_evaluate(run_cli, tmp_path, flickr_master):
    from helpers import register_hand_built

    from toolkit.retrieval.evaluate import evaluate

    dbp = str(tmp_path / "f.duckdb")
    run_cli("--db", dbp, "ingest", "--karpathy-json", flickr_master / "dataset_flickr30k.json",
            "--images-dir", flickr_master)  # fmt: skip
    con = open_study(dbp)
    try:
        sid = int(db.get_subset(con, "flickr30k-test")["subset_id"])
        imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
        caps = con.execute(
            "SELECT c.caption_id, c.image_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
            "WHERE c.subset_id = ? ORDER BY i.position, c.position",
            [sid],
        ).df()
        img = np.eye(len(imgs), 16, dtype=np.float32)  # caption = its image: every query a hit at rank 1
        row = {int(i): k for k, i in enumerate(imgs["image_id"])}
        txt = img[[row[int(i)] for i in caps["image_id"]]]
        register_hand_built(con, tmp_path / "i.npy", "image", img, imgs["image_id"], sid)
        register_hand_built(con, tmp_path / "t.npy", "text", txt, caps["caption_id"], sid)
        res = evaluate(con, "flickr30k-test", device="cpu")
    finally:
        con.close()
    assert res.n_queries == len(caps) and float(res.summary["r_at_1"].iloc[0]) == 1.0


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"imgid": 1.5}, ["images[0]", "imgid 1.5"]),
        ({"imgid": None}, ["imgid"]),
        ({"sentences": [{"sentid": 3, "raw": " "}]}, ["images[0]", "sentences[0]", "empty"]),
    ],
)
def test_bad_flickr_records_are_named_and_nothing_is_written(run_cli, tmp_path, flickr_master, change, needles):
    data = json.loads((flickr_master / "dataset_flickr30k.json").read_text(encoding="utf-8"))
    data["images"][0]["split"] = "test"
    data["images"][0].update(change)
    if change.get("imgid", 0) is None:
        del data["images"][0]["imgid"]
    bad = tmp_path / "dataset_flickr30k.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    dbp = str(tmp_path / "f.duckdb")
    run_cli("--db", dbp, "init")
    out = run_cli("--db", dbp, "ingest", "--karpathy-json", bad, "--images-dir", flickr_master, expect=2).output
    assert all(n in out for n in needles), out
    assert _rows(dbp, "SELECT count(*) FROM subsets") == [(0,)] and _rows(dbp, "SELECT count(*) FROM images") == [(0,)]


def test_an_unsupported_karpathy_dataset_is_refused(run_cli, tmp_path, flickr_master):
    data = json.loads((flickr_master / "dataset_flickr30k.json").read_text(encoding="utf-8"))
    data["dataset"] = "flickr8k"
    bad = tmp_path / "dataset_flickr8k.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    dbp = str(tmp_path / "f.duckdb")
    out = run_cli("--db", dbp, "ingest", "--karpathy-json", bad, "--images-dir", flickr_master, expect=2).output
    assert "dataset 'flickr8k'" in out and "dataset_flickr30k.json" in out
