"""Helpers shared by test files (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import itertools
import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pytest

from toolkit.store import artifacts, db


def register_hand_built(
    con, path: str | Path, kind: str, array: np.ndarray, item_ids, subset_id: int, *,
    model: str = "hand-built", pretrained: str | None = None, config: dict | None = None,
) -> int:  # fmt: skip
    """Save `array` to `path` and register it as an embedding set of `kind`, in its own embed run."""
    cfg = config or {"kind": kind, "model": model, "path": str(path)}
    sha = artifacts.save_array(path, array)
    with db.transaction(con):
        run_id = db.insert_run(con, "embed", cfg, db.now(), model=model)
        return artifacts.register_embedding_set(
            con, kind=kind, subset_id=subset_id, model=model, pretrained=pretrained, checkpoint_sha256=None,
            precision="fp32", config=cfg, path=path, array=array,
            item_ids=np.asarray(item_ids, dtype=np.int64), sha256=sha, run_id=run_id,
        )  # fmt: skip


def make_retrieval_run(con, subset_id: int, seed: int = 0, direction: str = "text-to-image", topk: int = 10) -> int:
    """A self-consistent retrieval run: each caption gets a seeded gt rank, top-k lists agree with it."""
    rng = np.random.default_rng(seed)
    caps = con.execute(
        "SELECT caption_id, image_id FROM subset_captions WHERE subset_id = ? ORDER BY caption_id", [subset_id]
    ).df()
    image_ids = [
        r[0]
        for r in con.execute(
            "SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [subset_id]
        ).fetchall()
    ]
    m = len(image_ids)
    rows = []
    for cap, gt in zip(caps["caption_id"], caps["image_id"]):
        rank = int(rng.integers(1, m + 1)) if rng.random() < 0.8 else 1
        others = [i for i in rng.permutation(image_ids).tolist() if i != gt]
        order = others[: rank - 1] + [gt] + others[rank - 1 :]
        scores = [round(0.6 - 0.01 * k, 4) for k in range(m)]
        rows.append(
            {
                "query_id": int(cap),
                "gt_id": int(gt),
                "gt_rank": rank,
                "n_tied": 0,
                "gt_score": scores[rank - 1],
                "top1_id": int(order[0]),
                "top1_score": scores[0],
                "topk_ids": [int(x) for x in order[:topk]],
                "topk_scores": scores[:topk],
            }
        )
    with db.transaction(con):
        rrid = con.execute(
            """
            INSERT INTO retrieval_runs (subset_id, model, text_embedding_set_id, image_embedding_set_id, direction,
                                        tie_policy, topk, config_hash, created_at, run_id)
            VALUES (?, 'hand-made', 0, 0, ?, 'optimistic', ?, ?, now(), 0)
            RETURNING retrieval_run_id
            """,
            [subset_id, direction, topk, f"test-{seed}-{direction}"],
        ).fetchone()[0]
        df = pd.DataFrame(rows)
        df.insert(0, "retrieval_run_id", rrid)
        db.insert_df(con, "retrieval_ranks", df)
    return int(rrid)


def fake_text_encoder(texts) -> np.ndarray:
    """A seeded 16-d unit embedding per distinct text: stands in for the model where prompts are encoded."""
    import hashlib

    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16)).normal(size=16) for t in texts]
    out = np.asarray(rows, dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def register_seeded_embeddings(con, folder: Path, subset_name: str, *, noise: float = 1.2, seed: int = 0) -> None:
    """Random unit image embeddings, and each caption its image's plus `noise` x Gaussian (re-normalised):
    a retrieval run with failures and successes, without a model. Files go to folder/{image,text}.npy."""
    sid = int(db.get_subset(con, subset_name)["subset_id"])
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute(
        "SELECT c.caption_id, c.image_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
        "WHERE c.subset_id = ? ORDER BY i.position, c.position",
        [sid],
    ).df()
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(len(imgs), 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    pos = {int(i): k for k, i in enumerate(imgs["image_id"])}
    txt = img[[pos[int(i)] for i in caps["image_id"]]] + noise * rng.normal(size=(len(caps), 16)).astype(np.float32)
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    register_hand_built(con, Path(folder) / "image.npy", "image", img, imgs["image_id"].to_numpy(), sid)
    register_hand_built(con, Path(folder) / "text.npy", "text", txt, caps["caption_id"].to_numpy(), sid)


def build_labelled_study(con, root: Path) -> None:
    """On an open study: 60 generated images (subset s60), seeded embeddings, evaluate, a 200-failure sample
    (30 overlap, 50 per annotator, pictures off) in root/fa and simulated labels from root/labels."""
    from toolkit.ingest.stage import ingest
    from toolkit.ingest.synthetic import make_synthetic_coco
    from toolkit.labels.sample import sample_failures
    from toolkit.labels.simulate import simulate_labels
    from toolkit.retrieval.evaluate import evaluate

    make_synthetic_coco(root / "coco", 60, seed=1)
    ingest(con, coco_root=root / "coco", num_images=60, captions_per_image=5, seed=42, name="s60")
    register_seeded_embeddings(con, root, "s60")
    evaluate(con, "s60", device="cpu")
    sample_failures(con, n=200, seed=42, overlap=30, per_annotator=50, out_dir=root / "fa", pictures=False)
    simulate_labels(con, root / "fa", root / "labels", seed=0)


def assert_one_message(res, *needles, code: int = 2) -> None:
    """A refused command, run with click's CliRunner: exit status `code` (a SystemExit with that code, never
    an exception that escaped: CliRunner keeps those out of the output, so "no Traceback" alone proves
    little), no traceback printed, exactly one line that starts with "Error:", and every needle in the output."""
    assert res.exit_code == code, f"exit status {res.exit_code}, expected {code}:\n{res.output}"
    assert "Traceback" not in res.output, res.output
    if res.exception is not None:
        assert isinstance(res.exception, SystemExit), repr(res.exception)
        assert res.exception.code == code, repr(res.exception)
    assert [line.startswith("Error:") for line in res.output.splitlines()].count(True) == 1, res.output
    for needle in needles:
        assert needle in res.output, (needle, res.output)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def label_all(path: Path, label: str) -> None:
    """Fill the category column of every row of an exported assign_*.csv with `label`, saved as a spreadsheet would."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    header, rows = rows[0], rows[1:]
    for row in rows:
        row[header.index("category")] = label
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8-sig")


