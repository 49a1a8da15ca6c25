"""evaluate: stored ranks and the recall_summary view equal the Python computation; idempotence; messages."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import register_hand_built

from toolkit.errors import UserError
from toolkit.ingest.stage import ingest
from toolkit.retrieval import ranking as R
from toolkit.retrieval.evaluate import evaluate
from toolkit.store import db, paths
from toolkit.store.study import open_study

MODEL = "hand-built-16d"


@pytest.fixture
def subset_db(tmp_db, synthetic_coco):
    con = open_study(tmp_db)
    ingest(con, coco_root=synthetic_coco, num_images=30, captions_per_image=5, seed=42, name="s30")
    con.close()
    return tmp_db


def _members(con, name="s30"):
    sid = db.get_subset(con, name)["subset_id"]
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).fetchnumpy()[
        "image_id"
    ]
    caps = con.execute(
        """
        SELECT c.caption_id, c.image_id FROM subset_captions c
        JOIN subset_images i ON i.subset_id = c.subset_id AND i.image_id = c.image_id
        WHERE c.subset_id = ? ORDER BY i.position, c.position
        """,
        [sid],
    ).df()
    return int(sid), imgs.astype(np.int64), caps


def _register(con, tmp_path, kind, array, item_ids, model=MODEL, subset="s30", tag="", pretrained=None):
    sid = int(db.get_subset(con, subset)["subset_id"])
    path = tmp_path / f"{kind}{tag}-{model}.npy"
    cfg = {"kind": kind, "model": model, "test": tag}
    return register_hand_built(con, path, kind, array, item_ids, sid, model=model, pretrained=pretrained, config=cfg)


def _embeddings(caps, n_images, d=16, seed=0, noise=2.0):
    """Seeded normalised embeddings; each caption is a noisy copy of its image (varied ranks)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_images, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    return img, rng, d, noise


def _make_sets(con, tmp_path, model=MODEL, seed=0, tag="", pretrained=None):
    _, img_ids, caps = _members(con)
    img, rng, d, noise = _embeddings(caps, len(img_ids), seed=seed)
    row_of = {int(i): r for r, i in enumerate(img_ids)}
    gt_rows = np.array([row_of[int(i)] for i in caps["image_id"]])
    txt = img[gt_rows] + noise * rng.standard_normal((len(gt_rows), d)).astype(np.float32) / np.sqrt(d)
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    _register(con, tmp_path, "image", img, img_ids, model=model, tag=tag, pretrained=pretrained)
    _register(con, tmp_path, "text", txt, caps["caption_id"].to_numpy(), model=model, tag=tag, pretrained=pretrained)
    return img, txt, img_ids, caps["caption_id"].to_numpy(dtype=np.int64), gt_rows


def _counts(con):
    return tuple(
        con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "retrieval_runs", "retrieval_ranks")
    )


