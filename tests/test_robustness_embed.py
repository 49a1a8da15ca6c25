"""Issue 11, embed and evaluate: findings 3, 5, 9, 18, 19, 21 and 22, through the real CLI.

Each test drives `cli.py` (CliRunner, or a subprocess where another process is the point) against a
temporary DuckDB file, on a 12-image generated COCO subset and the packaged tiny open_clip config.
"""

from __future__ import annotations

import importlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.embed import encode, models
from toolkit.embed.devices import resolve_device
from toolkit.errors import UserError
from toolkit.store import artifacts
from toolkit.store import paths as study_paths
from toolkit.store.study import open_study

TINY = ["--model", "tiny-clip", "--num-workers", "0"]
SMALL_SHARDS = {"image": 4, "text": 20}  # 12 images -> 3 image shards; ~60 captions -> 3 text shards


@pytest.fixture
def ingested(synthetic_coco, tmp_db, run_cli):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 12, "--name", "s12")
    return tmp_db


def query(db_path, sql, params=()):
    con = open_study(db_path, read_only=True)
    try:
        return con.execute(sql, list(params)).df()
    finally:
        con.close()


def sets(db_path):
    return query(db_path, "SELECT * FROM embedding_sets ORDER BY embedding_set_id")


def stored(db_path, set_id):
    con = open_study(db_path, read_only=True)
    try:
        return artifacts.load_embedding_set(con, int(set_id))
    finally:
        con.close()


def image_paths(db_path):
    df = query(
        db_path,
        "SELECT s.image_root || '/' || i.rel_path AS path FROM subset_images si "
        "JOIN images i USING (image_id) JOIN subsets s USING (subset_id) ORDER BY si.position",
    )
    # image_root is stored relative to the database's folder when the images lie under it
    return [str(study_paths.resolve(db_path, p)) for p in df["path"]]


def partial_folders(db_path, kind):
    root = Path(db_path).parent / f"{Path(db_path).stem}_cache" / "embeddings" / "s12" / ".partial"
    return sorted(p for p in root.glob(f"{kind}-*") if p.is_dir())


def interrupt_after(monkeypatch, n_saved):
    """Make the n-th shard save raise KeyboardInterrupt (as a Ctrl-C would); returns the restore function."""
    embed_mod = importlib.import_module("toolkit.embed.stage")

    real = embed_mod._Shards.save
    count = []

    def save(self, i, arr):
        real(self, i, arr)
        count.append(i)
        if len(count) == n_saved:
            raise KeyboardInterrupt

    monkeypatch.setattr(embed_mod._Shards, "save", save)
    return lambda: monkeypatch.setattr(embed_mod._Shards, "save", real)


# ----------------------------------------------------------------------------- 3. shards and final arrays


def test_a_tampered_or_unrecorded_shard_is_recomputed_not_stitched_in(ingested, run_cli, monkeypatch):
    embed_mod = importlib.import_module("toolkit.embed.stage")

    monkeypatch.setattr(embed_mod, "SHARD_ROWS", SMALL_SHARDS)
    restore = interrupt_after(monkeypatch, 2)  # image shards 0 and 1 are on disk, then Ctrl-C
    run_cli("--db", ingested, "embed", *TINY, expect=130)
    restore()
    (folder,) = partial_folders(ingested, "image")
    good = np.load(folder / "shard-000001.npy")
    # A same-shape shard full of NaN where shard 0 was (its checksum no longer matches the manifest) ...
    np.save(folder / "shard-000000.npy", np.full((4, 64), np.nan, np.float32))
    # ... and a plausible, unit-norm shard 2 that no run recorded in the manifest.
    planted = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.save(folder / "shard-000002.npy", planted / np.linalg.norm(planted, axis=1, keepdims=True))

    out = run_cli("--db", ingested, "embed", *TINY).output
    assert "1 shard(s) reused" in out  # only shard 1, whose checksum matches
    image = sets(ingested).query("kind == 'image'")
    arr = stored(ingested, image.embedding_set_id.iloc[0]).array
    assert np.isfinite(arr).all()
    bundle = models.load_model("tiny-clip", device="cpu")
    direct = encode.encode_images(bundle, image_paths(ingested), num_workers=0)
    np.testing.assert_allclose(arr, direct, atol=1e-6)  # shards 0 and 2 were computed again
    np.testing.assert_array_equal(arr[4:8], good)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda x: np.where(np.arange(len(x))[:, None] == 2, np.nan, x).astype(np.float32), "NaN or infinite"),
        (lambda x: (x * 3).astype(np.float32), "not unit length"),
    ],
    ids=["nan", "not-normalised"],
)
def test_embeddings_that_are_not_finite_and_unit_length_are_never_registered(
    ingested, run_cli, monkeypatch, corrupt, message
):
    real = encode.encode_texts_with_info

    def broken(*a, **k):
        res = real(*a, **k)
        res.embeddings = corrupt(res.embeddings)
        return res

    monkeypatch.setattr(encode, "encode_texts_with_info", broken)
    res = run_cli("--db", ingested, "embed", *TINY, expect=2)
    assert message in res.output and "Nothing was registered" in res.output and "caption_id" in res.output
    assert "Traceback" not in res.output
    assert sets(ingested).empty and query(ingested, "SELECT * FROM runs WHERE stage = 'embed'").empty
    assert not [f for d in partial_folders(ingested, "text") for f in d.glob("shard-*")]  # no bad shard kept