_READER: dict[int, object] = {}  # process id -> the in-memory DuckDB that study_reader attaches files to
_ALIASES = itertools.count()


@contextlib.contextmanager
def study_reader(db_path):
    """A read-only connection to a study's database file, for a test's checks: the file is attached READ_ONLY to an
    in-memory DuckDB that the test process keeps (one thread: no worker threads that a forked test would inherit
    mid-task), made the connection's default catalog, and detached on the way out, which releases the file. It
    reads what a fresh connection reads (the views bind in the file's own catalog), in about a third of the CPU
    time: each new DuckDB instance costs about 40 ms to start, and the suite's checks open thousands."""
    import duckdb

    reader = _READER.get(os.getpid())
    if reader is None:
        reader = _READER[os.getpid()] = duckdb.connect(":memory:", config={"threads": 1})
    cur = reader.cursor()
    alias = f"study_under_test_{next(_ALIASES)}"
    try:
        cur.execute(f"ATTACH '{str(db_path).replace(chr(39), chr(39) * 2)}' AS {alias} (READ_ONLY)")
    except duckdb.ResourceInUseException:  # the test holds the file open: a connection to that same instance
        cur.close()
        with contextlib.closing(_join_open_instance(db_path)) as con:
            yield con
        return
    try:
        cur.execute(f"USE {alias}")
        yield cur
    finally:
        cur.execute("USE memory")
        cur.execute(f"DETACH {alias}")
        cur.close()


