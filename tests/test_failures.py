"""sample-failures: the seeded sample and its sets, size and replace refusals, CSV exports with hostile
captions, pictures (and placeholders for missing images), all through the CLI against a DuckDB file.

The retrieval run is built by hand here (rows inserted into retrieval_runs / retrieval_ranks for an
ingested generated subset) so that these tests do not depend on the evaluate stage.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import folder_bytes, make_retrieval_run, query_df, register_hand_built
from PIL import Image

from toolkit.labels.sample import ASSIGN_COLUMNS, PICTURE_SIZE, SAMPLE_COLUMNS, PictureRenderer, _font, wrap_to_width
from toolkit.store import db
from toolkit.store.study import open_study

HOSTILE = [
    "A dog, a cat, and a bird",
    'A sign that reads "STOP" on a pole',
    "Two lines\nin one caption",
    "Crème brûlée on a plate — naïve café 日本 🐱",
    "=SUM(A1:A9) on a screen",
    "-1 apples, +2 pears; @home",
    'Quotes "inside", commas, and\r\nCRLF too',
    "  leading and trailing spaces  ",
]
N_CAPTIONS = None  # filled by the base fixture
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_db(synthetic_coco_master, tmp_path_factory):
    """A database with a 30-image subset (hostile captions) and one hand-made text-to-image run."""
    from click.testing import CliRunner

    from cli import cli

    path = tmp_path_factory.mktemp("failures_base") / "base.duckdb"
    res = CliRunner().invoke(
        cli, ["--db", str(path), "ingest", "--coco-root", str(synthetic_coco_master), "--num-images", "30"]
    )
    assert res.exit_code == 0, res.output
    con = open_study(path)
    ids = [r[0] for r in con.execute("SELECT caption_id FROM captions ORDER BY caption_id").fetchall()]
    texts = pd.DataFrame({"caption_id": ids, "text": [f"{HOSTILE[i % len(HOSTILE)]} {i}" for i in range(len(ids))]})
    con.register("new_texts", texts)
    con.execute("UPDATE captions SET text = n.text FROM new_texts n WHERE captions.caption_id = n.caption_id")
    con.unregister("new_texts")
    subset_id = con.execute("SELECT subset_id FROM subsets").fetchone()[0]
    make_retrieval_run(con, subset_id, seed=0)
    con.close()
    return path


@pytest.fixture
def dbfile(base_db, tmp_path):
    dest = tmp_path / "db.duckdb"
    shutil.copy(base_db, dest)
    return str(dest)


def table(path, sql, params=None):
    return query_df(path, sql, params)


def snapshot(path):
    return (
        table(path, "SELECT * FROM failure_samples ORDER BY sample_id"),
        table(path, "SELECT run_id, stage, config_hash FROM runs ORDER BY run_id"),
    )


def assert_unchanged(path, before):
    after = snapshot(path)
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b)


SMALL = ["--n", 40, "--overlap", 10, "--per-annotator", 8, "--annotators", "A,B,C"]


def sample(run_cli, dbfile, out, *extra, expect=0):
    return run_cli("--db", dbfile, "sample-failures", "--out", out, *extra, expect=expect)


def test_seeded_sample_sets_and_failures(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    res = sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    assert "Sampled 40 of" in res.output
    fs = table(dbfile, "SELECT * FROM failure_samples ORDER BY draw_order")
    assert len(fs) == 40
    assert list(fs["draw_order"]) == list(range(40))
    assert fs["caption_id"].is_unique and fs["sample_id"].is_unique
    assert fs.groupby("set_name").size().to_dict() == {"overlap": 10, "A": 8, "B": 8, "C": 8, "backup": 6}
    # sets follow draw order: overlap first, then A, B, C, then backup
    assert list(fs["set_name"]) == ["overlap"] * 10 + ["A"] * 8 + ["B"] * 8 + ["C"] * 8 + ["backup"] * 6
    # every sampled caption is an R@1 failure of that run
    ranks = table(dbfile, "SELECT query_id, gt_rank FROM retrieval_ranks").set_index("query_id")["gt_rank"]
    assert (ranks.loc[fs["caption_id"]] > 1).all()
    # the documented method: failures sorted by caption id, default_rng(seed).choice(..., replace=False)
    failures = np.sort(ranks[ranks > 1].index.to_numpy())
    expected = failures[np.random.default_rng(42).choice(len(failures), 40, replace=False)]
    assert list(fs["caption_id"]) == list(expected)
    run = table(dbfile, "SELECT * FROM runs WHERE run_id = ?", [int(fs["run_id"].iloc[0])]).iloc[0]
    assert run["stage"] == "sample-failures" and run["seed"] == 42
    assert set(fs["config_hash"]) == {run["config_hash"]}

    # the same config again is a no-op
    before = snapshot(dbfile)
    res = sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    assert "already has this sample" in res.output
    assert_unchanged(dbfile, before)


def test_same_seed_same_sample_different_seed_different(run_cli, base_db, tmp_path):
    picks = {}
    for name, seed in [("a", 42), ("b", 42), ("c", 7)]:
        path = tmp_path / f"{name}.duckdb"
        shutil.copy(base_db, path)
        sample(run_cli, str(path), tmp_path / name, *SMALL, "--seed", seed, "--no-pictures")
        picks[name] = list(table(str(path), "SELECT caption_id FROM failure_samples ORDER BY draw_order")["caption_id"])
    assert picks["a"] == picks["b"]
    assert picks["a"] != picks["c"]
    assert set(picks["a"]) != set(picks["c"])


def test_bad_sizes_and_inputs_are_refused_and_change_nothing(run_cli, dbfile, tmp_path):
    n_failures = int(table(dbfile, "SELECT count(*) AS n FROM retrieval_ranks WHERE gt_rank > 1")["n"].iloc[0])
    con = open_study(dbfile)
    subset_id = con.execute("SELECT subset_id FROM subsets").fetchone()[0]
    i2t = make_retrieval_run(con, subset_id, seed=1, direction="image-to-text")
    con.close()
    before = snapshot(dbfile)
    cases = [
        (["--n", 40, "--overlap", 20, "--per-annotator", 8], "do not fit"),  # 20 + 3*8 = 44 > 40
        (["--n", n_failures + 1, "--overlap", 0, "--per-annotator", 1], f"{n_failures} R@1 failures"),
        (["--n", 0], "Invalid value for '--n': 0 is not in the range 1<=x<=1000000"),
        (["--n", 10, "--overlap", -1, "--per-annotator", 1], "Invalid value for '--overlap': -1 is not in the range"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--annotators", "A,a"], "must differ"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--annotators", "A,../x"], "file names"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--annotators", "A,backup"], "set name of its own"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--annotators", " , "], "at least one annotator"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--seed", -3], "--seed"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--run", i2t], "image-to-text"),
        (["--n", 10, "--overlap", 1, "--per-annotator", 1, "--run", 999], "No retrieval run with id 999"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        res = sample(run_cli, dbfile, out, *args, expect=2)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
        assert not out.exists()
    assert_unchanged(dbfile, before)


def test_no_text_to_image_run_is_a_clear_error(run_cli, synthetic_coco, tmp_db, tmp_path):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 10)
    res = sample(run_cli, tmp_db, tmp_path / "o", expect=2)
    assert "clipfail evaluate" in res.output


def test_replace_needed_and_refused_once_labelled(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    sample(run_cli, dbfile, out, *SMALL)
    old = table(dbfile, "SELECT * FROM failure_samples ORDER BY sample_id")
    assert (out / f"vis_{old['sample_id'].iloc[0]}.png").exists()

    other = ["--n", 30, "--overlap", 6, "--per-annotator", 8, "--annotators", "A,B,C", "--seed", 1]
    before = snapshot(dbfile)
    res = sample(run_cli, dbfile, tmp_path / "fb", *other, expect=2)
    assert "--replace" in res.output
    assert_unchanged(dbfile, before)

    res = sample(run_cli, dbfile, out, *other, "--replace")
    assert "replacing 40 earlier samples" in res.output
    new = table(dbfile, "SELECT * FROM failure_samples ORDER BY sample_id")
    assert len(new) == 30 and not set(new["sample_id"]) & set(old["sample_id"])
    assert new.groupby("set_name").size().to_dict() == {"overlap": 6, "A": 8, "B": 8, "C": 8}
    assert not any((out / f"vis_{sid}.png").exists() for sid in old["sample_id"])
    assert all((out / f"vis_{sid}.png").exists() for sid in new["sample_id"])
    assert len(pd.read_csv(out / "assign_backup.csv", encoding="utf-8-sig")) == 0

    # a label for the current sample: --replace is refused and nothing changes
    con = open_study(dbfile)
    con.execute(
        "INSERT INTO annotations (sample_id, annotator, raw_label, category, source_file, imported_at, run_id) "
        "VALUES (?, 'A', 'obj', 'Object', 'assign_A.csv', now(), 0)",
        [int(new["sample_id"].iloc[0])],
    )
    con.close()
    before = snapshot(dbfile)
    res = sample(run_cli, dbfile, tmp_path / "fc", *SMALL, "--replace", expect=2)
    assert "--replace refused" in res.output and "1 labels" in res.output
    assert_unchanged(dbfile, before)
    assert not (tmp_path / "fc").exists()


def read_with_csv_module(path):
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_exports_round_trip_hostile_captions(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    fs = table(
        dbfile,
        """
        SELECT f.sample_id, f.set_name, f.caption_id, c.text, gi.file_name AS gt_file, r.gt_rank, r.gt_score,
               r.topk_ids, r.topk_scores
        FROM failure_samples f JOIN captions c USING (caption_id)
        JOIN retrieval_ranks r ON r.retrieval_run_id = f.retrieval_run_id AND r.query_id = f.caption_id
        JOIN images gi ON gi.image_id = r.gt_id
        ORDER BY f.draw_order
        """,
    )
    files = dict(table(dbfile, "SELECT image_id, file_name FROM images").itertuples(index=False))
    assert set(fs["text"].map(lambda t: t.rsplit(" ", 1)[0])) >= set(HOSTILE[:4])  # hostile ones were drawn

    def shown(text):  # the documented spreadsheet escape for formula-like starts
        return "'" + text if text[:1] in "=+-@" else text

    raw = (out / "failure_samples.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM
    assert raw.count(b"\r\n") >= 41  # CRLF records
    expected_sets = {"overlap": 10, "A": 8, "B": 8, "C": 8, "backup": 6}
    for name, columns, subset in [("failure_samples.csv", SAMPLE_COLUMNS, fs)] + [
        (f"assign_{s}.csv", ASSIGN_COLUMNS, fs[fs["set_name"] == s]) for s in expected_sets
    ]:
        via_pandas = pd.read_csv(out / name, encoding="utf-8-sig", dtype=str, keep_default_na=False)
        via_csv = read_with_csv_module(out / name)
        assert list(via_pandas.columns) == columns
        assert len(via_pandas) == len(via_csv) == len(subset)
        assert via_pandas.to_dict("records") == via_csv
        assert list(via_pandas["sample_id"].astype(int)) == list(subset["sample_id"])
        assert list(via_pandas["caption"]) == [shown(t) for t in subset["text"]]
        assert list(via_pandas["gt_image"]) == list(subset["gt_file"])
        assert list(via_pandas["gt_rank"].astype(int)) == list(subset["gt_rank"])
        np.testing.assert_allclose(via_pandas["gt_score"].astype(float), subset["gt_score"], atol=1e-6)
        for k in range(5):
            assert list(via_pandas[f"top{k + 1}_image"]) == [files[int(ids[k])] for ids in subset["topk_ids"]]
            np.testing.assert_allclose(
                via_pandas[f"top{k + 1}_score"].astype(float), [s[k] for s in subset["topk_scores"]], atol=1e-6
            )
        assert (via_pandas["category"] == "").all() and (via_pandas["notes"] == "").all()
        assert (via_pandas["picture"] == "").all()  # --no-pictures
    # a caption with a newline stays one record
    assert any("\n" in c for c in pd.read_csv(out / "failure_samples.csv", encoding="utf-8-sig")["caption"])

    readme = (out / "README.txt").read_text(encoding="utf-8-sig")
    cats = table(dbfile, "SELECT * FROM categories")
    for row in cats.itertuples():
        assert row.name in readme
        assert row.example.split()[0] in readme
    assert "assign_A.csv" in readme and "Primary; Secondary" in readme


def test_pictures_size_noop_reexport_and_placeholders(run_cli, dbfile, synthetic_coco, tmp_path):
    # point the subset at a private copy of the images and remove one ground-truth image
    con = open_study(dbfile)
    con.execute("UPDATE subsets SET image_root = ?", [str(synthetic_coco / "val2017")])
    con.close()
    out = tmp_path / "fa"
    plan = sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    assert "pictures written" not in plan.output
    fs = table(
        dbfile,
        "SELECT f.sample_id, r.gt_id, i.rel_path, i.file_name FROM failure_samples f "
        "JOIN retrieval_ranks r ON r.query_id = f.caption_id JOIN images i ON i.image_id = r.gt_id "
        "ORDER BY f.draw_order",
    )
    assert not list(out.glob("vis_*.png"))
    gone = fs.iloc[0]
    (synthetic_coco / "val2017" / gone["rel_path"]).unlink()
    broken = fs[fs["gt_id"] != gone["gt_id"]].iloc[0]  # a file that is not an image
    (synthetic_coco / "val2017" / broken["rel_path"]).write_bytes(b"\xff\xd8 not really a jpeg")

    # the same config with pictures: the DB is unchanged, the missing pictures are written
    before = snapshot(dbfile)
    res = sample(run_cli, dbfile, out, *SMALL)
    assert_unchanged(dbfile, before)
    assert "40 pictures written" in res.output
    assert "drawn as placeholders" in res.output
    for sid in fs["sample_id"]:
        with Image.open(out / f"vis_{sid}.png") as im:
            assert im.size == PICTURE_SIZE
            assert im.mode == "RGB"
    listed = pd.read_csv(out / "failure_samples.csv", encoding="utf-8-sig", dtype=str)["picture"]
    assert list(listed) == [f"vis_{sid}.png" for sid in fs["sample_id"]]

    # the missing ground truth is a grey placeholder; a present one is the image itself
    def gt_pixel(sid):
        with Image.open(out / f"vis_{sid}.png") as im:
            colw = PICTURE_SIZE[0] // PictureRenderer.COLS
            x0 = (colw - PictureRenderer.BOX[0]) // 2  # left edge of the first column's image area
            # right of the placeholder's text, at the vertical middle of the image area
            return im.getpixel((x0 + PictureRenderer.BOX[0] - 12, PictureRenderer.TOP + PictureRenderer.BOX[1] // 2))

    assert gt_pixel(gone["sample_id"]) == (205, 205, 205)
    assert gt_pixel(broken["sample_id"]) == (205, 205, 205)
    present = fs[~fs["gt_id"].isin([gone["gt_id"], broken["gt_id"]])].iloc[0]
    assert gt_pixel(present["sample_id"]) != (205, 205, 205)

    # deleted files come back on a re-run; nothing else changes
    (out / "assign_B.csv").unlink()
    victim = out / f"vis_{present['sample_id']}.png"
    victim.unlink()
    res = sample(run_cli, dbfile, out, *SMALL)
    assert "1 pictures written" in res.output
    assert victim.exists() and (out / "assign_B.csv").exists()
    assert_unchanged(dbfile, before)


def test_labelled_csvs_are_never_overwritten(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    path = out / "assign_A.csv"
    df = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    df.loc[0, "category"] = "Object"
    # as a spreadsheet might re-save it: ';' separators, no BOM
    text = df.to_csv(index=False, sep=";")
    path.write_bytes(text.encode("utf-8"))
    res = sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    assert "kept as they were" in res.output and "assign_A.csv" in res.output
    assert path.read_bytes() == text.encode("utf-8")

    # a new sample would overwrite labels of the old one: refused before anything is written
    before = snapshot(dbfile)
    res = sample(run_cli, dbfile, out, *SMALL, "--seed", 5, "--replace", "--no-pictures", expect=2)
    assert "filled-in labels" in res.output and "assign_A.csv" in res.output
    assert_unchanged(dbfile, before)
    assert path.read_bytes() == text.encode("utf-8")


@pytest.mark.parametrize("name", ["assign_A.csv", "failure_samples.csv"])
def test_a_fifo_in_place_of_an_export_is_refused_not_opened(run_cli, dbfile, tmp_path, name):
    from helpers import invoke_unblocking

    out = tmp_path / "fa"
    sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    (out / name).unlink()
    os.mkfifo(out / name)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    before = snapshot(dbfile)
    for extra in ([], ["--seed", 5, "--replace"]):  # the same sample again, and a new one
        res = invoke_unblocking(["--db", dbfile, "sample-failures", "--out", out, *SMALL, "--no-pictures", *extra],
                                [out / name])  # fmt: skip
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"{out / name} is a FIFO" in res.output and "move it away" in res.output, res.output
        assert_unchanged(dbfile, before)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
        assert stat.S_ISFIFO(os.stat(out / name).st_mode)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_an_image_that_became_a_fifo_is_drawn_as_a_placeholder(run_cli, dbfile, tmp_path, synthetic_coco_master):
    from helpers import invoke_unblocking

    images = tmp_path / "images"
    shutil.copytree(synthetic_coco_master / "val2017", images)
    fifos = []
    for jpg in sorted(images.glob("*.jpg")):  # every image of the subset: some are in the sample
        jpg.unlink()
        os.mkfifo(jpg)
        fifos.append(jpg)
    con = open_study(dbfile)
    con.execute("UPDATE subsets SET image_root = ?", [str(images)])
    con.close()
    out = tmp_path / "fa"
    args = ["--n", 4, "--overlap", 1, "--per-annotator", 1, "--annotators", "A,B"]
    res = invoke_unblocking(["--db", dbfile, "sample-failures", "--out", out, *args], fifos)
    assert res.exit_code == 0, res.output
    assert "4 pictures written" in res.output and "images could not be read and are drawn as placeholders" in res.output
    assert len(list(out.glob("vis_*.png"))) == 4 and all(stat.S_ISFIFO(os.stat(f).st_mode) for f in fifos)


def test_a_run_killed_while_staging_leaves_nothing_after_the_next_run(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    marker = tmp_path / "staged"
    args = ["--db", dbfile, "sample-failures", "--out", out, "--n", 4, "--overlap", 1, "--per-annotator", 1]
    args = [str(a) for a in [*args, "--annotators", "A,B"]]
    script = textwrap.dedent(
        f"""
        import pathlib, time
        from toolkit.labels import sample as failures
        real = failures.PictureRenderer.render
        def render(self, **kw):  # the CSVs are staged; hang on the first picture until killed
            picture = real(self, **kw)
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(120)
            return picture
        failures.PictureRenderer.render = render
        from cli import cli
        cli({args!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run did not get to its pictures"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    left = [p for p in out.iterdir() if p.name.startswith(".clipfail-staging-")]
    assert left and any(p.is_dir() and any(p.iterdir()) for p in left)  # what kill -9 leaves behind
    run_cli(*args)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(list(out.glob("vis_*.png"))) == 4


def test_stale_staging_folders_are_removed_and_a_live_one_is_kept(run_cli, dbfile, tmp_path):
    from toolkit import staging
    from toolkit.labels.sample import STAGING_PREFIX

    out = tmp_path / "fa"
    sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    legacy = out / ".clipfail-staging-k3x9"  # as a clipfail without locks left it
    legacy.mkdir()
    (legacy / "assign_A.csv").write_text("x", encoding="utf-8")
    dead = staging.make(out, STAGING_PREFIX)  # as a killed run leaves it: the lock file, held by nobody
    (dead.path / "vis_1.png").write_bytes(b"x" * 1000)
    os.close(dead.fd)
    half = out / ".clipfail-new-abc"  # killed between making a folder and locking it, an hour ago
    half.mkdir()
    os.utime(half, (time.time() - 7200, time.time() - 7200))
    young = out / ".clipfail-new-def"  # the same a moment ago: perhaps a live run about to lock it
    young.mkdir()
    live = staging.make(out, STAGING_PREFIX)  # another run that is writing into the folder now
    (live.path / "vis_2.png").write_bytes(b"y")
    try:
        sample(run_cli, dbfile, out, *SMALL, "--no-pictures", "--seed", 5, "--replace")
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted([live.path.name, young.name])
        assert (live.path / "vis_2.png").read_bytes() == b"y"
        assert (live.path / staging.LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        live.remove()
    young.rmdir()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_csv_quoting_is_what_spreadsheets_expect(run_cli, dbfile, tmp_path):
    out = tmp_path / "fa"
    sample(run_cli, dbfile, out, *SMALL, "--no-pictures")
    text = (out / "failure_samples.csv").read_text(encoding="utf-8-sig")
    # a field with a quote is wrapped in quotes with the quote doubled (RFC 4180)
    assert '"A sign that reads ""STOP"" on a pole' in text
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert all(len(r) == len(SAMPLE_COLUMNS) for r in rows)


def test_picture_renderer_is_fast_and_sized(synthetic_coco_master):
    import time

    r = PictureRenderer(Path(synthetic_coco_master) / "val2017")
    files = sorted(p.name for p in (Path(synthetic_coco_master) / "val2017").glob("*.jpg"))[:6]
    infos = [(i, (f, f)) for i, f in enumerate(files)]
    t0 = time.perf_counter()
    for _ in range(10):
        im = r.render(
            caption="A very long caption " * 30,
            header="sample 1",
            gt=(infos[0][0], infos[0][1], 7, 0.25),
            retrieved=[(i, info, 0.3) for i, info in infos[1:5]] + [(999, None, 0.1)],
        )
    assert im.size == PICTURE_SIZE
    assert time.perf_counter() - t0 < 5
    assert "image 999 (not in images table)" in r.missing


@pytest.mark.parametrize(
    "text, max_lines",
    [
        ("A dog and a cat sitting together on a red couch in the living room " * 3, 3),
        ("short", 3),
        ("x" * 300, 2),  # one word wider than the line: hard breaks
        ("a " + "y" * 300 + " b", 5),
        ("Two lines\nin one caption, naïve café", 3),
    ],
)
def test_wrap_to_width(text, max_lines):
    font = _font(20)
    lines = wrap_to_width(text, font, 300, max_lines)
    assert 1 <= len(lines) <= max_lines
    assert all(font.getlength(line) <= 300 for line in lines)
    joined = "".join(lines).replace(" ", "")
    if lines[-1].endswith("…"):
        assert text.replace(" ", "").replace("\n", "").startswith(joined[:-1])
    else:
        assert joined == text.replace(" ", "").replace("\n", "")


def test_end_to_end_from_evaluate(run_cli, synthetic_coco, tmp_db, tmp_path):
    """ingest -> cached embeddings -> the real `clipfail evaluate` -> sample-failures on its run."""

    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 30, "--name", "s30")
    con = open_study(tmp_db)
    sid = int(db.get_subset(con, "s30")["subset_id"])
    img_ids = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute(
        "SELECT c.caption_id, c.image_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
        "WHERE c.subset_id = ? ORDER BY i.position, c.position",
        [sid],
    ).df()
    rng = np.random.default_rng(0)
    img = rng.standard_normal((len(img_ids), 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    row_of = {int(i): r for r, i in enumerate(img_ids["image_id"])}
    txt = img[[row_of[int(i)] for i in caps["image_id"]]] + 0.5 * rng.standard_normal((len(caps), 16)).astype(
        np.float32
    )
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    for kind, array, ids in [("image", img, img_ids["image_id"]), ("text", txt, caps["caption_id"])]:
        register_hand_built(con, tmp_path / f"{kind}.npy", kind, array, ids, sid)
    con.close()

    run_cli("--db", tmp_db, "evaluate", "--subset", "s30", "--device", "cpu")
    summary = table(tmp_db, "SELECT * FROM recall_summary").iloc[0]
    n_fail = int(summary["n_r1_failures"])
    assert n_fail >= 20
    out = tmp_path / "fa"
    res = sample(run_cli, tmp_db, out, "--n", 20, "--overlap", 5, "--per-annotator", 6, "--annotators", "A,B")
    assert f"Sampled 20 of {n_fail} R@1 failures of retrieval run {summary['retrieval_run_id']}" in res.output

    got = pd.read_csv(out / "failure_samples.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    ranks = table(
        tmp_db,
        "SELECT r.query_id, r.gt_rank, gi.file_name AS gt_file, ti.file_name AS top1_file FROM retrieval_ranks r "
        "JOIN images gi ON gi.image_id = r.gt_id JOIN images ti ON ti.image_id = r.top1_id",
    ).set_index("query_id")
    sampled = ranks.loc[got["caption_id"].astype(int)]
    assert (sampled["gt_rank"] > 1).all()
    assert list(got["gt_rank"].astype(int)) == list(sampled["gt_rank"])
    assert list(got["top1_image"]) == list(sampled["top1_file"])
    # where the ground truth is in the top 5, its column names the ground-truth file
    for row in got.itertuples():
        if int(row.gt_rank) <= 5:
            assert getattr(row, f"top{row.gt_rank}_image") == row.gt_image
    assert got.groupby("set_name").size().to_dict() == {"overlap": 5, "A": 6, "B": 6, "backup": 3}
    for sid_ in got["sample_id"]:
        assert (out / f"vis_{sid_}.png").exists()


# ---------------------------------------------------------------------------------------------
# Issue 11, data safety: a re-run never writes over labels, whatever header spelling import-labels reads;
# --replace into a folder that cannot be written changes nothing. On ranked_db (conftest.py: 30 images and
# a hand-made run, plain captions).

SMALL_QUIET = [*SMALL, "--no-pictures"]


def export_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    return rows[0], rows[1:]


def resave(path: Path, edit, *, rename=None, delimiter=",", encoding="utf-8-sig", extra=None) -> bytes:
    """Re-save an export as a spreadsheet would, after edit(header, row) filled something in.
    rename: header spellings; extra: (column name, value for the first row) appended."""
    header, rows = export_rows(path)
    for row in rows:
        edit(header, row)
    header = [(rename or {}).get(h, h) for h in header]
    if extra:
        header.append(extra[0])
        rows = [r + [extra[1] if i == 0 else ""] for i, r in enumerate(rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode(encoding)
    path.write_bytes(data)
    return data


def first_row(column: str, value: str):
    """An edit that fills `column` of the first row only."""
    done = []

    def edit(header, row):
        if not done:
            row[header.index(column)] = value
            done.append(1)

    return edit


def test_rerun_keeps_labels_in_every_header_spelling_that_import_labels_reads(run_cli, ranked_db, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    edited = {
        # Excel capitalised the header
        "assign_A.csv": resave(out / "assign_A.csv", first_row("category", "Object"), rename={"category": "Category"}),
        # 'label' (an accepted spelling), ';' separators, no BOM, and a primary; secondary label
        "assign_B.csv": resave(
            out / "assign_B.csv",
            first_row("category", "Object; Attribute"),
            rename={"category": "label"},
            delimiter=";",
            encoding="utf-8",
        ),
        # only a note, under the accepted spelling 'Comments'
        "assign_C.csv": resave(out / "assign_C.csv", first_row("notes", "two dogs?"), rename={"notes": "Comments"}),
        # a column the export does not write, filled in by the annotator
        "assign_overlap.csv": resave(out / "assign_overlap.csv", lambda h, r: None, extra=("my remarks", "unsure")),
        # "Unicode text" from Excel: UTF-16, tab-separated, header 'LABEL'
        "assign_backup.csv": resave(
            out / "assign_backup.csv",
            first_row("category", "Count"),
            rename={"category": "LABEL"},
            delimiter="\t",
            encoding="utf-16",
        ),
    }
    res = run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    assert "kept as they were" in res.output
    for name, data in edited.items():
        assert name in res.output.split("kept as they were")[1]
        assert (out / name).read_bytes() == data, f"{name} was written over"

    # A new sample would overwrite them: refused before the database or any file changes.
    before = snapshot(ranked_db)
    res = run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET, "--seed", 5, "--replace", expect=2)
    assert "filled-in labels" in res.output and "5 in all" in res.output
    assert_unchanged(ranked_db, before)
    for name, data in edited.items():
        assert (out / name).read_bytes() == data

    # import-labels reads the same files the same way (the detection is its header matching).
    res = run_cli("--db", ranked_db, "import-labels", out / "assign_A.csv", out / "assign_B.csv")
    assert "Imported 2 labels" in res.output


def test_a_file_that_cannot_be_read_is_not_written_over(run_cli, ranked_db, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    # a workbook saved under the CSV's name: cannot be checked for labels, so it is left alone
    workbook = b"PK\x03\x04" + bytes(range(256)) * 4
    (out / "assign_A.csv").write_bytes(workbook)
    # a file whose header lost its sample_id column
    (out / "assign_B.csv").write_text("Category,notes\r\nObject,\r\n", encoding="utf-8")
    for name in ("assign_A.csv", "assign_B.csv"):
        data = (out / name).read_bytes()
        before = snapshot(ranked_db)
        res = run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET, expect=2)
        assert name in res.output and "cannot be read to check that it holds no labels" in res.output
        assert_unchanged(ranked_db, before)
        assert (out / name).read_bytes() == data
        (out / name).unlink()  # moved away, as the message says: the next file is checked next
    res = run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    assert (out / "assign_A.csv").read_bytes().startswith(b"\xef\xbb\xbfsample_id,")
    # an empty file holds nothing and is simply written again
    (out / "assign_C.csv").write_bytes(b"")
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    assert (out / "assign_C.csv").stat().st_size > 100


def test_rerunning_run_keeps_labels_saved_under_another_header_spelling(run_cli, tmp_db, tmp_path, synthetic_coco):
    from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_random_checkpoint(ckpt, spec=TINY_CONFIG, seed=1)
    out = tmp_path / "fa"
    cmd = ["--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 20, "--model", TINY_CONFIG]
    cmd += ["--checkpoint", ckpt, "--device", "cpu", "--n", 20, "--overlap", 4, "--per-annotator", 6]
    cmd += ["--annotators", "A,B", "--out", out, "--no-pictures"]
    run_cli(*cmd)
    data = resave(out / "assign_A.csv", first_row("category", "Object"), rename={"category": "label"})
    res = run_cli(*cmd)
    assert (out / "assign_A.csv").read_bytes() == data
    assert [line.split()[1] for line in res.output.splitlines()[1:5]] == ["already"] * 4


def test_replace_into_an_unwritable_out_changes_nothing(run_cli, ranked_db, tmp_path):
    out = tmp_path / "fa"
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    files = folder_bytes(out)
    before = snapshot(ranked_db)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):  # a file, and a folder under a file (root can write anywhere else)
        res = run_cli(
            "--db", ranked_db, "sample-failures", "--out", bad, *SMALL_QUIET, "--seed", 5, "--replace", expect=2
        )
        assert str(bad) in res.output and "Traceback" not in res.output
        assert_unchanged(ranked_db, before)
    assert folder_bytes(out) == files
    assert blocker.read_text() == "x"


def test_replace_that_fails_while_writing_rolls_back(run_cli, ranked_db, tmp_path, monkeypatch):
    out = tmp_path / "fa"
    run_cli("--db", ranked_db, "sample-failures", "--out", out, *SMALL_QUIET)
    files = folder_bytes(out)
    before = snapshot(ranked_db)

    from toolkit.labels import sample as failures

    calls = []
    real_render = failures.PictureRenderer.render

    def render(self, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_render(self, **kw)

    monkeypatch.setattr(failures.PictureRenderer, "render", render)
    args = ["--n", 12, "--overlap", 3, "--per-annotator", 3, "--annotators", "A,B,C"]
    res = run_cli("--db", ranked_db, "sample-failures", "--out", out, *args, "--seed", 5, "--replace", expect=2)
    assert "No space left on device" in res.output and "earlier sample" in res.output
    assert_unchanged(ranked_db, before)  # the new sample was not committed
    assert folder_bytes(out) == files  # no new CSV, no picture, no staging folder left behind
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    monkeypatch.setattr(failures.PictureRenderer, "render", real_render)
    res = run_cli("--db", ranked_db, "sample-failures", "--out", out, *args, "--seed", 5, "--replace")
    ids = table(ranked_db, "SELECT sample_id FROM failure_samples ORDER BY 1")["sample_id"].tolist()
    assert sorted(p.name for p in out.glob("vis_*.png")) == sorted(f"vis_{i}.png" for i in ids)
    header, rows = export_rows(out / "failure_samples.csv")
    assert sorted(int(r[0]) for r in rows) == ids
