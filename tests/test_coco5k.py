"""`clipfail ingest --coco5k-test` (issue 27, part 2): the COCO 5k test by COCO ids, so that ECCV Caption and CxC
join it; and the 5k-test overlap that `positives import` reports for any subset, the seeded val2017 one included.

The captions JSON are generated but hold the whole split by the eccv_caption package's real ids; images are drawn
for a few of them only, and --skip-bad-images leaves the rest out, as it would for images missing on disk."""

from __future__ import annotations

import hashlib
import json
import sys

import duckdb
import pytest
from helpers import (
    EXTRA_CAPTIONS,
    EXTRA_IMAGE,
    SIXTH_CAPTION,
    eccv_data,
    eccv_slice,
    refused,
    write_coco5k_coco,
)
from PIL import Image

SPLIT_TOTALS = ("of the 5,000 images", "of the 25,000 captions of the COCO 5k test")
WHICH = ("captions_val2014.json", "both captions_train2017.json and captions_val2017.json")


def _rows(db_path, sql: str, *params) -> list[tuple]:
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def _expected_captions(images) -> set[tuple[int, int]]:
    split = eccv_data("original", "image_to_caption")
    return {(c, i) for i in images for c in split[i]}


def _eccv_coverage(images: list[int]) -> tuple[int, int]:
    """ECCV caption queries and image queries inside a study of these images and their split captions."""
    caps = {c for c, _ in _expected_captions(images)}
    c2i, i2c = eccv_data("eccv", "caption_to_image"), eccv_data("eccv", "image_to_caption")
    n_c = sum(1 for c, ps in c2i.items() if c in caps and set(ps) & set(images))
    n_i = sum(1 for i, cs in i2c.items() if i in images and set(cs) & caps)
    return n_c, n_i


def test_2014_val_ingest_takes_the_split_and_the_positives_join(tmp_path, run_cli):
    images = eccv_slice()
    root = write_coco5k_coco(tmp_path / "coco2014", "2014", with_images=images)
    db = tmp_path / "study.duckdb"
    res = run_cli("--db", db, "ingest", "--coco5k-test", "--coco-root", root, "--skip-bad-images")
    assert "Ingested subset 'coco5k-test'" in res.output and f"{5000 - len(images)} bad images" in res.output
    assert "positives import --source eccv" in res.output
    assert _rows(db, "SELECT name, seed, num_images, captions_per_image, split FROM subsets") == [
        ("coco5k-test", None, len(images), 5, "coco5k-test")
    ]
    caps = _rows(db, "SELECT caption_id, image_id, position FROM subset_captions ORDER BY image_id, position")
    # the split's own 5 captions of each image: not the sixth one, though its id is the lowest of that image
    assert {(c, i) for c, i, _ in caps} == _expected_captions(images)
    assert SIXTH_CAPTION not in {c for c, _, _ in caps} and min(images) in {i for _, i, _ in caps}
    for i in images:  # positions 0-4 in ascending annotation id
        mine = [(p, c) for c, j, p in caps if j == i]
        assert [p for p, _ in mine] == list(range(5)) and [c for _, c in mine] == sorted(c for _, c in mine)
    assert _rows(db, "SELECT count(*) FROM captions WHERE caption_id IN (?, ?, ?)", SIXTH_CAPTION, *EXTRA_CAPTIONS) == [
        (0,)
    ]
    assert _rows(db, "SELECT count(*) FROM bad_images") == [(5000 - len(images),)]
    assert _rows(db, "SELECT rel_path FROM images ORDER BY image_id") == [
        (f"COCO_val2014_{i:012d}.jpg",) for i in images
    ]

    again = run_cli("--db", db, "ingest", "--coco5k-test", "--coco-root", root, "--skip-bad-images")
    assert "already ingested with this configuration; nothing changed" in again.output

    res = run_cli("--db", db, "positives", "import", "--source", "eccv")
    n = len(images)
    assert f"COCO 5k test: {5 * n} of the subset's {5 * n} captions and {n} of its {n} images are in it" in res.output
    n_c, n_i = _eccv_coverage(images)
    assert n_c >= 1 and f"Coverage: {n_c} of {5 * n} captions and {n_i} of {n} images" in res.output
    assert _rows(db, "SELECT n_captions_in_5k_test, n_images_in_5k_test FROM positive_sets") == [(5 * n, n)]
    assert _rows(db, "SELECT direction, n_queries, n_covered, n_in_5k_test FROM positive_coverage") == [
        ("text-to-image", 5 * n, n_c, 5 * n),
        ("image-to-text", n, n_i, n),
    ]
    # a --file source is not the package's split: its 5k-test counts are NULL, and no line claims them
    mine = tmp_path / "mine.json"
    cap = min(c for c, _ in _expected_captions(images))
    mine.write_text(json.dumps({"caption_to_image": {str(cap): images}}))
    res = run_cli("--db", db, "positives", "import", "--file", mine)
    assert "COCO 5k test:" not in res.output
    assert _rows(db, "SELECT n_in_5k_test FROM positive_coverage WHERE source = 'file:mine.json'") == [(None,), (None,)]