def test_text_to_image_rows_and_view_equal_python(subset_db, tmp_path):
    con = open_study(subset_db)
    img, txt, img_ids, cap_ids, gt_rows = _make_sets(con, tmp_path)
    res = evaluate(con, "s30", model=MODEL, topk=7, device="cpu")
    assert not res.is_noop and res.n_queries == len(cap_ids) == 150

    py = R.rank_text_to_image(txt, img, gt_rows, k=7, device="cpu")
    assert 0.05 < py.recall_at(1) < 0.95  # ranks are spread out: the comparison below means something
    view = con.execute("SELECT * FROM recall_summary WHERE retrieval_run_id = ?", [res.retrieval_run_id]).df()
    assert len(view) == 1
    row = view.iloc[0]
    assert (row["subset"], row["model"], row["direction"]) == ("s30", MODEL, "text-to-image")
    assert row["n_queries"] == 150
    for K in (1, 5, 10):
        assert row[f"r_at_{K}"] == pytest.approx(py.recall_at(K), abs=1e-12)
    assert row["mean_rank"] == pytest.approx(np.mean(py.gt_rank), abs=1e-12)
    assert row["median_rank"] == pytest.approx(np.median(py.gt_rank), abs=1e-12)
    assert row["n_r1_failures"] == int((py.gt_rank > 1).sum())
    # the result carries exactly that view row
    assert res.summary.to_dict("records") == view.to_dict("records")

    # per-query rows: ids mapped through embedding_rows, numbers bit-identical to the Python result
    ranks = con.execute(
        "SELECT * FROM retrieval_ranks WHERE retrieval_run_id = ? ORDER BY query_id", [res.retrieval_run_id]
    ).df()
    order = np.argsort(cap_ids)
    np.testing.assert_array_equal(ranks["query_id"], cap_ids[order])
    np.testing.assert_array_equal(ranks["gt_id"], img_ids[gt_rows][order])
    np.testing.assert_array_equal(ranks["gt_rank"], py.gt_rank[order])
    np.testing.assert_array_equal(ranks["n_tied"], py.n_tied[order])
    np.testing.assert_array_equal(ranks["gt_score"].to_numpy(np.float32), py.gt_score[order])
    topk_ids = np.stack(ranks["topk_ids"].to_numpy())
    np.testing.assert_array_equal(topk_ids, img_ids[py.topk_indices][order])
    np.testing.assert_array_equal(np.stack(ranks["topk_scores"].to_numpy()).astype(np.float32), py.topk_scores[order])
    np.testing.assert_array_equal(ranks["top1_id"], topk_ids[:, 0])
    # a caption is an R@1 failure exactly when its top-1 image is not its own (no ties here)
    assert ((ranks["gt_rank"] > 1) == (ranks["top1_id"] != ranks["gt_id"])).all()

    run = con.execute("SELECT * FROM retrieval_runs WHERE retrieval_run_id = ?", [res.retrieval_run_id]).df().iloc[0]
    assert run["tie_policy"] == R.TIE_POLICY and run["topk"] == 7
    assert con.execute("SELECT stage FROM runs WHERE run_id = ?", [int(run["run_id"])]).fetchone()[0] == "evaluate"
    con.close()


def test_image_to_text_view_equals_python(subset_db, tmp_path):
    con = open_study(subset_db)
    img, txt, img_ids, cap_ids, gt_rows = _make_sets(con, tmp_path)
    res = evaluate(con, "s30", model=MODEL, device="cpu", direction="image-to-text")
    py = R.rank_image_to_text(img, txt, gt_rows, k=10, device="cpu")
    row = res.summary.iloc[0]
    assert row["direction"] == "image-to-text" and row["n_queries"] == 30
    for K in (1, 5, 10):
        assert row[f"r_at_{K}"] == pytest.approx(py.recall_at(K), abs=1e-12)
    assert row["mean_rank"] == pytest.approx(np.mean(py.gt_rank), abs=1e-12)
    assert row["median_rank"] == pytest.approx(np.median(py.gt_rank), abs=1e-12)
    assert row["n_r1_failures"] == int((py.gt_rank > 1).sum())
    ranks = con.execute(
        """
        SELECT r.query_id, r.gt_id, r.gt_rank, c.image_id AS caption_image
        FROM retrieval_ranks r JOIN captions c ON c.caption_id = r.gt_id
        WHERE retrieval_run_id = ? ORDER BY query_id
        """,
        [res.retrieval_run_id],
    ).df()
    # queries are images; gt_id is one of the image's own captions (its best-ranked one)
    assert (ranks["query_id"] == ranks["caption_image"]).all()
    order = np.argsort(img_ids)
    np.testing.assert_array_equal(ranks["gt_rank"], py.gt_rank[order])
    np.testing.assert_array_equal(ranks["gt_id"], cap_ids[py.gt_index][order])
    con.close()


