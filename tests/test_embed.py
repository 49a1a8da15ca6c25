"""The embed stage through the real CLI, on a generated COCO subset with the tiny random model."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import query_df

from toolkit.embed import encode, models
from toolkit.embed.devices import resolve_device
from toolkit.errors import UserError
from toolkit.store import artifacts, paths
from toolkit.store.study import open_study

TINY = ["--model", "tiny-clip", "--num-workers", "0"]


@pytest.fixture
def ingested(synthetic_coco, tmp_db, run_cli):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 30, "--name", "s30")
    return tmp_db


def query(db_path, sql, params=()):
    return query_df(db_path, sql, params)


def sets(db_path):
    df = query(db_path, "SELECT * FROM embedding_sets ORDER BY embedding_set_id")
    return df.assign(path=[str(paths.resolve(db_path, p)) for p in df["path"]])  # stored relative to the db folder


def stored(db_path, set_id):
    con = open_study(db_path, read_only=True)
    try:
        return artifacts.load_embedding_set(con, int(set_id))
    finally:
        con.close()


def subset_order(db_path):
    images = query(
        db_path,
        "SELECT si.image_id, s.image_root || '/' || i.rel_path AS path FROM subset_images si "
        "JOIN images i USING (image_id) JOIN subsets s USING (subset_id) ORDER BY si.position",
    )
    images["path"] = [str(paths.resolve(db_path, p)) for p in images["path"]]
    caps = query(
        db_path,
        "SELECT sc.caption_id, c.text FROM subset_captions sc JOIN captions c USING (caption_id) "
        "JOIN subset_images si ON si.subset_id = sc.subset_id AND si.image_id = sc.image_id "
        "ORDER BY si.position, sc.position",
    )
    return images, caps


def test_embeddings_are_written_normalised_and_referenced(ingested, run_cli):
    out = run_cli("--db", ingested, "embed", "--subset", "s30", *TINY).output
    assert "Embedded subset 's30' with tiny-clip" in out and "captions truncated at 77 tokens: 0" in out
    df = sets(ingested)
    assert sorted(df["kind"]) == ["image", "text"]
    assert set(df["model"]) == {"tiny-clip"} and set(df["precision"]) == {"fp32"}
    assert df["pretrained"].isna().all() and df["checkpoint_sha256"].isna().all()
    runs = query(ingested, "SELECT run_id, stage FROM runs WHERE stage = 'embed'")
    assert len(runs) == 1 and set(df["run_id"]) == {runs["run_id"][0]}
    images, caps = subset_order(ingested)
    for row in df.itertuples():
        path = Path(row.path)
        assert path.is_file() and path.parent.parent.parent.name == Path(ingested).stem + "_cache"
        assert artifacts.sha256_file(path) == row.sha256
        es = stored(ingested, row.embedding_set_id)
        assert es.array.dtype == np.float32 and es.array.shape == (row.rows, row.dim) == (row.rows, 64)
        np.testing.assert_allclose(np.linalg.norm(es.array, axis=1), 1.0, atol=1e-5)
        want = images["image_id"] if row.kind == "image" else caps["caption_id"]
        assert es.item_ids.tolist() == want.tolist()  # row order: subset positions
    assert not list(Path(df["path"][0]).parent.glob(".partial/*"))  # shards cleaned up after the commit


def test_rerun_is_a_noop_and_other_configs_never_mix(ingested, run_cli):
    run_cli("--db", ingested, "embed", *TINY)
    before = sets(ingested)
    mtimes = [Path(p).stat().st_mtime_ns for p in before["path"]]
    out = run_cli("--db", ingested, "embed", *TINY).output
    assert "Already embedded" in out and "nothing recomputed" in out
    after = sets(ingested)
    assert after.equals(before)
    assert [Path(p).stat().st_mtime_ns for p in after["path"]] == mtimes
    assert len(query(ingested, "SELECT * FROM runs WHERE stage = 'embed'")) == 1
    # Draft decoding changes what the image model sees: a new image set; captions are reused.
    out = run_cli("--db", ingested, "embed", *TINY, "--draft-decode").output
    assert "Embedded" in out
    now = sets(ingested)
    assert len(now) == 3 and list(now["kind"]).count("image") == 2
    new_image = now.iloc[-1]
    assert new_image["kind"] == "image" and '"draft":true' in new_image["config_json"]
    assert f"embedding set {before[before.kind == 'text'].embedding_set_id.iloc[0]}:" in out


def test_tampered_or_missing_file_is_refused_until_recompute(ingested, run_cli):
    run_cli("--db", ingested, "embed", *TINY)
    before = sets(ingested)
    text_path = Path(before[before.kind == "text"]["path"].iloc[0])
    arr = np.load(text_path)
    arr[0, 0] += 0.5
    np.save(text_path, arr)
    res = run_cli("--db", ingested, "embed", *TINY, expect=2)
    assert "has changed since it was written" in res.output and "--recompute" in res.output
    assert str(text_path) in res.output and "Traceback" not in res.output
    assert sets(ingested).equals(before)
    out = run_cli("--db", ingested, "embed", *TINY, "--recompute").output
    assert "Embedded" in out
    after = sets(ingested)
    assert len(after) == 4  # two new sets; the old rows stay as history
    new_text = after[after.kind == "text"].iloc[-1]
    # The model is deterministic, so the rebuilt file has the original content and name again.
    assert new_text["path"] == str(text_path) and new_text["sha256"] == before[before.kind == "text"]["sha256"].iloc[0]
    restored = stored(ingested, new_text["embedding_set_id"])
    np.testing.assert_allclose(np.linalg.norm(restored.array, axis=1), 1.0, atol=1e-5)
    text_path.unlink()
    res = run_cli("--db", ingested, "embed", *TINY, expect=2)
    assert "is missing" in res.output and "--recompute" in res.output


def test_interrupted_run_resumes_from_its_shards(ingested, run_cli, monkeypatch, tmp_path):
    embed_mod = importlib.import_module("toolkit.embed.stage")

    monkeypatch.setattr(embed_mod, "SHARD_ROWS", {"image": 8, "text": 40})  # 4 image + 4 text shards
    saved = []
    real_save = embed_mod._Shards.save

    def save_then_interrupt(self, i, arr):
        real_save(self, i, arr)
        saved.append(self.path(i))
        if len(saved) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived after the third shard

    monkeypatch.setattr(embed_mod._Shards, "save", save_then_interrupt)
    res = run_cli("--db", ingested, "embed", *TINY, expect=130)
    assert "Interrupted" in res.output
    assert sets(ingested).empty and query(ingested, "SELECT * FROM runs WHERE stage = 'embed'").empty
    assert all(p.is_file() for p in saved) and len(saved) == 3
    monkeypatch.setattr(embed_mod._Shards, "save", real_save)

    calls = []
    real_encode = encode.encode_images
    monkeypatch.setattr(encode, "encode_images", lambda *a, **k: calls.append(len(a[1])) or real_encode(*a, **k))
    out = run_cli("--db", ingested, "embed", *TINY).output
    assert "3 shard(s) reused from an interrupted run" in out
    assert calls == [6]  # only the last image shard (30 = 8 + 8 + 8 + 6) was computed again
    resumed = sets(ingested)
    assert len(resumed) == 2 and all(not p.exists() for p in saved)

    # the resumed set equals an uninterrupted run into another database
    other = str(tmp_path / "other.duckdb")
    run_cli("--db", other, "ingest", "--coco-root", _coco_root(ingested), "--num-images", 30, "--name", "s30")
    run_cli("--db", other, "embed", *TINY)
    for kind in ("image", "text"):
        a = stored(ingested, resumed[resumed.kind == kind].embedding_set_id.iloc[0]).array
        o = sets(other)
        b = stored(other, o[o.kind == kind].embedding_set_id.iloc[0]).array
        np.testing.assert_allclose(a, b, atol=1e-6)


def _coco_root(db_path):
    return paths.resolve(db_path, query(db_path, "SELECT image_root FROM subsets")["image_root"][0]).parent


def test_checkpoint_gives_the_same_embeddings_as_the_in_memory_model(ingested, run_cli, tmp_path):
    bundle = models.load_model("tiny-clip", device="cpu")
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the default random weights
    ckpt = tmp_path / "weights.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    out = run_cli("--db", ingested, "embed", "--model", "tiny-clip", "--checkpoint", ckpt, "--num-workers", 0).output
    assert f"checkpoint {models.sha256_file(ckpt)[:12]}" in out
    df = sets(ingested)
    assert set(df["checkpoint_sha256"]) == {models.sha256_file(ckpt)}
    images, caps = subset_order(ingested)
    img = stored(ingested, df[df.kind == "image"].embedding_set_id.iloc[0]).array
    txt = stored(ingested, df[df.kind == "text"].embedding_set_id.iloc[0]).array
    np.testing.assert_allclose(img, encode.encode_images(bundle, images["path"], num_workers=0), atol=1e-6)
    np.testing.assert_allclose(txt, encode.encode_texts(bundle, caps["text"].tolist()), atol=1e-6)


def test_bad_inputs_give_one_message_and_write_nothing(ingested, run_cli, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # even if a dev has weights
    res = run_cli(
        "--db", ingested, "embed", "--model", "tiny-clip", "--pretrained", "x", "--checkpoint", "x.pt", expect=2
    )
    assert "either --pretrained TAG or --checkpoint PATH" in res.output
    res = run_cli("--db", ingested, "embed", *TINY, "--subset", "nope", expect=2)
    assert "No subset named 'nope'" in res.output
    # the reference model's weights are not cached and the tests run offline: a fast, clear refusal
    res = run_cli("--db", ingested, "embed", "--model", "openai/clip-vit-base-patch32", expect=2)
    assert "--checkpoint" in res.output and "Traceback" not in res.output
    images, _ = subset_order(ingested)
    gone = Path(images["path"][3])
    gone.unlink()
    res = run_cli("--db", ingested, "embed", *TINY, expect=2)
    assert gone.name in res.output and "missing" in res.output
    corrupt = Path(images["path"][5])
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    gone.write_bytes(Path(images["path"][4]).read_bytes())
    res = run_cli("--db", ingested, "embed", *TINY, expect=2)
    assert corrupt.name in res.output and "Cannot decode" in res.output
    assert sets(ingested).empty and query(ingested, "SELECT * FROM runs WHERE stage = 'embed'").empty


NOOP = """
import sys
from click.testing import CliRunner
from cli import cli
r = CliRunner().invoke(cli, sys.argv[1:])
print(r.output)
print("LOADED", sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules))
sys.exit(r.exit_code)
"""


def test_a_rerun_with_a_json_model_config_imports_no_open_clip(synthetic_coco, tmp_path, run_cli):
    """Issue 24, item 20: the config's identity (its file's stem) is read without open_clip, as for model names."""
    import os
    import shutil
    import subprocess
    import sys

    dbp = tmp_path / "j.duckdb"
    run_cli("--db", dbp, "ingest", "--coco-root", synthetic_coco, "--num-images", 4, "--name", "s4")
    cfg, ckpt = tmp_path / "tiny.json", tmp_path / "tiny.pt"
    shutil.copy(models.tiny_config_path(), cfg)
    models.save_random_checkpoint(ckpt)
    args = ["--db", dbp, "embed", "--model", cfg, "--checkpoint", ckpt, "--num-workers", 0]
    run_cli(*args)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", NOOP, *map(str, args)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "Already embedded" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout  # neither open_clip nor torch imported to name the model


def test_the_light_config_identity_equals_open_clips(tmp_path, monkeypatch):
    import json
    import shutil
    import sys

    import open_clip

    mine = tmp_path / "tiny.json"
    shutil.copy(models.tiny_config_path(), mine)
    builtin = Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json"
    same = tmp_path / "ViT-B-32.json"
    shutil.copy(builtin, same)
    clash = tmp_path / "other" / "ViT-B-32.json"
    clash.parent.mkdir()
    shutil.copy(mine, clash)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}), encoding="utf-8")
    full = {str(p): models.resolve_spec(str(p)) for p in (mine, same)}
    monkeypatch.delitem(sys.modules, "open_clip")  # a fresh process: open_clip's registry is not loaded
    for p, spec in full.items():
        light = models._resolve_light(p, None)
        assert (light.kind, light.model_name, light.config_path) == (spec.kind, spec.model_name, spec.config_path)
    assert models._resolve_light(str(clash), None) is None  # another architecture under a built-in name
    assert models._resolve_light(str(bad), None) is None  # resolve_spec names what it lacks
    assert "open_clip" not in sys.modules
    monkeypatch.undo()
    with pytest.raises(models.UserError, match="already knows"):
        models.resolve_spec(str(clash))


def _embed_pipeline_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("embed_pipeline")


def test_the_stage_marks_each_step_where_its_work_happens(ingested, monkeypatch):
    """on_step marks (issue 29): tokenizing every caption happens inside "tokenize", before the image
    stream starts, so no interval between shard saves can time it; images are saved inside "image",
    captions inside "text", and the final files inside "finish"."""
    embed_mod = importlib.import_module("toolkit.embed.stage")
    monkeypatch.setattr(embed_mod, "SHARD_ROWS", {"image": 8, "text": 40})  # 4 image + 4 text shards
    events = []
    real_tokenize, real_save = encode.tokenize, artifacts.save_array
    monkeypatch.setattr(encode, "tokenize", lambda *a, **k: events.append("tokenizer") or real_tokenize(*a, **k))
    monkeypatch.setattr(artifacts, "save_array", lambda *a, **k: events.append("final file") or real_save(*a, **k))
    embed_mod.embed(ingested, "s30", model="tiny-clip", num_workers=0, device="cpu", progress=False,
                    on_step=events.append, on_shard=lambda kind, i, n: events.append(f"{kind} shard"))  # fmt: skip
    assert events == ["model", "tokenize", "tokenizer", "image", *["image shard"] * 4, "text", *["text shard"] * 4,
                      "finish", "final file", "final file"]  # fmt: skip
    events.clear()
    embed_mod.embed(ingested, "s30", model="tiny-clip", num_workers=0, device="cpu", progress=False,
                    on_step=events.append)  # fmt: skip
    assert events == []  # nothing to compute: no step


def test_the_embed_benchmark_books_each_part_to_its_own_step(synthetic_coco, tmp_db, run_cli, monkeypatch):
    """benchmarks/embed_pipeline.py on a clock that only the stage's work moves: tokenizing (5 s) is the
    caption part's, the image stream's (1 s a call) the image part's, caption encoding (0.25 s a shard) the
    caption part's. Timed between shard saves, as it was, tokenizing went to the images."""
    bench = _embed_pipeline_benchmark(monkeypatch)
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 30, "--name", "bench")
    embed_mod = importlib.import_module("toolkit.embed.stage")
    monkeypatch.setattr(embed_mod, "SHARD_ROWS", {"image": 8, "text": 40})  # 4 text shards (150 captions)
    clock = [100.0]

    def costs(fn, seconds):
        def timed(*a, **k):
            out = fn(*a, **k)
            clock[0] += seconds
            return out

        return timed

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))  # the benchmark's clock
    monkeypatch.setattr(encode, "tokenize", costs(encode.tokenize, 5.0))
    monkeypatch.setattr(encode, "encode_images", costs(encode.encode_images, 1.0))
    monkeypatch.setattr(encode, "encode_texts_with_info", costs(encode.encode_texts_with_info, 0.25))
    stage = bench.run_stage(Path(tmp_db), "tiny-clip", num_workers=0, device="cpu")
    parts = {k: v for k, v in stage.items() if k != "res"}
    assert parts == {"plan": 0.0, "model": 0.0, "tokenize": 5.0, "image": 1.0, "text": 1.0, "finish": 0.0,
                     "captions": 6.0, "total": 7.0}  # fmt: skip
    assert bench.step_seconds([("a", 0.0), ("b", 1.5), ("a", 2.0)], 4.0) == {"a": 3.5, "b": 0.5}