def test_2017_train_and_val_together_give_the_same_split(tmp_path, run_cli):
    images = eccv_slice()
    val = set(images[:1])  # the split's images are divided between the two 2017 files
    root = write_coco5k_coco(tmp_path / "coco2017", "2017", with_images=images, val2017=val)
    ann = root / "annotations"
    db = tmp_path / "study.duckdb"
    run_cli(
        "--db", db, "ingest", "--coco5k-test", "--skip-bad-images",
        "--captions-json", ann / "captions_val2017.json", "--images-dir", root / "val2017",
        "--captions-json", ann / "captions_train2017.json", "--images-dir", root / "train2017",
    )  # fmt: skip
    assert {(c, i) for c, i in _rows(db, "SELECT caption_id, image_id FROM subset_captions")} == _expected_captions(
        images
    )
    # the subset's source hash is of both files' bytes, in path order (train before val), each read once
    both = (ann / "captions_train2017.json").read_bytes() + (ann / "captions_val2017.json").read_bytes()
    assert _rows(db, "SELECT source_sha256 FROM subsets") == [(hashlib.sha256(both).hexdigest(),)]
    # one image root, the folder that holds both (stored relative to the database's folder); paths run through them
    assert _rows(db, "SELECT image_root, source_file FROM subsets") == [
        ("coco2017", "coco2017/annotations/captions_train2017.json")
    ]
    assert _rows(db, "SELECT image_id, rel_path FROM images ORDER BY image_id") == [
        (i, f"{'val' if i in val else 'train'}2017/{i:012d}.jpg") for i in images
    ]
    config = json.loads(_rows(db, "SELECT config_json FROM runs WHERE stage = 'ingest'")[0][0])
    assert config["captions_files"] == ["captions_train2017.json", "captions_val2017.json"]
    assert config["test_split_package"] == "eccv_caption 0.1.0" and config["seed"] is None
    # the same files through --coco-root, given in the other order: the same configuration
    res = run_cli("--db", db, "ingest", "--coco5k-test", "--coco-root", root, "--skip-bad-images")
    assert "nothing changed" in res.output