def test_rerun_is_noop_and_other_inputs_make_a_new_run(subset_db, tmp_path):
    con = open_study(subset_db)
    _make_sets(con, tmp_path)
    first = evaluate(con, "s30", model=MODEL, device="cpu")
    before = _counts(con)
    again = evaluate(con, "s30", model=MODEL, device="cpu", chunk=3)  # chunk cannot change a result
    assert again.is_noop and again.retrieval_run_id == first.retrieval_run_id
    assert _counts(con) == before
    assert again.summary.to_dict("records") == first.summary.to_dict("records")
    other = evaluate(con, "s30", model=MODEL, device="cpu", topk=3)
    assert not other.is_noop and other.retrieval_run_id != first.retrieval_run_id
    # re-embedding (a new set) is a new run too, never an overwrite
    _make_sets(con, tmp_path, seed=1, tag="b")
    newer = evaluate(con, "s30", model=MODEL, device="cpu")
    assert not newer.is_noop and newer.retrieval_run_id not in (first.retrieval_run_id, other.retrieval_run_id)
    n_rows = con.execute("SELECT retrieval_run_id, count(*) FROM retrieval_ranks GROUP BY 1 ORDER BY 1").fetchall()
    assert n_rows == [(first.retrieval_run_id, 150), (other.retrieval_run_id, 150), (newer.retrieval_run_id, 150)]
    con.close()


def test_without_embeddings_names_the_embed_command(subset_db, tmp_path):
    con = open_study(subset_db)
    with pytest.raises(UserError) as exc:
        evaluate(con, "s30", model="openai/clip-vit-base-patch32")
    assert f"Run: clipfail --db {subset_db} embed --subset s30 --model openai/clip-vit-base-patch32" in str(exc.value)
    # only the image set: the message says which one is missing
    _, img_ids, _ = _members(con)
    _register(con, tmp_path, "image", np.eye(30, 16, dtype=np.float32), img_ids)
    with pytest.raises(
        UserError, match=r"text embeddings .* missing.*clipfail --db .* embed --subset s30 --model " + MODEL
    ):
        evaluate(con, "s30", model=MODEL)
    assert _counts(con)[1:] == (0, 0)
    con.close()


def test_tampered_file_is_refused_and_nothing_written(subset_db, tmp_path):
    con = open_study(subset_db)
    _make_sets(con, tmp_path)
    before = _counts(con)
    path = paths.resolve(con, con.execute("SELECT path FROM embedding_sets WHERE kind = 'text'").fetchone()[0])
    arr = np.load(path)
    arr[0, 0] += 0.5
    np.save(path, arr)
    with pytest.raises(UserError, match=r"changed since it was written.*--recompute"):
        evaluate(con, "s30", model=MODEL, device="cpu")
    assert _counts(con) == before
    con.close()


def test_several_models_need_model_option(subset_db, tmp_path):
    con = open_study(subset_db)
    _make_sets(con, tmp_path, model="model-a")
    _make_sets(con, tmp_path, model="model-b", seed=2)
    with pytest.raises(UserError, match=r"several models: model-a, model-b.*--model"):
        evaluate(con, "s30", device="cpu")
    res = evaluate(con, "s30", model="model-b", device="cpu")
    assert res.model == "model-b"
    with pytest.raises(UserError, match="No cached embeddings for subset 's30' and model 'model-c'"):
        evaluate(con, "s30", model="model-c", device="cpu")
    con.close()


def test_hugging_face_name_finds_the_resolved_model_and_weights(subset_db, tmp_path):
    """embed records open_clip's name; the HF-style name maps to ViT-B-32-quickgelu + 'openai' weights."""
    con = open_study(subset_db)
    _make_sets(con, tmp_path, model="ViT-B-32-quickgelu", pretrained="openai")
    _make_sets(con, tmp_path, model="ViT-B-32-quickgelu", pretrained="laion400m_e32", seed=3, tag="laion")
    with pytest.raises(UserError, match="several models"):
        evaluate(con, "s30", model="ViT-B-32-quickgelu", device="cpu")
    res = evaluate(con, "s30", model="openai/clip-vit-base-patch32", device="cpu")
    sets = con.execute(
        "SELECT e.pretrained FROM retrieval_runs r "
        "JOIN embedding_sets e ON e.embedding_set_id = r.text_embedding_set_id WHERE retrieval_run_id = ?",
        [res.retrieval_run_id],
    ).fetchall()
    assert res.model == "ViT-B-32-quickgelu" and sets == [("openai",)]
    con.close()