# ----------------------------------------------------------------------------- issue 11: embed and evaluate
# Findings 3, 5, 9, 18, 19, 21 and 22, through the real CLI (CliRunner, or a subprocess where another process is
# the point), on ingested12 (conftest.py: a 12-image subset s12 of the generated dataset).

SMALL_SHARDS = {"image": 4, "text": 20}  # 12 images -> 3 image shards; ~60 captions -> 3 text shards


def image_paths(db_path):
    df = query(
        db_path,
        "SELECT s.image_root || '/' || i.rel_path AS path FROM subset_images si "
        "JOIN images i USING (image_id) JOIN subsets s USING (subset_id) ORDER BY si.position",
    )
    # image_root is stored relative to the database's folder when the images lie under it
    return [str(paths.resolve(db_path, p)) for p in df["path"]]


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


def test_a_tampered_or_unrecorded_shard_is_recomputed_not_stitched_in(ingested12, run_cli, monkeypatch):
    embed_mod = importlib.import_module("toolkit.embed.stage")

    monkeypatch.setattr(embed_mod, "SHARD_ROWS", SMALL_SHARDS)
    restore = interrupt_after(monkeypatch, 2)  # image shards 0 and 1 are on disk, then Ctrl-C
    run_cli("--db", ingested12, "embed", *TINY, expect=130)
    restore()
    (folder,) = partial_folders(ingested12, "image")
    good = np.load(folder / "shard-000001.npy")
    # A same-shape shard full of NaN where shard 0 was (its checksum no longer matches the manifest) ...
    np.save(folder / "shard-000000.npy", np.full((4, 64), np.nan, np.float32))
    # ... and a plausible, unit-norm shard 2 that no run recorded in the manifest.
    planted = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.save(folder / "shard-000002.npy", planted / np.linalg.norm(planted, axis=1, keepdims=True))

    out = run_cli("--db", ingested12, "embed", *TINY).output
    assert "1 shard(s) reused" in out  # only shard 1, whose checksum matches
    image = sets(ingested12).query("kind == 'image'")
    arr = stored(ingested12, image.embedding_set_id.iloc[0]).array
    assert np.isfinite(arr).all()
    bundle = models.load_model("tiny-clip", device="cpu")
    direct = encode.encode_images(bundle, image_paths(ingested12), num_workers=0)
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
    ingested12, run_cli, monkeypatch, corrupt, message
):
    real = encode.encode_texts_with_info

    def broken(*a, **k):
        res = real(*a, **k)
        res.embeddings = corrupt(res.embeddings)
        return res

    monkeypatch.setattr(encode, "encode_texts_with_info", broken)
    res = run_cli("--db", ingested12, "embed", *TINY, expect=2)
    assert message in res.output and "Nothing was registered" in res.output and "caption_id" in res.output
    assert "Traceback" not in res.output
    assert sets(ingested12).empty and query(ingested12, "SELECT * FROM runs WHERE stage = 'embed'").empty
    assert not [f for d in partial_folders(ingested12, "text") for f in d.glob("shard-*")]  # no bad shard kept