def test_a_file_that_lacks_part_of_the_split_is_one_message_and_nothing_is_written(tmp_path, run_cli):
    images = eccv_slice()
    val = set(sorted(eccv_data("original", "image_to_caption"))[:700]) | set(images[:1])
    root = write_coco5k_coco(tmp_path / "coco2017", "2017", with_images=images, val2017=val)
    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "init")
    ann = root / "annotations"
    args = ("ingest", "--coco5k-test", "--captions-json", ann / "captions_val2017.json", "--images-dir")
    res = refused(run_cli, db, *args, root / "val2017", needles=(*SPLIT_TOTALS, *WHICH))
    assert f"{5000 - len(val):,} of the 5,000 images and {25000 - 5 * len(val):,} of the 25,000" in res.output
    assert "are not in captions_val2017.json" in res.output

    # the 2014 file with one caption left out, and one caption moved to another image of the split
    root14 = write_coco5k_coco(tmp_path / "coco2014", "2014", with_images=images)
    path = root14 / "annotations" / "captions_val2014.json"
    data = json.loads(path.read_text())
    gone = data["annotations"].pop(10)
    moved = data["annotations"][20]
    was, moved["image_id"] = moved["image_id"], images[0] if moved["image_id"] != images[0] else images[1]
    path.write_text(json.dumps(data))
    res = refused(run_cli, db, "ingest", "--coco5k-test", "--coco-root", root14, "--skip-bad-images", needles=WHICH)
    assert "0 of the 5,000 images and 1 of the 25,000 captions" in res.output and str(gone["id"]) not in res.output
    assert f"caption {moved['id']} is on image {moved['image_id']} there, on {was} in the split" in res.output

    # every image of the split must be on disk, or --skip-bad-images says which are left out
    root14 = write_coco5k_coco(tmp_path / "complete", "2014", with_images=images)
    needles = ("missing or unreadable", f"{5000 - len(images)} in all", "--skip-bad-images")
    refused(run_cli, db, "ingest", "--coco5k-test", "--coco-root", root14, needles=needles)


def test_two_files_that_overlap_are_refused(tmp_path, run_cli):
    images = eccv_slice()
    root = write_coco5k_coco(tmp_path / "coco2017", "2017", with_images=images, val2017=set(images))
    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "init")
    ann = root / "annotations"
    train, val = ann / "captions_train2017.json", ann / "captions_val2017.json"
    twice = ("--captions-json", train, "--images-dir", root / "train2017") * 2
    refused(run_cli, db, "ingest", "--coco5k-test", *twice, needles=("is given twice",))
    # a train file that also holds one of the val file's images (and its captions)
    data, extra = json.loads(train.read_text()), json.loads(val.read_text())
    data["images"].append(extra["images"][0])
    shared = [a for a in extra["annotations"] if a["image_id"] == extra["images"][0]["id"]]
    data["annotations"] += shared
    train.write_text(json.dumps(data))
    args = ("--captions-json", train, "--images-dir", root / "train2017", "--captions-json", val, "--images-dir")
    res = refused(run_cli, db, "ingest", "--coco5k-test", *args, root / "val2017", needles=("share the ids",))
    assert f"of 1 image and {len(shared)} captions, {1 + len(shared)} in all: image {shared[0]['image_id']}" in (
        res.output
    )


def test_without_the_package_one_message_names_what_to_install(tmp_path, run_cli, monkeypatch):
    root = write_coco5k_coco(tmp_path / "coco2014", "2014", with_images=eccv_slice())
    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "init")
    monkeypatch.setitem(sys.modules, "eccv_caption", None)  # as if it were not installed
    refused(run_cli, db, "ingest", "--coco5k-test", "--coco-root", root, "--skip-bad-images",
            needles=("--coco5k-test reads the eccv_caption package", "pip install 'clipfail[positives]'"))  # fmt: skip


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--coco5k-test", "--num-images", "100"), "leave out --num-images"),
        (("--coco5k-test", "--captions-per-image", "3"), "leave out --captions-per-image"),
        (("--coco5k-test", "--karpathy-json", "x.json"), "does not use --karpathy-json"),
        (("--coco5k-test", "--captions-json", "a.json"), "1 --captions-json and 0 --images-dir"),
        (("--coco5k-test", "--coco-root", "ROOT", "--images-dir", "elsewhere"), "finds the images in COCO's layout"),
        (("--captions-json", "a.json", "--captions-json", "b.json"), "more than one only with --coco5k-test"),
    ],
)
def test_options_that_do_not_apply_are_refused(tmp_path, run_cli, args, needle):
    root = write_coco5k_coco(tmp_path / "coco2014", "2014")
    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "init")
    args = tuple(str(root) if a == "ROOT" else a for a in args)
    refused(run_cli, db, "ingest", *args, needles=(needle,))


