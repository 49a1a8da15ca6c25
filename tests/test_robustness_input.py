"""Issue 11, input validation (findings 14, 16 and part of 25), through the real CLI.

Every refusal: exit status 2, one clean message that names the record, row or option, no
traceback, and the database's tables exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import duckdb
import pytest
from helpers import assert_one_message

from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint

REPO = Path(__file__).resolve().parents[1]


def snapshot(db_path) -> dict[str, list]:
    """Every base table's rows, sorted: what a refused command must leave exactly as it was."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1"
            ).fetchall()
        ]
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables}
    finally:
        con.close()


def file_digest(path) -> str | None:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def base_db(tmp_path_factory):
    """A database with one ingested subset (5 images of the generated dataset), made once."""
    from click.testing import CliRunner

    from cli import cli
    from toolkit.ingest.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("robust_base")
    make_synthetic_coco(root / "coco", 12, seed=3)
    db_path = root / "base.duckdb"
    res = CliRunner().invoke(
        cli, ["--db", str(db_path), "ingest", "--coco-root", str(root / "coco"), "--num-images", "5"]
    )
    assert res.exit_code == 0, res.output
    return db_path


@pytest.fixture
def study_db(base_db, tmp_path):
    dest = tmp_path / "study.duckdb"
    shutil.copy(base_db, dest)
    return dest


def refused(run_cli, db_path, *args, needles=()):
    """Run a command that must be refused; check status 2, no traceback, the needles, and unchanged tables."""
    before = snapshot(db_path)
    res = run_cli("--db", db_path, *args, expect=2)
    assert_one_message(res, *needles)
    assert snapshot(db_path) == before
    return res


# ---------------------------------------------------------------- 14. ingest: malformed JSON values


def _ann(root: Path) -> Path:
    return root / "annotations" / "captions_val2017.json"


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


# ---------------------------------------------------------------- 16. out-of-range integers


INT_CASES = [
    # (command and options, the option the message must name)
    (["ingest", "--coco-root", "{coco}", "--num-images", "5", "--name", "y", "--seed", "-1"], "--seed"),
    (["ingest", "--coco-root", "{coco}", "--num-images", "5", "--name", "y", "--seed", str(10**23 - 1)], "--seed"),
    (["ingest", "--coco-root", "{coco}", "--num-images", "5", "--name", "y", "--seed", str(2**32)], "--seed"),
    (["ingest", "--coco-root", "{coco}", "--name", "y", "--captions-per-image", str(2**31)], "--captions-per-image"),
    (["sample-failures", "--seed", str(10**23 - 1)], "--seed"),
    (["sample-failures", "--n", str(2**31)], "--n"),
    (["sample-failures", "--overlap", str(2**40)], "--overlap"),  # below 0: sample-failures' own message
    (["sample-failures", "--per-annotator", str(2**40)], "--per-annotator"),
    (["sample-failures", "--run", str(2**63)], "--run"),
    (["improve", "--categories", "Object", "--seed", "-1"], "--seed"),
    (["improve", "--categories", "Object", "--seed", str(10**23 - 1)], "--seed"),
    (["improve", "--categories", "Object", "--max-subset", str(2**31)], "--max-subset"),
    (["improve", "--categories", "Object", "--batch-size", str(10**9)], "--batch-size"),
    (["improve", "--categories", "Object", "--run", str(2**63)], "--run"),
    (["categories", "add", "Text", "--definition", "Quoted text.", "--position", str(2**31)], "--position"),
    (["categories", "add", "Text", "--definition", "Quoted text.", "--position", "-1"], "--position"),
    (["evaluate", "--topk", str(2**31)], "--topk"),
    (["evaluate", "--chunk", str(2**31)], "--chunk"),
    (["embed", "--model", "tiny-clip", "--batch-size", str(10**9)], "--batch-size"),
    (["embed", "--model", "tiny-clip", "--num-workers", "100000"], "--num-workers"),
    (["analyze", "--run", str(2**63)], "--run"),
    (["report", "--run", str(2**63)], "--run"),
    (["run", "--coco-root", "{coco}", "--seed", "-1"], "--seed"),
    (["run", "--coco-root", "{coco}", "--failure-seed", str(2**64)], "--failure-seed"),
    (["run", "--coco-root", "{coco}", "--n", str(2**31)], "--n"),
    (["run", "--coco-root", "{coco}", "--overlap", "-3"], "--overlap"),
    (["run", "--coco-root", "{coco}", "--per-annotator", str(2**31)], "--per-annotator"),
    (["run", "--coco-root", "{coco}", "--captions-per-image", "0"], "--captions-per-image"),
    (["run", "--coco-root", "{coco}", "--batch-size", str(10**9)], "--batch-size"),
]