# ----------------------------------------------------------------------------- 5. shared --cache-dir


def test_a_set_another_process_is_computing_is_refused_and_its_shards_kept(ingested12, run_cli, monkeypatch):
    import fcntl

    embed_mod = importlib.import_module("toolkit.embed.stage")

    monkeypatch.setattr(embed_mod, "SHARD_ROWS", SMALL_SHARDS)
    restore = interrupt_after(monkeypatch, 1)
    run_cli("--db", ingested12, "embed", *TINY, expect=130)
    restore()
    (folder,) = partial_folders(ingested12, "image")
    shard = folder / "shard-000000.npy"
    before = shard.read_bytes()
    lock_path = folder.parent / f"{folder.name}.lock"
    with open(lock_path, "a+") as held:  # another live clipfail embed holds this set's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run_cli("--db", ingested12, "embed", *TINY, expect=2)
        assert "Another clipfail embed" in res.output and "Wait for it to finish" in res.output
        assert "Traceback" not in res.output
        assert shard.read_bytes() == before and (folder / "manifest.json").is_file()  # untouched
        assert sets(ingested12).empty
        fcntl.flock(held, fcntl.LOCK_UN)
    out = run_cli("--db", ingested12, "embed", *TINY).output
    assert "1 shard(s) reused" in out and len(sets(ingested12)) == 2