def test_a_seeded_val2017_subset_is_told_how_far_the_5k_test_reaches(tmp_path, run_cli):
    """A subset drawn from a val2017-like file: a few images of the split (one with a sixth caption of lower id,
    which the seeded ingest keeps as one of its first 5) beside images that are not in it."""
    images = eccv_slice()
    root = write_coco5k_coco(tmp_path / "src", "2014", with_images=images)
    data = json.loads((root / "annotations" / "captions_val2014.json").read_text())
    keep = set(images) | {EXTRA_IMAGE}
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    data = {
        "images": [dict(im, file_name=f"{im['id']:012d}.jpg") for im in data["images"] if im["id"] in keep],
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
    }
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    for im in data["images"]:
        Image.new("RGB", (16, 12), (im["id"] % 256, 20, 200)).save(coco / "val2017" / im["file_name"], "JPEG")
    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "ingest", "--coco-root", coco, "--num-images", "all")
    in_subset = {c for (c,) in _rows(db, "SELECT caption_id FROM subset_captions")}
    split_caps = {c for c, _ in _expected_captions(images)}
    n_caps_in = len(in_subset & split_caps)
    assert n_caps_in == 5 * len(images) - 1  # the sixth caption displaced one of the split's
    n_caps, n_imgs = len(in_subset), len(keep)
    res = run_cli("--db", db, "positives", "import", "--source", "eccv")
    assert (
        f"COCO 5k test: {n_caps_in} of the subset's {n_caps} captions and {len(images)} of its {n_imgs} images"
        in res.output
    )
    assert _rows(db, "SELECT n_captions_in_5k_test, n_images_in_5k_test FROM positive_sets") == [
        (n_caps_in, len(images))
    ]


def test_run_takes_the_flag_to_ingest(tmp_path, run_cli):
    """`clipfail run --coco5k-test` ingests the split (here its images are all missing: the ingest says so)."""
    root = write_coco5k_coco(tmp_path / "coco2014", "2014")
    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "init")
    args = ("run", "--coco5k-test", "--coco-root", root, "--out", tmp_path / "fa")
    res = refused(run_cli, db, *args, needles=("missing or unreadable", "5000 in all", "--skip-bad-images"))
    assert "COCO_val2014_" in res.output


def test_the_package_files_are_parsed_once_per_process_and_again_when_their_bytes_change(tmp_path, monkeypatch):
    """positives import and ingest --coco5k-test read the package's split files each time (their sha256 is
    recorded), but parse them once per process under the sha256 of the bytes read: the same bytes give the very
    same read-only split, changed bytes are parsed and checked again."""
    import shutil

    from toolkit.errors import UserError
    from toolkit.retrieval import eccv_package as E

    folder, version = E.package_dir()
    copy = tmp_path / "data"
    copy.mkdir()
    for name in ("original_image_to_caption.json", "original_caption_to_image.json"):
        shutil.copy(folder / name, copy / name)
    monkeypatch.setattr(E, "package_dir", lambda need="": (copy, version))
    parsed, real = [], E.id_lists
    monkeypatch.setattr(E, "id_lists", lambda obj, where: parsed.append(where) or real(obj, where))

    first = E.coco5k_test_split()
    assert parsed == ["original_image_to_caption.json", "original_caption_to_image.json"]
    assert E.coco5k_test_split() is first and len(parsed) == 2  # the same bytes: not parsed again
    assert len(first.image_to_captions) == 5000 and len(first.caption_ids) == 25000
    with pytest.raises(TypeError):
        first.image_to_captions[0] = (1,)  # read-only: one caller cannot change what the next one reads
    assert isinstance(next(iter(first.image_to_captions.values())), tuple)

    c2i = copy / "original_caption_to_image.json"
    kept = c2i.read_bytes()
    data = json.loads(kept)
    caption, images = next(iter(data.items()))
    other = next(i for i in first.image_to_captions if i != images[0])
    data[caption] = [other]  # the two files now disagree on one pair
    c2i.write_text(json.dumps(data))
    with pytest.raises(UserError, match="do not list the same caption-image pairs"):
        E.coco5k_test_split()
    assert parsed[2:] == ["original_caption_to_image.json"]  # changed bytes: parsed and checked again
    c2i.write_bytes(kept)
    assert E.coco5k_test_split() is first and len(parsed) == 3