# ----------------------------------------------------------------------------- 5. shared --cache-dir


def test_a_set_another_process_is_computing_is_refused_and_its_shards_kept(ingested, run_cli, monkeypatch):
    import fcntl

    embed_mod = importlib.import_module("toolkit.embed.stage")

    monkeypatch.setattr(embed_mod, "SHARD_ROWS", SMALL_SHARDS)
    restore = interrupt_after(monkeypatch, 1)
    run_cli("--db", ingested, "embed", *TINY, expect=130)
    restore()
    (folder,) = partial_folders(ingested, "image")
    shard = folder / "shard-000000.npy"
    before = shard.read_bytes()
    lock_path = folder.parent / f"{folder.name}.lock"
    with open(lock_path, "a+") as held:  # another live clipfail embed holds this set's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run_cli("--db", ingested, "embed", *TINY, expect=2)
        assert "Another clipfail embed" in res.output and "Wait for it to finish" in res.output
        assert "Traceback" not in res.output
        assert shard.read_bytes() == before and (folder / "manifest.json").is_file()  # untouched
        assert sets(ingested).empty
        fcntl.flock(held, fcntl.LOCK_UN)
    out = run_cli("--db", ingested, "embed", *TINY).output
    assert "1 shard(s) reused" in out and len(sets(ingested)) == 2


# ----------------------------------------------------------------------------- 9. no DB lock while encoding


def test_the_database_can_be_opened_while_embed_encodes(ingested, run_cli, monkeypatch, tmp_path):
    """Another process opens the database mid-encoding; a set registered meanwhile is reused, not doubled."""
    from toolkit.embed.stage import embed as toolkit_embed

    probe = (
        "import duckdb, sys; c = duckdb.connect(sys.argv[1], read_only=True); "
        "print(c.execute('SELECT count(*) FROM subsets').fetchone()[0])"
    )
    seen = []
    real = encode.encode_texts_with_info

    def encoding(*a, **k):
        if not seen:
            seen.append(subprocess.run([sys.executable, "-c", probe, ingested], capture_output=True, text=True))
            # meanwhile another embed of the same set (another cache folder) finishes and registers it
            toolkit_embed(ingested, "s12", model="tiny-clip", num_workers=0, cache_dir=tmp_path / "other-cache")
        return real(*a, **k)

    monkeypatch.setattr(encode, "encode_texts_with_info", encoding)
    out = run_cli("--db", ingested, "embed", *TINY).output
    assert seen[0].returncode == 0 and seen[0].stdout.strip() == "1", seen[0].stderr[-500:]
    df = sets(ingested)
    assert len(df) == 2 and sorted(df["kind"]) == ["image", "text"]  # not 4: the same identity is not duplicated
    assert "Another process registered the same text embeddings" in out


# ----------------------------------------------------------------------------- 18. half precision


def test_fp16_and_bf16_embed_on_cpu_as_sets_of_their_own(ingested, run_cli):
    run_cli("--db", ingested, "embed", *TINY)
    for precision in ("fp16", "bf16"):
        out = run_cli("--db", ingested, "embed", *TINY, "--precision", precision).output
        assert f"tiny-clip (random, {precision})" in out
    df = sets(ingested)
    assert len(df) == 6 and sorted(set(df["precision"])) == ["bf16", "fp16", "fp32"]
    identities = {json.loads(c)["identity_hash"] for c in df["config_json"]}
    assert len(identities) == 6  # the precision is part of each set's identity
    for kind in ("image", "text"):
        ref = stored(ingested, df[(df.kind == kind) & (df.precision == "fp32")].embedding_set_id.iloc[0]).array
        for precision in ("fp16", "bf16"):
            arr = stored(ingested, df[(df.kind == kind) & (df.precision == precision)].embedding_set_id.iloc[0]).array
            assert arr.dtype == np.float32 and np.isfinite(arr).all()
            np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-4)
            assert (arr * ref).sum(axis=1).min() > 0.95, (kind, precision)  # the same model, rounded
            assert not np.array_equal(arr, ref)  # and really computed in half precision
    # the same precision again is a no-op
    assert "Already embedded" in run_cli("--db", ingested, "embed", *TINY, "--precision", "bf16").output


