"""Ingest stage and database foundation, through the real CLI against temporary DuckDB files."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest
from helpers import assert_one_message, query_rows, refused, snapshot, study_reader

from schema import SCHEMA_VERSION, metadata

DATA_TABLES = ["runs", "images", "captions", "subsets", "subset_images", "subset_captions", "bad_images"]


def counts(db_path):
    with study_reader(db_path) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in DATA_TABLES}


def query(db_path, sql):
    con = duckdb.connect(db_path, read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def subset_image_ids(db_path, name):
    return [
        r[0]
        for r in query(
            db_path,
            "SELECT image_id FROM subset_images JOIN subsets USING (subset_id) "
            f"WHERE name = '{name}' ORDER BY position",
        )
    ]


def test_ingest_writes_tables_and_second_run_is_noop(run_cli, synthetic_coco, tmp_db):
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 30)
    assert "images:   30" in res.output and "captions: 150" in res.output
    before = counts(tmp_db)
    assert before["subset_images"] == 30 and before["subset_captions"] == 150 and before["runs"] == 1
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 30)
    assert "nothing changed" in res.output
    assert counts(tmp_db) == before


def test_sample_is_deterministic_and_follows_documented_method(run_cli, synthetic_coco, tmp_path):
    a, b, c = (str(tmp_path / f"{x}.duckdb") for x in "abc")
    run_cli("--db", a, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--seed", 7, "--name", "s")
    run_cli("--db", b, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--seed", 7, "--name", "s")
    run_cli("--db", c, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--seed", 8, "--name", "s")
    ids_a, ids_b, ids_c = (subset_image_ids(p, "s") for p in (a, b, c))
    assert ids_a == ids_b
    assert ids_a != ids_c
    # The documented method: sorted ids, numpy default_rng(seed).choice without replacement.
    data = json.loads((synthetic_coco / "annotations" / "captions_val2017.json").read_text())
    all_ids = sorted(im["id"] for im in data["images"])
    expected = sorted(np.array(all_ids)[np.random.default_rng(7).choice(len(all_ids), 10, replace=False)].tolist())
    assert ids_a == expected


def test_caption_order_is_ascending_annotation_id(run_cli, synthetic_coco, tmp_db):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all", "--name", "every")
    data = json.loads((synthetic_coco / "annotations" / "captions_val2017.json").read_text())
    by_image: dict[int, list[int]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["id"])
    rows = query(tmp_db, "SELECT image_id, caption_id, position FROM subset_captions ORDER BY image_id, position")
    got: dict[int, list[int]] = {}
    for image_id, caption_id, position in rows:
        assert position == len(got.setdefault(image_id, []))
        got[image_id].append(caption_id)
    assert len(got) == len(data["images"])
    for image_id, ids in got.items():
        assert ids == sorted(by_image[image_id])[:5]


def test_fewer_captions_than_asked_keeps_what_it_has(run_cli, synthetic_coco, tmp_db):
    res = run_cli(
        "--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all", "--captions-per-image", 7
    )
    data = json.loads((synthetic_coco / "annotations" / "captions_val2017.json").read_text())
    per_image: dict[int, int] = {}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    short = sum(1 for n in per_image.values() if n < 7)
    assert short > 0
    assert f"{short} images have fewer captions than asked" in res.output
    assert counts(tmp_db)["subset_captions"] == sum(per_image.values())


def test_separate_captions_json_and_images_dir(run_cli, synthetic_coco, tmp_db):
    run_cli(
        "--db",
        tmp_db,
        "ingest",
        "--captions-json",
        synthetic_coco / "annotations" / "captions_val2017.json",
        "--images-dir",
        synthetic_coco / "val2017",
        "--num-images",
        5,
    )
    assert counts(tmp_db)["subset_images"] == 5


def test_db_option_after_command_and_env_var(run_cli, synthetic_coco, tmp_path, monkeypatch):
    p1 = str(tmp_path / "after.duckdb")
    run_cli("ingest", "--coco-root", synthetic_coco, "--num-images", 3, "--db", p1)
    assert counts(p1)["subset_images"] == 3
    p2 = str(tmp_path / "env.duckdb")
    monkeypatch.setenv("CLIPFAIL_DB", p2)
    run_cli("init")
    assert query(p2, "SELECT value FROM schema_info")[0][0] == str(SCHEMA_VERSION)


def test_different_config_under_same_name_needs_replace(run_cli, synthetic_coco, tmp_db):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--name", "s")
    before = counts(tmp_db)
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 12, "--name", "s", expect=2)
    assert "--replace" in res.output
    assert counts(tmp_db) == before
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 12, "--name", "s", "--replace")
    assert len(subset_image_ids(tmp_db, "s")) == 12
    assert query(tmp_db, "SELECT count(*) FROM subsets")[0][0] == 1


# ---- bad input: one clear message, exit 2, nothing written ------------------------------------


@pytest.fixture
def seeded_db(run_cli, synthetic_coco, tmp_db):
    """A database that already holds one ingest, to check that failures leave it unchanged."""
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 5, "--name", "first")
    return tmp_db


def _ann(root):
    return root / "annotations" / "captions_val2017.json"


def _assert_refused(run_cli, db_path, args, *needles):
    before = counts(db_path)
    res = run_cli("--db", db_path, "ingest", *args, expect=2)
    assert_one_message(res, *needles)
    assert counts(db_path) == before
    return res


def test_missing_json(run_cli, seeded_db, synthetic_coco):
    _ann(synthetic_coco).unlink()
    _assert_refused(run_cli, seeded_db, ["--coco-root", synthetic_coco, "--name", "x"], "not found", "--captions-json")


def test_malformed_json(run_cli, seeded_db, synthetic_coco):
    _ann(synthetic_coco).write_text('{"images": [1, 2', encoding="utf-8")
    _assert_refused(run_cli, seeded_db, ["--coco-root", synthetic_coco, "--name", "x"], "not valid JSON", "line 1")


def test_json_not_in_coco_captions_format(run_cli, seeded_db, synthetic_coco):
    instances = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "bbox": [0]}]}
    _ann(synthetic_coco).write_text(json.dumps(instances), encoding="utf-8")
    _assert_refused(run_cli, seeded_db, ["--coco-root", synthetic_coco, "--name", "x"], "instances", "positions")
    _ann(synthetic_coco).write_text(json.dumps([1, 2, 3]), encoding="utf-8")
    _assert_refused(run_cli, seeded_db, ["--coco-root", synthetic_coco, "--name", "x"], "not in COCO captions format")


@pytest.mark.parametrize("which", ["captions", "karpathy", "instances", "default instances"])
def test_a_fifo_in_place_of_a_json_file_is_refused_not_opened(seeded_db, synthetic_coco, which):
    from helpers import invoke_unblocking

    fifo = {
        "captions": _ann(synthetic_coco),
        "karpathy": synthetic_coco / "dataset_coco.json",
        "instances": synthetic_coco / "my_instances.json",
        "default instances": synthetic_coco / "annotations" / "instances_val2017.json",
    }[which]
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    args = ["--coco-root", synthetic_coco, "--num-images", 5, "--name", "x"]
    if which == "karpathy":
        args = ["--karpathy-json", fifo, "--images-dir", synthetic_coco, "--num-images", 5]
    elif which == "instances":
        args += ["--instances-json", fifo]
    before = counts(seeded_db)
    res = invoke_unblocking(["--db", seeded_db, "ingest", *args], [fifo])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{fifo} is a FIFO" in res.output, res.output
    assert counts(seeded_db) == before and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_captions_pointing_at_unknown_images(run_cli, seeded_db, synthetic_coco):
    data = json.loads(_ann(synthetic_coco).read_text())
    for i, ann in enumerate(data["annotations"][:7]):
        ann["image_id"] = 999_999_000 + i
    _ann(synthetic_coco).write_text(json.dumps(data), encoding="utf-8")
    res = _assert_refused(run_cli, seeded_db, ["--coco-root", synthetic_coco, "--name", "x"], "7 in all", "999999000")
    assert "and 2 more" in res.output


def test_missing_and_unreadable_sampled_images(run_cli, seeded_db, synthetic_coco):
    files = sorted((synthetic_coco / "val2017").glob("*.jpg"))
    files[0].unlink()
    files[1].write_bytes(b"this is not a jpeg")
    res = _assert_refused(
        run_cli, seeded_db, ["--coco-root", synthetic_coco, "--num-images", "all", "--name", "x"], "2 in all"
    )
    assert files[0].name in res.output and files[1].name in res.output and "--skip-bad-images" in res.output


def test_skip_bad_images_excludes_and_records(run_cli, seeded_db, synthetic_coco):
    files = sorted((synthetic_coco / "val2017").glob("*.jpg"))
    files[0].unlink()
    files[1].write_bytes(b"\xff\xd8 truncated")
    res = run_cli(
        "--db", seeded_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all", "--name", "x",
        "--skip-bad-images",
    )  # fmt: skip
    assert "2 bad images were excluded" in res.output
    bad = query(seeded_db, "SELECT file_name, reason FROM bad_images ORDER BY file_name")
    assert [b[0] for b in bad] == [files[0].name, files[1].name]
    assert bad[0][1] == "missing file" and "header does not open" in bad[1][1]
    ids = subset_image_ids(seeded_db, "x")
    assert len(ids) == 38 and int(files[0].stem) not in ids and int(files[1].stem) not in ids


def test_too_many_images_requested(run_cli, seeded_db, synthetic_coco):
    _assert_refused(run_cli, seeded_db, ["--coco-root", synthetic_coco, "--num-images", 41, "--name", "x"], "more than")


def test_newer_schema_version_is_refused(run_cli, seeded_db):
    con = duckdb.connect(seeded_db)
    con.execute("UPDATE schema_info SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    res = run_cli("--db", seeded_db, "init", expect=2)
    assert "newer clipfail" in res.output and "Traceback" not in res.output


def test_locked_database_gives_clear_message(run_cli, seeded_db):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import duckdb, sys, time
                con = duckdb.connect({seeded_db!r})
                print("locked", flush=True)
                sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_cli("--db", seeded_db, "init", expect=2)
        assert "locked by another process" in res.output and "Traceback" not in res.output
    finally:
        holder.communicate("\n", timeout=30)


def test_not_a_database_file(run_cli, tmp_path):
    bogus = tmp_path / "notes.duckdb"
    bogus.write_text("hello, this is text\n" * 100)
    res = run_cli("--db", bogus, "init", expect=2)
    assert "Traceback" not in res.output and str(bogus) in res.output


def test_upgrade_adds_missing_table_and_column(run_cli, seeded_db):
    con = duckdb.connect(seeded_db)
    con.execute("DROP TABLE bad_images")
    con.execute("ALTER TABLE subsets DROP COLUMN split")
    con.close()
    run_cli("--db", seeded_db, "init")
    cols = {
        r[0] for r in query(seeded_db, "SELECT column_name FROM information_schema.columns WHERE table_name='subsets'")
    }
    assert "split" in cols
    assert query(seeded_db, "SELECT count(*) FROM bad_images")[0][0] == 0
    assert counts(seeded_db)["subset_images"] == 5


def test_fresh_schema_matches_declaration_and_keys_are_unique(run_cli, synthetic_coco, tmp_db):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 20)
    con = duckdb.connect(tmp_db, read_only=True)
    try:
        for table in metadata.sorted_tables:
            cols = [
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                    [table.name],
                ).fetchall()
            ]
            assert cols == [c.name for c in table.columns], table.name
            keys = [c.name for c in table.primary_key.columns]
            if not keys:
                continue
            key_sql = ", ".join(keys)
            nulls = " OR ".join(f"{k} IS NULL" for k in keys)
            assert con.execute(f"SELECT count(*) FROM {table.name} WHERE {nulls}").fetchone()[0] == 0
            dupes = con.execute(
                f"SELECT count(*) FROM (SELECT {key_sql} FROM {table.name} GROUP BY {key_sql} HAVING count(*) > 1)"
            ).fetchone()[0]
            assert dupes == 0, table.name
    finally:
        con.close()


def test_karpathy_reader(run_cli, synthetic_coco, tmp_db):
    coco = json.loads(_ann(synthetic_coco).read_text())
    caps: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann)
    images = []
    for i, im in enumerate(sorted(coco["images"], key=lambda x: x["id"])):
        sents = [
            {"raw": a["caption"], "sentid": 500_000 + a["id"], "tokens": a["caption"].lower().split(), "imgid": i}
            for a in caps[im["id"]]
        ]
        images.append(
            {
                "filepath": "val2017",
                "filename": im["file_name"],
                "cocoid": im["id"],
                "imgid": i,
                "split": "test" if i < 12 else "train",
                "sentences": sents,
                "sentids": [s["sentid"] for s in sents],
            }
        )
    path = synthetic_coco / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    res = run_cli(
        "--db", tmp_db, "ingest", "--karpathy-json", path, "--images-dir", synthetic_coco, "--num-images", "all"
    )
    assert "karpathy-test" in res.output
    rows = query(tmp_db, "SELECT split, num_images FROM subsets")
    assert rows == [("test", 12)]
    rel = query(tmp_db, "SELECT rel_path, width FROM images ORDER BY image_id LIMIT 1")[0]
    assert rel[0].startswith("val2017/") and rel[1] is not None
    first = min(im["cocoid"] for im in images[:12])
    got = query(tmp_db, f"SELECT caption_id FROM subset_captions WHERE image_id = {first} ORDER BY position")
    assert [g[0] for g in got] == sorted(500_000 + a["id"] for a in caps[first])[:5]
    res = run_cli("--db", tmp_db, "ingest", "--karpathy-json", path, "--images-dir", synthetic_coco, "--split", "val",
                  expect=2)  # fmt: skip
    assert "no images in split 'val'" in res.output


def test_sql_command_is_read_only_and_writes_csv(run_cli, seeded_db, tmp_path):
    out = tmp_path / "q.csv"
    res = run_cli("--db", seeded_db, "sql", "SELECT count(*) AS n FROM subset_images", "--csv", out)
    assert "5" in res.output
    assert out.read_text().splitlines() == ["n", "5"]
    res = run_cli("--db", seeded_db, "sql", "DELETE FROM subset_images", expect=2)
    assert "read-only" in res.output.lower() or "read only" in res.output.lower()
    assert counts(seeded_db)["subset_images"] == 5


def test_make_synthetic_coco_looks_like_coco(run_cli, tmp_path):
    run_cli("make-synthetic-coco", tmp_path / "c", "--images", 6)
    data = json.loads((tmp_path / "c" / "annotations" / "captions_val2017.json").read_text())
    assert set(data) == {"info", "licenses", "images", "annotations"}
    assert len(data["images"]) == 6
    assert {"id", "file_name", "width", "height"} <= set(data["images"][0])
    per = {}
    for a in data["annotations"]:
        per[a["image_id"]] = per.get(a["image_id"], 0) + 1
    assert all(5 <= n <= 7 for n in per.values())
    for im in data["images"]:
        assert (tmp_path / "c" / "val2017" / im["file_name"]).exists()


# ---------------------------------------------------------------- issue 11 (findings 14, 16): malformed JSON values
# Every refusal: exit status 2, one clean message that names the record, no traceback, and the database's tables
# exactly as they were (helpers.refused). study_db: conftest.py's 5-image study.

REPO = Path(__file__).resolve().parents[1]


def _mutate(root: Path, fn) -> None:
    data = json.loads(_ann(root).read_text())
    fn(data)
    _ann(root).write_text(json.dumps(data), encoding="utf-8")


def _set(section: str, index: int, key: str, value):
    def fn(data):
        data[section][index][key] = value

    return fn


MALFORMED = {
    "image id string": (_set("images", 2, "id", "abc"), ["images[2]", "id 'abc'", "whole number"]),
    "image id null": (_set("images", 2, "id", None), ["images[2]", "id None"]),
    "image id 2**70": (_set("images", 2, "id", 2**70), ["images[2]", str(2**70), "2^63-1"]),
    "image id list": (_set("images", 2, "id", [1]), ["images[2]", "id [1]"]),
    "image id fractional": (_set("images", 2, "id", 1000.5), ["images[2]", "1000.5", "whole number"]),
    "caption id fractional": (_set("annotations", 4, "id", 1.5), ["annotations[4]", "id 1.5", "whole number"]),
    "caption image_id fractional": (_set("annotations", 4, "image_id", 1000.5), ["annotations[4]", "image_id 1000.5"]),
    "caption id true": (_set("annotations", 4, "id", True), ["annotations[4]", "id True"]),
    "width string": (_set("images", 3, "width", "wide"), ["images[3]", "width 'wide'"]),
    "width 1e12": (_set("images", 3, "width", 1e12), ["images[3]", "width 1000000000000.0", "2^31-1"]),
    "height negative": (_set("images", 3, "height", -5), ["images[3]", "height -5"]),
    "lone surrogate": (_set("annotations", 6, "caption", "a dog \ud800 on grass"), ["annotations[6]", "surrogate"]),
    "lone surrogate in file_name": (_set("images", 1, "file_name", "x\udc80.jpg"), ["images[1]", "surrogate"]),
    "file_name with '..'": (_set("images", 1, "file_name", "../outside.jpg"), ["images[1]", "'..' component"]),
    "file_name with '..' inside": (_set("images", 1, "file_name", "sub/../../x.jpg"), ["images[1]", "'..' component"]),
    "file_name with Windows '..'": (_set("images", 1, "file_name", "sub\\..\\..\\x.jpg"), ["images[1]", "'..'"]),
    "file_name absolute": (_set("images", 1, "file_name", "/etc/hostname"), ["images[1]", "an absolute path"]),
    "file_name with a drive": (_set("images", 1, "file_name", "C:\\x.jpg"), ["images[1]", "an absolute path"]),
    "file_name with NUL": (_set("images", 1, "file_name", "x\u0000.jpg"), ["images[1]", "a NUL character"]),
    "empty caption": (_set("annotations", 7, "caption", ""), ["annotations[7]", "empty", "refused"]),
    "whitespace caption": (_set("annotations", 7, "caption", " \t\n "), ["annotations[7]", "empty"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_json_values_are_refused_naming_the_record(run_cli, study_db, synthetic_coco, case):
    mutate, needles = MALFORMED[case]
    _mutate(synthetic_coco, mutate)
    refused(
        run_cli,
        study_db,
        "ingest",
        "--coco-root",
        synthetic_coco,
        "--num-images",
        "all",
        "--name",
        "x",
        needles=needles,
    )


def test_a_file_name_in_a_subfolder_of_the_image_folder_is_ingested(run_cli, tmp_db, synthetic_coco):
    """The file_name check refuses names that leave the image folder, not names with folders in them."""
    data = json.loads(_ann(synthetic_coco).read_text())
    moved = {}
    for i, prefix in ((0, "sub/"), (1, "./sub/")):
        name = data["images"][i]["file_name"]
        (synthetic_coco / "val2017" / "sub").mkdir(exist_ok=True)
        (synthetic_coco / "val2017" / name).rename(synthetic_coco / "val2017" / "sub" / name)
        data["images"][i]["file_name"] = moved[data["images"][i]["id"]] = prefix + name
    _ann(synthetic_coco).write_text(json.dumps(data), encoding="utf-8")
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all", "--name", "x")
    got = dict(query_rows(tmp_db, "SELECT image_id, rel_path FROM images WHERE image_id IN (?, ?)", list(moved)))
    assert got == moved


def test_every_bad_record_is_listed_in_one_message(run_cli, study_db, synthetic_coco):
    def fn(data):
        data["images"][0]["id"] = "abc"
        data["annotations"][1]["caption"] = "   "
        data["annotations"][2]["id"] = 2.5

    _mutate(synthetic_coco, fn)
    res = refused(run_cli, study_db, "ingest", "--coco-root", synthetic_coco, "--name", "x")
    for needle in ("images[0]", "annotations[1]", "annotations[2]"):
        assert needle in res.output


def test_deeply_nested_json_is_refused(run_cli, study_db, synthetic_coco):
    depth = 100_000
    _ann(synthetic_coco).write_text('{"images": ' + "[" * depth + "]" * depth + "}", encoding="utf-8")
    refused(run_cli, study_db, "ingest", "--coco-root", synthetic_coco, "--name", "x", needles=["nested too deeply"])


def test_integer_with_too_many_digits_is_refused(run_cli, study_db, synthetic_coco):
    _ann(synthetic_coco).write_text('{"images": [{"id": ' + "9" * 5000 + "}]}", encoding="utf-8")
    refused(run_cli, study_db, "ingest", "--coco-root", synthetic_coco, "--name", "x", needles=["cannot be read"])


def _karpathy(path: Path, images: list[dict]) -> None:
    path.write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")


@pytest.mark.parametrize(
    "image, needles",
    [
        ({"cocoid": 7.5}, ["images[1]", "cocoid 7.5"]),
        ({"cocoid": "7"}, ["images[1]", "cocoid '7'"]),
        ({"sentences": [{"sentid": 2**64, "raw": "a cat"}]}, ["images[1]", "sentences[0]", "sentid"]),
        ({"sentences": [{"sentid": 11, "raw": "  "}]}, ["images[1]", "sentences[0]", "empty"]),
        ({"sentences": [{"sentid": 11, "raw": 5}]}, ["images[1]", "raw 5"]),
    ],
)
def test_karpathy_records_are_validated(run_cli, study_db, synthetic_coco, tmp_path, image, needles):
    files = sorted(p.name for p in (synthetic_coco / "val2017").glob("*.jpg"))
    good = [
        {
            "filepath": "val2017",
            "filename": files[i],
            "cocoid": 1000 + i,
            "split": "test",
            "sentences": [{"sentid": 10 + i, "raw": "a red circle"}],
        }
        for i in range(2)
    ]
    good[1].update(image)
    karpathy = tmp_path / "dataset_coco.json"
    _karpathy(karpathy, good)
    refused(
        run_cli, study_db, "ingest", "--karpathy-json", karpathy, "--images-dir", synthetic_coco, "--num-images", "all",
        needles=needles,
    )  # fmt: skip


# ---------------------------------------------------------------- 14. ingest: hostile image files


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header; no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# 10^10 pixels: Pillow raises DecompressionBombError; 10^8: only a DecompressionBombWarning
BOMBS = {"error": (100_000, 100_000), "warning": (10_000, 10_000)}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_decompression_bomb_is_refused_naming_the_file(run_cli, study_db, synthetic_coco, kind):
    victim = sorted((synthetic_coco / "val2017").glob("*.jpg"))[3]
    victim.write_bytes(_png_header(*BOMBS[kind]))
    args = ["ingest", "--coco-root", synthetic_coco, "--num-images", "all", "--name", "x"]
    refused(run_cli, study_db, *args, needles=[victim.name, "decompression bomb", "--skip-bad-images"])


@pytest.mark.parametrize("kind", list(BOMBS))
def test_decompression_bomb_is_skipped_with_skip_bad_images(run_cli, tmp_db, synthetic_coco, kind):
    victim = sorted((synthetic_coco / "val2017").glob("*.jpg"))[3]
    victim.write_bytes(_png_header(*BOMBS[kind]))
    res = run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all", "--skip-bad-images")
    assert "1 bad images were excluded" in res.output
    con = duckdb.connect(tmp_db, read_only=True)
    try:
        bad = con.execute("SELECT file_name, reason FROM bad_images").fetchall()
        in_subset = con.execute(
            "SELECT count(*) FROM subset_images JOIN images USING (image_id) WHERE file_name = ?", [victim.name]
        ).fetchone()[0]
        n_images = con.execute("SELECT count(*) FROM subset_images").fetchone()[0]
    finally:
        con.close()
    assert len(bad) == 1 and bad[0][0] == victim.name and "decompression bomb" in bad[0][1]
    assert in_subset == 0 and n_images == 39


def _cli_subprocess(*args, timeout=90):
    """The real CLI in a child process, so that a hang (the bug) fails the test instead of blocking it."""
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_place_of_an_image_is_refused_not_opened(study_db, synthetic_coco):
    victim = sorted((synthetic_coco / "val2017").glob("*.jpg"))[2]
    victim.unlink()
    os.mkfifo(victim)
    before = snapshot(study_db)
    res = _cli_subprocess("--db", study_db, "ingest", "--coco-root", synthetic_coco, "--num-images", "all")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and victim.name in res.stderr and "not a regular file" in res.stderr
    assert snapshot(study_db) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_with_skip_bad_images(tmp_db, synthetic_coco):
    victim = sorted((synthetic_coco / "val2017").glob("*.jpg"))[2]
    victim.unlink()
    os.mkfifo(victim)
    res = _cli_subprocess(
        "--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 10, "--skip-bad-images"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    con = duckdb.connect(tmp_db, read_only=True)
    try:
        assert con.execute("SELECT file_name, reason FROM bad_images").fetchall() == [
            (victim.name, "not a regular file")
        ]
    finally:
        con.close()