def _join_open_instance(db_path):
    """A connection to the DuckDB instance that this process already has `db_path` open in (duckdb.connect with the
    same settings returns one; whether the test opened it for writing or only for reading)."""
    import duckdb

    try:
        return duckdb.connect(str(db_path), config={"storage_compatibility_version": db.STORAGE_COMPATIBILITY})
    except duckdb.ConnectionException:
        return duckdb.connect(
            str(db_path), read_only=True, config={"storage_compatibility_version": db.STORAGE_COMPATIBILITY}
        )


def query_rows(db_path, sql: str, params=()) -> list[tuple]:
    """The rows of one query on a study file (`study_reader`)."""
    with study_reader(db_path) as con:
        return con.execute(sql, list(params or [])).fetchall()


def query_df(db_path, sql: str, params=()) -> pd.DataFrame:
    """One query on a study file as a DataFrame (`study_reader`)."""
    with study_reader(db_path) as con:
        return con.execute(sql, list(params or [])).df()


def snapshot(db_path) -> dict[str, list]:
    """Every base table's rows, sorted: what a refused command must leave exactly as it was."""
    with study_reader(db_path) as con:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1"
            ).fetchall()
        ]
        assert tables, f"no table read from {db_path}"  # a snapshot of nothing would make every comparison pass
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables}


def refused(run_cli, db_path, *args, needles=()):
    """Run a command that must be refused; check status 2, no traceback, the needles, and unchanged tables."""
    before = snapshot(db_path)
    res = run_cli("--db", db_path, *args, expect=2)
    assert_one_message(res, *needles)
    assert snapshot(db_path) == before
    return res