def test_a_precision_this_torch_cannot_run_is_refused_clearly(ingested, run_cli, monkeypatch):
    real_conv = torch.nn.functional.conv2d

    def conv2d(x, *a, **k):
        if x.dtype == torch.float16:
            raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
        return real_conv(x, *a, **k)

    monkeypatch.setattr(models, "_PROBED", {}, raising=False)
    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    res = run_cli("--db", ingested, "embed", *TINY, "--precision", "fp16", expect=2)
    assert "--precision fp16 is not supported on cpu" in res.output and "bf16" in res.output
    assert "Traceback" not in res.output and sets(ingested).empty


# ----------------------------------------------------------------------------- 19. one device resolver


def test_unavailable_or_unknown_devices_are_messages_in_every_stage(ingested, run_cli, monkeypatch):
    from toolkit.retrieval import ranking as retrieval

    run_cli("--db", ingested, "embed", *TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for stage in ("evaluate", "embed"):
        extra = TINY if stage == "embed" else []
        res = run_cli("--db", ingested, stage, *extra, "--device", "cuda", expect=2)
        assert "CUDA is not available here" in res.output and "Traceback" not in res.output, stage
        res = run_cli("--db", ingested, stage, *extra, "--device", "tpu", expect=2)
        assert "Unknown --device 'tpu'" in res.output and "Download" not in res.output, stage
    assert query(ingested, "SELECT * FROM retrieval_runs").empty
    with pytest.raises(UserError, match="Unknown --device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto", auto_mps=False) in ("cpu", "cuda")
    # one resolver: the stages' former copies are gone
    assert not hasattr(retrieval, "resolve_device") and not hasattr(models, "pick_device")


# ----------------------------------------------------------------------------- 21. the suggested --recompute


def test_the_suggested_recompute_repeats_the_stored_spec(ingested, run_cli, tmp_path):
    ckpt = tmp_path / "weights" / "tiny.safetensors"
    sha = models.save_random_checkpoint(ckpt, seed=3)
    common = ["--model", "tiny-clip", "--checkpoint", ckpt, "--num-workers", "0"]
    run_cli("--db", ingested, "embed", *common, "--precision", "bf16")
    image = sets(ingested).query("kind == 'image'").iloc[0]
    study_paths.resolve(ingested, image["path"]).unlink()  # stored relative to the database folder
    res = run_cli("--db", ingested, "evaluate", expect=2)
    assert "is missing" in res.output
    cmd = shlex.split(res.output.split("Run: ", 1)[1].strip())
    assert cmd[:3] == ["clipfail", "--db", ingested]
    assert ["--checkpoint", str(ckpt)] == cmd[cmd.index("--checkpoint") :][:2]
    assert "--precision" in cmd and cmd[cmd.index("--precision") + 1] == "bf16" and cmd[-1] == "--recompute"
    run_cli(*cmd[1:], "--num-workers", "0")  # following the advice rebuilds the same weights' sets
    after = sets(ingested)
    assert len(after) == 4 and set(after["checkpoint_sha256"]) == {sha} and set(after["precision"]) == {"bf16"}
    assert after.iloc[-1]["sha256"] == image["sha256"] or after.iloc[-2]["sha256"] == image["sha256"]
    assert "queries ranked" in run_cli("--db", ingested, "evaluate").output


# ----------------------------------------------------------------------------- 22. checkpoint messages


def test_bad_checkpoints_say_what_is_wrong(ingested, run_cli, tmp_path):
    good = tmp_path / "good.pt"
    state = models.load_model("tiny-clip", device="cpu").model.state_dict()
    torch.save(state, good)
    cases = {}
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty.pt"] = "is empty (0 bytes)"
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    cases["notes.pt"] = "is not a model checkpoint"
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module, not a state dict
    cases["module.pt"] = "holds pickled Python objects"
    wrong = {k: v for k, v in state.items() if k != "visual.proj"}
    wrong["text_projection"] = torch.zeros(64, 32)
    wrong["extra.weight"] = torch.zeros(2)
    torch.save(wrong, tmp_path / "other-arch.pt")
    cases["other-arch.pt"] = "1 weight(s) missing from the file (e.g. visual.proj)"
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    cases["cut.pt"] = "damaged or truncated"
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cases["cut.safetensors"] = "not a valid .safetensors file"
    for name, expected in cases.items():
        res = run_cli("--db", ingested, "embed", "--model", "tiny-clip", "--checkpoint", tmp_path / name, expect=2)
        out = res.output
        assert expected in out, (name, out)
        assert "weights_only" not in out and "Download the weights" not in out and "Traceback" not in out, out
        if name == "other-arch.pt":
            assert "1 unexpected weight(s) (e.g. extra.weight)" in out and "of another shape" in out
            assert "text_projection: [64, 32] in the file, [64, 64] in the model" in out
    assert sets(ingested).empty
    assert not (Path(ingested).parent / f"{Path(ingested).stem}_cache").exists()  # no folder was made either
    res = run_cli("--db", ingested, "embed", "--model", "tiny-clip", "--checkpoint", good, "--device", "tpu", expect=2)
    assert "Unknown --device 'tpu'" in res.output and "Download the weights" not in res.output