@pytest.mark.parametrize("args, option", INT_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in INT_CASES])
def test_out_of_range_integer_options_are_refused_at_the_cli_edge(run_cli, study_db, synthetic_coco, args, option):
    args = [a.replace("{coco}", str(synthetic_coco)) for a in args]
    res = refused(run_cli, study_db, *args, needles=[f"Invalid value for '{option}'", "is not in the range"])
    assert "Traceback" not in res.output


def test_out_of_range_seed_of_a_command_without_db(run_cli, tmp_path):
    res = run_cli("make-synthetic-coco", tmp_path / "c", "--images", 2, "--seed", -1, expect=2)
    assert "--seed" in res.output and not (tmp_path / "c").exists()
    res = run_cli("demo", "--out", tmp_path / "d", "--seed", 2**32, expect=2)
    assert "--seed" in res.output and not (tmp_path / "d").exists()


def test_accepted_seed_bounds_still_work(run_cli, study_db, synthetic_coco):
    """The range is not too tight: 0 and 2^32-1 (numpy's uint32 seeds) both ingest."""
    for seed in (0, 2**32 - 1):
        run_cli("--db", study_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 5, "--seed", seed)
    con = duckdb.connect(str(study_db), read_only=True)
    try:
        seeds = sorted(r[0] for r in con.execute("SELECT seed FROM subsets").fetchall())
    finally:
        con.close()
    assert seeds == [0, 42, 2**32 - 1]


@pytest.mark.parametrize("position", [2**31, 2**32, 2**32 + 1, -1])
def test_template_positions_beyond_int32_are_refused_naming_the_row(run_cli, study_db, tmp_path, position):
    csv = tmp_path / "t.csv"
    rows = [("mine", "Object", 0, "{caption}"), ("mine", "Object", position, "a photo of {objects}")]
    csv.write_text(
        "template_set,category,position,template\n" + "".join(f"{s},{c},{p},{t}\n" for s, c, p, t in rows),
        encoding="utf-8",
    )
    refused(run_cli, study_db, "templates", "import", csv, needles=["row 3", f"position '{position}'", "2147483647"])


# ---------------------------------------------------------------- 25. run's suggested next steps


def test_run_suggests_a_control_that_fits_and_commands_that_work(run_cli, tmp_path, synthetic_coco):
    """12 images give a handful of R@1 successes: the suggested control must not ask for 200, and the
    suggested commands must carry --db in a form a shell splits correctly (a path with a space)."""
    ckpt = tmp_path / "tiny.safetensors"
    save_random_checkpoint(ckpt, spec=TINY_CONFIG, seed=1)
    db_path = tmp_path / "my study" / "s 1.duckdb"
    db_path.parent.mkdir()
    out_dir = tmp_path / "fail out"
    res = run_cli(
        "--db", db_path, "run", "--coco-root", synthetic_coco, "--num-images", 12, "--model", TINY_CONFIG,
        "--checkpoint", ckpt, "--device", "cpu", "--n", 10, "--overlap", 2, "--per-annotator", 4,
        "--annotators", "A,B", "--out", out_dir, "--no-pictures",
    )  # fmt: skip
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        n_successes = con.execute("SELECT count(*) FROM retrieval_ranks WHERE gt_rank = 1").fetchone()[0]
    finally:
        con.close()
    assert n_successes < 200  # 60 queries (2 R@1 successes with this seed and CPU)
    steps = [line.split(". ", 1)[1] for line in res.output.split("Next steps:")[1].strip().splitlines()]
    commands = [shlex.split(s) for s in steps if s.startswith("clipfail ")]
    assert len(commands) == 6
    for argv in commands:
        assert argv[1:3] == ["--db", str(db_path)], argv
    improve = next(a for a in commands if a[3] == "improve")
    if n_successes:
        assert improve[improve.index("--control") + 1] == f"successes:{n_successes}"
    else:  # no success to draw a control from: no control is suggested
        assert "--control" not in improve
    # the suggested import commands, split as a shell would, run against the same database
    for name in "AB":  # each annotator's own copy of the overlap file (still blank)
        shutil.copy(out_dir / "assign_overlap.csv", out_dir / f"assign_overlap_{name}.csv")
    for argv in (a for a in commands if a[3] == "import-labels"):
        done = run_cli(*argv[1:])
        assert "Nothing to import" in done.output


def test_one_template_problem_is_one_problem(run_cli, tmp_db, tmp_path):
    bad = tmp_path / "one_bad.csv"
    bad.write_text("template_set,category,position,template\nmine,Object,0,{caption}\nmine,Object,1,{nope}\n")
    res = run_cli("--db", tmp_db, "templates", "import", bad, expect=2)
    assert "(1 problem)" in res.output and "problems)" not in res.output