def test_failed_write_leaves_database_unchanged(subset_db, tmp_path, monkeypatch):
    con = open_study(subset_db)
    _make_sets(con, tmp_path)
    before = _counts(con)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(db, "insert_df", boom)  # dies after the run and retrieval_runs rows were inserted
    with pytest.raises(KeyboardInterrupt):
        evaluate(con, "s30", model=MODEL, device="cpu")
    assert _counts(con) == before
    con.close()


def test_cli_prints_the_view(subset_db, tmp_path, run_cli):
    out = run_cli("--db", subset_db, "evaluate", "--subset", "s30", expect=2).output
    assert (
        "No cached embeddings for subset 's30'" in out
        and f"clipfail --db {subset_db} embed --subset s30 --model" in out
    )
    assert "Traceback" not in out

    con = open_study(subset_db)
    _make_sets(con, tmp_path)
    con.close()
    out = run_cli("--db", subset_db, "evaluate", "--subset", "s30", "--device", "cpu").output
    con = open_study(subset_db, read_only=True)
    view = con.execute("SELECT * FROM recall_summary").df()
    con.close()
    assert len(view) == 1
    row = view.iloc[0]
    assert f"Retrieval run {row['retrieval_run_id']} (text-to-image, subset s30, model {MODEL}): 150 queries" in out
    header, values = [line.split() for line in out.strip().splitlines()[-2:]]
    assert header == list(view.columns)
    assert values == [
        str(row["retrieval_run_id"]),
        "s30",
        MODEL,
        "text-to-image",
        "150",
        f"{row['r_at_1']:.4f}",
        f"{row['r_at_5']:.4f}",
        f"{row['r_at_10']:.4f}",
        f"{row['mean_rank']:.4f}",
        f"{row['median_rank']:.4f}",
        str(row["n_r1_failures"]),
        # both counts of ties (issue 24.7): the pessimistic R@K, the queries with a tie, the flag
        f"{row['r_at_1_pessimistic']:.4f}",
        f"{row['r_at_5_pessimistic']:.4f}",
        f"{row['r_at_10_pessimistic']:.4f}",
        str(row["n_tied_queries"]),
        str(row["is_tie_affected"]),
    ]
    again = run_cli("--db", subset_db, "evaluate", "--direction", "text-to-image", "--device", "cpu").output
    assert "already evaluated, nothing changed" in again
    i2t = run_cli("--db", subset_db, "evaluate", "--direction", "image-to-text", "--topk", "3").output
    assert "image-to-text" in i2t and ": 30 queries ranked" in i2t


def _register_precision(con, tmp_path, kind, array, item_ids, precision, tag):
    """Register a hand-built set of MODEL recorded with `precision` (register_hand_built records fp32)."""
    from toolkit.store import artifacts

    sid = int(db.get_subset(con, "s30")["subset_id"])
    path = tmp_path / f"{kind}-{tag}.npy"
    cfg = {"kind": kind, "model": MODEL, "precision": precision, "test": tag}
    sha = artifacts.save_array(path, array)
    with db.transaction(con):
        run_id = db.insert_run(con, "embed", cfg, db.now(), model=MODEL)
        return artifacts.register_embedding_set(
            con, kind=kind, subset_id=sid, model=MODEL, pretrained=None, checkpoint_sha256=None,
            precision=precision, config=cfg, path=path, array=array,
            item_ids=np.asarray(item_ids, dtype=np.int64), sha256=sha, run_id=run_id,
        )  # fmt: skip


