"""Simulated annotators: seeded, imported through the CSV path, flagged as simulated, disagreeing on the overlap."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import register_hand_built

from toolkit.ingest.stage import ingest
from toolkit.labels.sample import sample_failures
from toolkit.labels.simulate import NOTE, simulate_labels
from toolkit.retrieval.evaluate import evaluate
from toolkit.store import db
from toolkit.store.study import open_study


def _register(con, tmp_path, kind, array, item_ids, subset_id):
    register_hand_built(con, tmp_path / f"{kind}.npy", kind, array, item_ids, subset_id)


@pytest.fixture
def sampled(tmp_path, synthetic_coco):
    """A database with a failure sample (100: overlap 10, A/B/C 30 each) of hand-built embeddings."""
    con = open_study(tmp_path / "sim.duckdb")
    ingest(con, coco_root=synthetic_coco, num_images=40, captions_per_image=5, seed=42, name="s40")
    sid = int(db.get_subset(con, "s40")["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute(
        "SELECT c.caption_id, c.image_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
        "WHERE c.subset_id = ? ORDER BY i.position, c.position",
        [sid],
    ).df()
    rng = np.random.default_rng(1)
    img = rng.normal(size=(len(imgs), 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.normal(size=(len(caps), 8)).astype(np.float32)  # unrelated to the images: nearly all fail at R@1
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    _register(con, tmp_path, "image", img, imgs["image_id"].to_numpy(), sid)
    _register(con, tmp_path, "text", txt, caps["caption_id"].to_numpy(), sid)
    evaluate(con, "s40", device="cpu")
    sample_failures(con, n=100, seed=42, overlap=10, per_annotator=30, out_dir=tmp_path / "fa", pictures=False)
    yield con, tmp_path
    con.close()


def test_simulated_labels_are_flagged_seeded_and_disagree_on_the_overlap(sampled):
    con, tmp_path = sampled
    res = simulate_labels(con, tmp_path / "fa", tmp_path / "labels", seed=3)
    assert sorted(p.name for p in res.files) == ["assign_A.csv", "assign_B.csv", "assign_C.csv", "assign_overlap.csv"]
    assert res.n_labels == 3 * 30 + 3 * 10
    ann = con.execute("SELECT * FROM annotations").df()
    assert len(ann) == res.n_labels and ann["is_simulated"].all() and (ann["notes"] == NOTE).all()
    assert con.execute("SELECT bool_and(is_simulated), count(*) FROM sample_labels").fetchone() == (True, 100)
    # every annotator labelled the overlap set, and they do not always agree (nor always disagree)
    fleiss = con.execute("SELECT n_items, percent_agreement FROM annotator_agreement WHERE measure = 'fleiss'").df()
    assert fleiss["n_items"].iloc[0] == 10
    assert 0 < fleiss["percent_agreement"].iloc[0] < 100
    first = ann.sort_values(["sample_id", "annotator"])[["sample_id", "annotator", "category"]].reset_index(drop=True)

    # the same seed gives the same labels (a re-import of identical files changes nothing) ...
    again = simulate_labels(con, tmp_path / "fa", tmp_path / "labels2", seed=3)
    assert [p.read_bytes() for p in again.files] == [p.read_bytes() for p in res.files]
    # ... and another seed other labels
    other = simulate_labels(con, tmp_path / "fa", tmp_path / "labels3", seed=4)
    assert [p.read_bytes() for p in other.files] != [p.read_bytes() for p in res.files]
    now = con.execute("SELECT sample_id, annotator, category FROM annotations ORDER BY sample_id, annotator").df()
    assert len(now) == len(first) and not now.equals(first)


@pytest.mark.parametrize("where", ["fa", "labels"])
def test_a_fifo_in_place_of_an_export_or_an_output_is_refused_not_opened(sampled, where):
    """A FIFO where simulate reads an export (fa/) or writes its filled copy (labels/) would block the open;
    it is refused by name and nothing is imported."""
    import os
    import threading

    from toolkit.errors import UserError

    con, tmp_path = sampled
    folder = tmp_path / where
    folder.mkdir(exist_ok=True)
    fifo = folder / "assign_A.csv"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    box = {}

    def target():
        try:
            simulate_labels(con, tmp_path / "fa", tmp_path / "labels", seed=3)
        except UserError as exc:
            box["error"] = str(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # release the blocked open before failing
        raise AssertionError("simulate_labels blocked on a FIFO")
    assert "FIFO" in box.get("error", "") and str(fifo) in box["error"], box
    assert con.execute("SELECT count(*) FROM annotations").fetchone()[0] == 0