# ----------------------------------------------------------------------------- 9. no DB lock while encoding


def test_the_database_can_be_opened_while_embed_encodes(ingested12, run_cli, monkeypatch, tmp_path):
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
            seen.append(subprocess.run([sys.executable, "-c", probe, ingested12], capture_output=True, text=True))
            # meanwhile another embed of the same set (another cache folder) finishes and registers it
            toolkit_embed(ingested12, "s12", model="tiny-clip", num_workers=0, cache_dir=tmp_path / "other-cache")
        return real(*a, **k)

    monkeypatch.setattr(encode, "encode_texts_with_info", encoding)
    out = run_cli("--db", ingested12, "embed", *TINY).output
    assert seen[0].returncode == 0 and seen[0].stdout.strip() == "1", seen[0].stderr[-500:]
    df = sets(ingested12)
    assert len(df) == 2 and sorted(df["kind"]) == ["image", "text"]  # not 4: the same identity is not duplicated
    assert "Another process registered the same text embeddings" in out


# ----------------------------------------------------------------------------- 18. half precision


def test_fp16_and_bf16_embed_on_cpu_as_sets_of_their_own(ingested12, run_cli):
    run_cli("--db", ingested12, "embed", *TINY)
    for precision in ("fp16", "bf16"):
        out = run_cli("--db", ingested12, "embed", *TINY, "--precision", precision).output
        assert f"tiny-clip (random, {precision})" in out
    df = sets(ingested12)
    assert len(df) == 6 and sorted(set(df["precision"])) == ["bf16", "fp16", "fp32"]
    identities = {json.loads(c)["identity_hash"] for c in df["config_json"]}
    assert len(identities) == 6  # the precision is part of each set's identity
    for kind in ("image", "text"):
        ref = stored(ingested12, df[(df.kind == kind) & (df.precision == "fp32")].embedding_set_id.iloc[0]).array
        for precision in ("fp16", "bf16"):
            arr = stored(ingested12, df[(df.kind == kind) & (df.precision == precision)].embedding_set_id.iloc[0]).array
            assert arr.dtype == np.float32 and np.isfinite(arr).all()
            np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-4)
            assert (arr * ref).sum(axis=1).min() > 0.95, (kind, precision)  # the same model, rounded
            assert not np.array_equal(arr, ref)  # and really computed in half precision
    # the same precision again is a no-op
    assert "Already embedded" in run_cli("--db", ingested12, "embed", *TINY, "--precision", "bf16").output