def test_newest_sets_are_never_of_two_precisions(subset_db, tmp_path):
    """embed fp32, then fp16, then fp32 with --draft-decode (a new image set; the fp32 text set is reused):
    evaluate must pair the newest image set with the fp32 text set, not with the newer fp16 one."""
    con = open_study(subset_db)
    _, img_ids, caps = _members(con)
    cap_ids = caps["caption_id"].to_numpy(np.int64)
    img, rng, d, _ = _embeddings(caps, len(img_ids))
    txt = rng.standard_normal((len(cap_ids), d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    _register_precision(con, tmp_path, "image", img, img_ids, "fp32", "a")
    text32 = _register_precision(con, tmp_path, "text", txt, cap_ids, "fp32", "a")
    _register_precision(con, tmp_path, "image", img[::-1].copy(), img_ids, "fp16", "b")
    _register_precision(con, tmp_path, "text", txt[::-1].copy(), cap_ids, "fp16", "b")
    draft = _register_precision(con, tmp_path, "image", img[:, ::-1].copy(), img_ids, "fp32", "c")
    res = evaluate(con, "s30", model=MODEL, device="cpu")
    used = con.execute(
        "SELECT image_embedding_set_id, text_embedding_set_id FROM retrieval_runs WHERE retrieval_run_id = ?",
        [res.retrieval_run_id],
    ).fetchone()
    assert used == (draft, text32)
    con.close()


def test_architecture_name_with_pretrained_finds_its_quickgelu_sets(subset_db, tmp_path):
    """embed --model ViT-B-32 --pretrained openai records ViT-B-32-quickgelu (OpenAI's weights need QuickGELU);
    evaluate (and clipfail run) with the same options must find those sets."""
    con = open_study(subset_db)
    _make_sets(con, tmp_path, model="ViT-B-32-quickgelu", pretrained="openai")
    res = evaluate(con, "s30", model="ViT-B-32", pretrained="openai", device="cpu")
    assert res.model == "ViT-B-32-quickgelu" and not res.is_noop
    con.close()


def test_recompute_command_keeps_gpu_decode(subset_db, tmp_path):
    """The embed command that evaluate suggests for a damaged set rebuilds it as it was made: a set made with
    --decode gpu has another identity than a --decode cpu one, so the command must say --decode gpu."""

    con = open_study(subset_db)
    sid, img_ids, caps = _members(con)
    img, rng, d, _ = _embeddings(caps, len(img_ids))
    txt = img[np.searchsorted(img_ids, caps["image_id"].to_numpy())]
    for kind, array, ids in (("image", img, img_ids), ("text", txt, caps["caption_id"].to_numpy())):
        cfg = {"kind": kind, "spec": "tiny-clip", "precision": "fp32", "draft": False}
        if kind == "image":
            cfg["decode"] = "gpu"
        register_hand_built(con, tmp_path / f"{kind}.npy", kind, array, ids, sid, model="tiny-clip", config=cfg)
    np.save(tmp_path / "image.npy", img[::-1].copy())  # damaged
    with pytest.raises(UserError, match=r"embed --subset s30 --model tiny-clip --decode gpu --recompute"):
        evaluate(con, "s30", model="tiny-clip", device="cpu")
    con.close()


def test_sets_named_by_id_must_be_of_one_model_and_precision(subset_db, tmp_path):
    """evaluate(embedding_set_ids=...) (the Python API, benchmark, clipfail run) checked kind and subset only:
    an image set of one model and a text set of another were ranked against each other."""
    con = open_study(subset_db)
    _make_sets(con, tmp_path, model="model-a")
    _make_sets(con, tmp_path, model="model-b", seed=2)
    ids = dict(con.execute("SELECT model || '/' || kind, embedding_set_id FROM embedding_sets").fetchall())
    before = _counts(con)
    with pytest.raises(UserError, match=r"image: model-a .*text: model-b .*not made alike"):
        evaluate(con, "s30", device="cpu", embedding_set_ids=(ids["model-a/image"], ids["model-b/text"]))
    assert _counts(con) == before
    res = evaluate(con, "s30", device="cpu", embedding_set_ids=(ids["model-b/image"], ids["model-b/text"]))
    assert res.model == "model-b"
    con.close()


def test_embed_command_in_the_message_can_be_pasted(subset_db, tmp_path):
    """The 'No cached embeddings' message printed --checkpoint and --model unquoted: a path with a space broke it."""
    ckpt = tmp_path / "my weights.pt"
    ckpt.write_bytes(b"not used")
    con = open_study(subset_db)
    with pytest.raises(UserError) as exc:
        evaluate(con, "s30", model="tiny-clip", checkpoint=str(ckpt))
    assert f"--model tiny-clip --checkpoint '{ckpt}'" in str(exc.value)
    con.close()