def in_ci() -> bool:
    """True where the environment variable CI says so (`true`, `1`, `yes`, any case), as CI services set it
    and `.ci/run` exports it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_tool(name: str, reason: str) -> NoReturn:
    """The one rule for a tool a test needs but cannot use here (Chromium, Playwright, Ray, cog; later a live
    Label Studio server or a second DuckDB): in CI the test FAILS, naming the tool and why; on a developer's
    machine (CI unset) it skips, saying the same. Call it where the tool turned out missing or broken."""
    message = f"{name}: {reason}"
    if in_ci():
        pytest.fail(f"{message} (required in CI: CI={os.environ.get('CI')!r})", pytrace=False)
    pytest.skip(message)


def import_tool(module: str, hint: str):
    """`pytest.importorskip` under require_tool's rule: the imported module, or a skip (a failure in CI)
    that says what is missing and `hint` (how to install it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        problem = str(exc)
    require_tool(module, f"cannot be imported ({problem}); {hint}")  # outside `except`: no chained traceback


def invoke_unblocking(args, fifos=(), timeout: float = 20.0):
    """Run the real CLI (click's CliRunner) in a thread and return click's Result.

    A command that opens one of `fifos` for reading blocks until a writer comes, which would hang the
    suite. After `timeout` seconds the FIFOs are opened for writing and closed again (so the blocked
    open returns and the command reads nothing), and the test fails saying that the command blocked."""
    import os
    import threading

    from click.testing import CliRunner

    from cli import cli

    box = {}

    def target():
        box["result"] = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(timeout)
        raise AssertionError(f"clipfail {' '.join(map(str, args))} blocked opening a FIFO for {timeout:.0f} s")
    return box["result"]


# ------------------------------------------------------------------ the COCO 5k test by COCO ids (issue 27)

ECCV_HINT = "pip install 'clipfail[positives]' (CI installs it with the dev extra)"
EXTRA_IMAGE, EXTRA_CAPTIONS = 1, (1, 2)  # an image and its captions that are not in the 5k test (ids below the split's)
SIXTH_CAPTION = 37  # a caption of a split image that is not one of its 5 of the split, with a lower id than those


def eccv_data(name: str, key: str) -> dict[int, list[int]]:
    """One of the installed eccv_caption package's JSON files (e.g. "original", "image_to_caption"), ids as ints."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("eccv_caption")
    if spec is None:
        require_tool("eccv_caption", f"is not installed; {ECCV_HINT}")
    raw = json.loads((Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}_{key}.json").read_text())
    return {int(k): [int(x) for x in v] for k, v in raw.items()}


def eccv_slice() -> list[int]:
    """A few real 5k-test images: the positive images of the ECCV caption query that has fewest (lowest id first);
    that caption's own image is one of them."""
    c2i = eccv_data("eccv", "caption_to_image")
    query = min(c2i, key=lambda c: (len(c2i[c]), c))
    return sorted(c2i[query])


def write_coco5k_coco(root: Path, year: str = "2014", with_images=(), val2017=frozenset()) -> Path:
    """COCO's layout under `root` with captions JSON that hold the whole 5k test by the package's real ids (the
    texts are made up): 2014: annotations/captions_val2014.json and val2014/; 2017: captions_train2017.json and
    captions_val2017.json, the images of `val2017` in the val file, the rest in train. Tiny JPEGs are drawn only
    for `with_images`. The first file also holds an image that is not in the split (EXTRA_IMAGE), and the first
    image of `with_images` has a sixth caption, SIXTH_CAPTION, lower in id than its 5 of the split."""
    import json

    from PIL import Image

    split = eccv_data("original", "image_to_caption")
    files = {"val2014": sorted(split)} if year == "2014" else {
        "train2017": sorted(set(split) - set(val2017)), "val2017": sorted(val2017),
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    sixth_on = sorted(with_images)[0] if with_images else None
    for i, (folder, ids) in enumerate(files.items()):
        (root / folder).mkdir(exist_ok=True)
        name = (lambda x: f"COCO_val2014_{x:012d}.jpg") if year == "2014" else (lambda x: f"{x:012d}.jpg")
        images = [{"id": x, "file_name": name(x), "width": 16, "height": 12} for x in ids]
        anns = [{"id": c, "image_id": x, "caption": f"caption {c} of image {x}."} for x in ids for c in split[x]]
        if sixth_on in ids:
            anns.append({"id": SIXTH_CAPTION, "image_id": sixth_on, "caption": "a sixth caption, not in the split."})
        if i == 0:
            images.append({"id": EXTRA_IMAGE, "file_name": name(EXTRA_IMAGE), "width": 16, "height": 12})
            anns += [{"id": c, "image_id": EXTRA_IMAGE, "caption": f"not in the split {c}."} for c in EXTRA_CAPTIONS]
        (root / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": anns})
        )
        for x in set(with_images) & set(ids):
            Image.new("RGB", (16, 12), (x % 256, 90, 30)).save(root / folder / name(x), "JPEG")
    return root


def run_script_forked(script: str, argv: list[str], timeout: float = 300.0) -> tuple[int, str]:
    """Run a Python `script` as `python -c script *argv` would, but in a forked copy of this process: the modules
    this process has imported (torch and open_clip cost a fresh interpreter about 8 CPU-seconds) are there already,
    and whatever the script changes stays in the copy. The copy also starts with this process's state, the test's
    monkeypatches included: a script that relies on a value sets it itself. Torch runs single-threaded in the copy
    (OpenMP is not fork-safe), and it must not use a DuckDB database this process has open.

    Returns the exit status as subprocess gives it (-N: killed by signal N) and the tail of its stdout and stderr."""
    import sys
    import tempfile
    import time
    import traceback

    code = compile(script, "<forked script>", "exec")
    with tempfile.TemporaryFile() as out:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the copy: never returns into pytest
            status = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.stdout = sys.stderr = open(out.fileno(), "w", buffering=1, closefd=False)  # noqa: SIM115
                import torch

                torch.set_num_threads(1)
                sys.argv = ["-c", *map(str, argv)]
                exec(code, {"__name__": "__main__"})
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(status)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked script ran past {timeout} s")
            time.sleep(0.05)
        out.seek(0)
        tail = out.read()[-4000:].decode("utf-8", "replace")
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), tail