def test_a_precision_this_torch_cannot_run_is_refused_clearly(ingested12, run_cli, monkeypatch):
    real_conv = torch.nn.functional.conv2d

    def conv2d(x, *a, **k):
        if x.dtype == torch.float16:
            raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
        return real_conv(x, *a, **k)

    monkeypatch.setattr(models, "_PROBED", {}, raising=False)
    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    res = run_cli("--db", ingested12, "embed", *TINY, "--precision", "fp16", expect=2)
    assert "--precision fp16 is not supported on cpu" in res.output and "bf16" in res.output
    assert "Traceback" not in res.output and sets(ingested12).empty


# ----------------------------------------------------------------------------- 19. one device resolver


def test_unavailable_or_unknown_devices_are_messages_in_every_stage(ingested12, run_cli, monkeypatch):
    from toolkit.retrieval import ranking as retrieval

    run_cli("--db", ingested12, "embed", *TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for stage in ("evaluate", "embed"):
        extra = TINY if stage == "embed" else []
        res = run_cli("--db", ingested12, stage, *extra, "--device", "cuda", expect=2)
        assert "CUDA is not available here" in res.output and "Traceback" not in res.output, stage
        res = run_cli("--db", ingested12, stage, *extra, "--device", "tpu", expect=2)
        assert "Unknown --device 'tpu'" in res.output and "Download" not in res.output, stage
    assert query(ingested12, "SELECT * FROM retrieval_runs").empty
    with pytest.raises(UserError, match="Unknown --device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto", auto_mps=False) in ("cpu", "cuda")
    # one resolver: the stages' former copies are gone
    assert not hasattr(retrieval, "resolve_device") and not hasattr(models, "pick_device")


# ----------------------------------------------------------------------------- 21. the suggested --recompute


def test_the_suggested_recompute_repeats_the_stored_spec(ingested12, run_cli, tmp_path):
    ckpt = tmp_path / "weights" / "tiny.safetensors"
    sha = models.save_random_checkpoint(ckpt, seed=3)
    common = ["--model", "tiny-clip", "--checkpoint", ckpt, "--num-workers", "0"]
    run_cli("--db", ingested12, "embed", *common, "--precision", "bf16")
    image = sets(ingested12).query("kind == 'image'").iloc[0]
    paths.resolve(ingested12, image["path"]).unlink()  # stored relative to the database folder
    res = run_cli("--db", ingested12, "evaluate", expect=2)
    assert "is missing" in res.output
    cmd = shlex.split(res.output.split("Run: ", 1)[1].strip())
    assert cmd[:3] == ["clipfail", "--db", ingested12]
    assert ["--checkpoint", str(ckpt)] == cmd[cmd.index("--checkpoint") :][:2]
    assert "--precision" in cmd and cmd[cmd.index("--precision") + 1] == "bf16" and cmd[-1] == "--recompute"
    run_cli(*cmd[1:], "--num-workers", "0")  # following the advice rebuilds the same weights' sets
    after = sets(ingested12)
    assert len(after) == 4 and set(after["checkpoint_sha256"]) == {sha} and set(after["precision"]) == {"bf16"}
    assert after.iloc[-1]["sha256"] == image["sha256"] or after.iloc[-2]["sha256"] == image["sha256"]
    assert "queries ranked" in run_cli("--db", ingested12, "evaluate").output


# ----------------------------------------------------------------------------- 22. checkpoint messages


def test_bad_checkpoints_say_what_is_wrong(ingested12, run_cli, tmp_path):
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
        res = run_cli("--db", ingested12, "embed", "--model", "tiny-clip", "--checkpoint", tmp_path / name, expect=2)
        out = res.output
        assert expected in out, (name, out)
        assert "weights_only" not in out and "Download the weights" not in out and "Traceback" not in out, out
        if name == "other-arch.pt":
            assert "1 unexpected weight(s) (e.g. extra.weight)" in out and "of another shape" in out
            assert "text_projection: [64, 32] in the file, [64, 64] in the model" in out
    assert sets(ingested12).empty
    assert not (Path(ingested12).parent / f"{Path(ingested12).stem}_cache").exists()  # no folder was made either
    res = run_cli(
        "--db", ingested12, "embed", "--model", "tiny-clip", "--checkpoint", good, "--device", "tpu", expect=2
    )
    assert "Unknown --device 'tpu'" in res.output and "Download the weights" not in res.output


def test_a_weights_file_given_as_pretrained_is_refused(synthetic_coco, tmp_db, run_cli, tmp_path):
    """open_clip accepts a file path as a pretrained tag, but the set's identity then recorded the path's text,
    not the file's sha256: weights rewritten at that path were answered with the old cached embeddings."""
    from toolkit.embed import models
    from toolkit.store.study import open_study

    ckpt = tmp_path / "weights.pt"
    models.save_random_checkpoint(ckpt)
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 6, "--name", "s6")
    res = run_cli("--db", tmp_db, "embed", "--model", "tiny-clip", "--pretrained", ckpt, "--num-workers", "0", expect=2)
    assert f"--checkpoint {ckpt}" in res.output and "Traceback" not in res.output
    with open_study(tmp_db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM embedding_sets").fetchone()[0] == 0


def test_run_refuses_a_tag_and_a_checkpoint_together(synthetic_coco, tmp_db, run_cli, tmp_path):
    """embed refused --pretrained with --checkpoint only in cli.py: clipfail run (and the Python API) embedded with
    both, recording the checkpoint's sha256 but applying the tag's preprocess (its mean/std), so a later
    `embed --checkpoint` alone was answered with those embeddings although it means another preprocess."""
    from toolkit.embed import models
    from toolkit.embed.stage import embed
    from toolkit.errors import UserError

    ckpt = tmp_path / "w.safetensors"
    models.save_random_checkpoint(ckpt)
    args = ["--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 6, "--model", "tiny-clip"]
    res = run_cli(*args, "--pretrained", "openai", "--checkpoint", ckpt, "--device", "cpu", "--no-pictures", expect=2)
    assert "either --pretrained TAG or --checkpoint PATH" in res.output and "Traceback" not in res.output
    with pytest.raises(UserError, match="not both"):
        embed(tmp_db, model="tiny-clip", pretrained="openai", checkpoint=ckpt)
    assert not os.path.exists(tmp_db)  # refused before anything was written, ingest included
