"""`clipfail explain`: caption variants (toolkit.labels.ablation) and their ranks, through the CLI on a real database.

The world: a generated COCO subset whose captions are replaced by COCO-like sentences, and a hand-built
bag-of-words "model": a text's embedding is its word-count vector over a fixed vocabulary, an image's an integer
vector (the word counts of its captions plus seeded noise). Every score is then a small integer, exact in float32,
so the expected ranks, ties and top-1 of every variant are computed in numpy bit for bit, and removing a word
changes each image's score by exactly that image's count of the word. The embeddings are not L2-normalised: a
query's ranking does not depend on its norm, and integers keep every score exact.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import query_df, register_hand_built, run_script_forked
from test_annotate import browser, open_page  # noqa: F401  (shared fixture: one headless Chromium)

from toolkit.labels import ablation, phrases
from toolkit.store import db
from toolkit.store.study import open_study

MODEL = "bag-of-words"
SUBJECTS = ["A man", "Two dogs", "A black cat", "Three people", "A red bus", "A woman", "A pair of skis",
            "Several giraffes", "A small boy", "A white horse", "Something", "A plate"]  # fmt: skip
ACTIONS = ["riding a horse", "sitting on the couch", "holding an umbrella", "standing", "eating a pizza", "",
           "walking down the street", "parked"]  # fmt: skip
PLACES = ["on a beach", "in a kitchen", "next to a wooden bench", "under a tree", "in front of a large window", "",
          "on top of a table"]  # fmt: skip
NO_PHRASE = "A view of the sky."  # the extractor finds nothing in it


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        words = [SUBJECTS[rng.integers(len(SUBJECTS))], ACTIONS[rng.integers(len(ACTIONS))],
                 PLACES[rng.integers(len(PLACES))]]  # fmt: skip
        out.append(NO_PHRASE if rng.random() < 0.1 else " ".join(w for w in words if w) + ".")
    return out


VOCAB = sorted(
    {t for s in SUBJECTS + ACTIONS + PLACES + [NO_PHRASE] for t in phrases.tokenize(s)}
    | {ablation.NEUTRAL, ablation.NEUTRAL_PLURAL}
)
INDEX = {w: i for i, w in enumerate(VOCAB)}


def bow(text: str) -> np.ndarray:
    v = np.zeros(len(VOCAB), np.float32)
    for t in phrases.tokenize(text):
        if t in INDEX:
            v[INDEX[t]] += 1
    return v


class BowEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.stack([bow(t) for t in texts])

    @property
    def texts(self) -> list[str]:
        return [t for c in self.calls for t in c]


def _cli(args):
    from click.testing import CliRunner

    from cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, f"{args}: {res.output}\n{res.exception!r}"
    return res


@pytest.fixture(scope="module")
def world(synthetic_coco_master, tmp_path_factory):
    """A database with a failure sample of a text-to-image run ranked with the bag-of-words model."""
    root = tmp_path_factory.mktemp("explain_world")
    path = root / "db" / "base.duckdb"
    path.parent.mkdir()
    _cli(["--db", path, "ingest", "--coco-root", synthetic_coco_master, "--num-images", "40"])
    con = open_study(path)
    ids = [r[0] for r in con.execute("SELECT caption_id FROM captions ORDER BY caption_id").fetchall()]
    con.register("new_texts", pd.DataFrame({"caption_id": ids, "text": captions(len(ids))}))
    con.execute("UPDATE captions SET text = n.text FROM new_texts n WHERE captions.caption_id = n.caption_id")
    con.unregister("new_texts")
    sid = con.execute("SELECT subset_id FROM subsets").fetchall()[0][0]
    caps = con.execute(
        """
        SELECT sc.caption_id, sc.image_id, c.text FROM subset_captions sc
        JOIN subset_images si ON si.subset_id = sc.subset_id AND si.image_id = sc.image_id
        JOIN captions c ON c.caption_id = sc.caption_id
        WHERE sc.subset_id = ? ORDER BY si.position, sc.position
        """,
        [sid],
    ).df()
    image_ids = [
        r[0]
        for r in con.execute(
            "SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]
        ).fetchall()
    ]
    T = np.stack([bow(t) for t in caps["text"]])
    rng = np.random.default_rng(1)
    imgs = np.stack(
        [T[(caps["image_id"] == i).to_numpy()].sum(axis=0) + rng.integers(0, 3, len(VOCAB)) for i in image_ids]
    ).astype(np.float32)
    for kind, arr, item_ids in (("image", imgs, image_ids), ("text", T, caps["caption_id"].tolist())):
        register_hand_built(con, root / f"{kind}.npy", kind, arr, item_ids, sid, model=MODEL, config={"kind": kind})
    con.close()
    _cli(["--db", path, "evaluate", "--model", MODEL, "--device", "cpu"])
    _cli(["--db", path, "sample-failures", "--n", 60, "--overlap", 9, "--per-annotator", 15, "--out", root / "fa",
          "--no-pictures"])  # fmt: skip
    return path


@pytest.fixture
def dbfile(world, tmp_path):
    dest = tmp_path / "db.duckdb"
    shutil.copy(world, dest)
    return dest


@pytest.fixture
def encoder(monkeypatch):
    """The bag-of-words encoder in place of the model that `clipfail explain` would load."""
    from toolkit.improve import stage

    enc = BowEncoder()
    monkeypatch.setattr(stage, "model_encoder_factory", lambda **kw: lambda identity: enc)
    return enc


def q(path, sql, params=None) -> pd.DataFrame:
    return query_df(path, sql, params)


def images_of(path) -> tuple[np.ndarray, np.ndarray]:
    """(image ids in embedding-row order, image matrix) of the retrieval run."""
    from toolkit.store.artifacts import load_embedding_set

    with open_study(path) as con:
        set_id = con.execute("SELECT image_embedding_set_id FROM retrieval_runs").fetchall()[0][0]
        s = load_embedding_set(con, int(set_id))
        return np.asarray(s.item_ids, np.int64), s.array


def expected(scores: np.ndarray, gt: int) -> tuple[int, int, int, float]:
    """(optimistic rank, n_tied, top-1 row (ties: lower row), GT score minus the best other score), in numpy."""
    g = scores[gt]
    others = np.delete(scores, gt)
    return int((scores > g).sum()) + 1, int((scores == g).sum()) - 1, int(np.argmax(scores)), float(g - others.max())


# ------------------------------------------------------------------------------ variants


def test_each_role_gives_one_variant_per_phrase_made_as_documented():
    v = ablation.caption_variants("Two dogs sitting next to a brown couch.")
    assert [(x.role, x.phrase, x.text) for x in v.variants] == [
        ("attribute", "brown couch", "Two dogs sitting next to a couch."),
        ("count", "two dogs", "dogs sitting next to a brown couch."),
        ("relation", "next to a brown couch", "Two dogs sitting."),
        ("action", "sitting next to a brown couch", "Two dogs."),
        ("object", "dogs", "Two things sitting next to a brown couch."),
        ("object", "couch", "Two dogs sitting next to a brown thing."),
    ]
    assert v.n_found == {"attribute": 1, "count": 1, "relation": 1, "action": 1, "object": 2}
    # the article before an edit agrees with the word that now follows it
    assert [x.text for x in ablation.caption_variants("An orange cat", ["attribute"]).variants] == ["A cat"]
    assert [x.text for x in ablation.caption_variants("A man riding an elephant", ["object"]).variants] == [
        "A thing riding an elephant",
        "A man riding a thing",
    ]


def test_empty_variants_and_captions_without_phrases_are_counted_not_kept():
    v = ablation.caption_variants("Walking.")
    assert v.variants == [] and v.n_empty == 1 and v.n_found["action"] == 1
    none = ablation.caption_variants("A view of the sky.")
    assert none.variants == [] and not any(none.n_found.values()) and none.n_empty == none.n_identical == 0
    only = ablation.caption_variants("Two dogs.", ["count", "relation"])
    assert [x.role for x in only.variants] == ["count"] and set(only.n_found) == {"count", "relation"}


def test_attribute_and_count_spans_split_the_modifier_from_its_noun_phrase():
    for text in captions(200) + ["A red and white bus parked on the left", "A cat near two black dogs"]:
        toks = phrases.tokenize(text)
        for s, k, e in phrases.attribute_spans(toks):
            assert s < k < e and all(t in phrases.ATTRIBUTE_WORDS or t in ("and", "or") for t in toks[s:k])
        for s, k, e in phrases.count_spans(toks):
            assert s < k < e and not any(t in phrases.ATTRIBUTE_WORDS for t in toks[s:k])
    toks = phrases.tokenize("A red and white bus near two black dogs")
    assert phrases.attribute_spans(toks) == [(1, 4, 5), (7, 8, 9)] and phrases.count_spans(toks) == [(6, 7, 9)]


def test_the_role_mapping_is_data():
    assert ablation.role_categories() == {
        "attribute": "Attribute", "count": "Count", "relation": "Spatial", "action": "Action", "object": "Object",
    }  # fmt: skip


# ------------------------------------------------------------------------------ the stage, through the CLI


def test_explain_stores_the_ranks_numpy_computes_for_every_variant(dbfile, encoder, run_cli):
    out = run_cli("--db", dbfile, "explain").output
    assert "explained" in out
    rows = q(dbfile, "SELECT * FROM failure_ablations ORDER BY caption_id, variant_index")
    fails = q(
        dbfile,
        """SELECT r.query_id AS caption_id, c.text, r.gt_id, r.gt_rank, r.n_tied, r.gt_score - r.top1_score AS gap
           FROM retrieval_ranks r JOIN captions c ON c.caption_id = r.query_id
           WHERE r.gt_rank > 1 AND r.query_id IN (SELECT caption_id FROM failure_samples) ORDER BY 1""",
    )
    ids, G = images_of(dbfile)
    row_of = {int(i): r for r, i in enumerate(ids)}
    # the variants are exactly toolkit.labels.ablation's, per failure of the sample
    want = [(int(c), v.role, v.phrase, v.text) for c, t in zip(fails["caption_id"], fails["text"])
            for v in ablation.caption_variants(t).variants]  # fmt: skip
    assert list(zip(rows["caption_id"], rows["role"], rows["phrase"], rows["ablated_text"])) == want
    assert len(rows) > 50 and set(rows["role"]) == set(ablation.ROLES)
    by_id = fails.set_index("caption_id")
    n_moved = 0
    for r in rows.itertuples():
        f = by_id.loc[r.caption_id]
        gt = row_of[int(f.gt_id)]
        # a removal changes each image's score by exactly its counts of the removed words (known effect)
        removed = bow(f.text) - bow(r.ablated_text)
        assert np.array_equal(G @ bow(r.ablated_text), G @ bow(f.text) - G @ removed)
        rank, tied, top, gap = expected(G @ bow(r.ablated_text), gt)
        assert (r.gt_rank_after, r.n_tied_after, r.top1_image_id_after) == (rank, tied, ids[top])
        assert r.score_gap_after == pytest.approx(gap, abs=0)
        assert (r.gt_rank_before, r.n_tied_before, r.gt_image_id) == (f.gt_rank, f.n_tied, f.gt_id)
        assert r.score_gap_before == pytest.approx(f.gap, abs=0)
        assert r.category == ablation.role_categories()[r.role] and r.retrieval_run_id == 1
        n_moved += r.gt_rank_after != r.gt_rank_before
    assert n_moved > 10  # the test data has variants that move the ground truth, both ways
    assert (rows["gt_rank_after"] < rows["gt_rank_before"]).any() and (
        rows["gt_rank_after"] > rows["gt_rank_before"]
    ).any()
    # the bookkeeping: each distinct text encoded once; no-phrase failures counted
    assert sorted(encoder.texts) == sorted(set(rows["ablated_text"]))
    er = q(dbfile, "SELECT * FROM explain_runs").iloc[0]
    no_phrase = sum(1 for t in fails["text"] if not any(phrases.extract(t).values()))
    assert no_phrase > 0 and er["n_no_phrase"] == no_phrase and er["n_failures"] == len(fails)
    assert er["n_variants"] == len(rows) and er["n_encoded"] == len(set(rows["ablated_text"]))
    assert f"{no_phrase} caption(s) with no phrase found" in out


def test_every_stored_rank_equals_a_plain_recomputation_through_evaluates_ranking(dbfile, encoder, run_cli):
    from toolkit.retrieval import ranking

    run_cli("--db", dbfile, "explain", "--all-failures")
    rows = q(dbfile, "SELECT * FROM failure_ablations ORDER BY caption_id, variant_index")
    assert q(dbfile, "SELECT scope FROM explain_runs")["scope"].tolist() == ["all-failures"]
    n_failures = q(dbfile, "SELECT count(*) AS n FROM retrieval_ranks WHERE gt_rank > 1")["n"][0]
    assert q(dbfile, "SELECT n_failures FROM explain_runs")["n_failures"][0] == n_failures
    ids, G = images_of(dbfile)
    row_of = {int(i): r for r, i in enumerate(ids)}
    Q = np.stack([bow(t) for t in rows["ablated_text"]])
    res = ranking.rank_text_to_image(Q, G, [row_of[int(i)] for i in rows["gt_image_id"]], k=1, device="cpu")
    assert np.array_equal(res.gt_rank, rows["gt_rank_after"]) and np.array_equal(res.n_tied, rows["n_tied_after"])
    assert np.array_equal(ids[res.topk_indices[:, 0]], rows["top1_image_id_after"])


def test_explain_again_is_a_no_op_and_shares_improves_prompt_cache(dbfile, encoder, run_cli):
    run_cli("--db", dbfile, "explain", "--roles", "attribute")
    first = list(encoder.texts)
    assert first
    out = run_cli("--db", dbfile, "explain", "--roles", "attribute").output
    assert "already explained with these inputs, nothing changed" in out and encoder.texts == first
    assert "variants (stored before)" in out
    assert len(q(dbfile, "SELECT * FROM explain_runs")) == 1
    # all roles: the attribute variants come from the cache (stored as improve's prompt shards), only new texts
    run_cli("--db", dbfile, "explain")
    second = encoder.texts[len(first) :]
    assert second and not set(second) & set(first)
    all_texts = set(q(dbfile, "SELECT ablated_text FROM failure_ablations WHERE explain_run_id = 2")["ablated_text"])
    assert set(first) | set(second) == all_texts
    shards = q(dbfile, "SELECT count(*) AS n FROM embedding_sets WHERE kind = 'prompt'")["n"][0]
    assert shards == 2
    cached = q(dbfile, "SELECT count(*) AS n FROM prompts")["n"][0]
    assert cached == len(all_texts)


def test_a_text_that_improve_encoded_is_not_encoded_again(dbfile, encoder, run_cli):
    from toolkit.improve import stage
    from toolkit.retrieval.explain import explain

    with open_study(dbfile) as con:
        texts = [v.text for t in q(dbfile, "SELECT text FROM captions")["text"]
                 for v in ablation.caption_variants(t, ["count"]).variants][:5]  # fmt: skip
        # as improve's write_prompt_shard stores its prompts
        from types import SimpleNamespace

        from toolkit.improve.methods.prompt_ensemble import PromptMatrix, write_prompt_shard

        text_set = con.execute("SELECT * FROM embedding_sets WHERE kind = 'text'").df().iloc[0].to_dict()
        run = SimpleNamespace(identity=stage.model_identity(text_set), io=SimpleNamespace(cache_dir=None),
                              params=SimpleNamespace(recompute_prompts=False))  # fmt: skip
        with db.transaction(con):
            write_prompt_shard(con, run, PromptMatrix(None, {}, texts, texts, BowEncoder()(texts), [], 0), 1, db.now())
        res = explain(con, 1, roles=["count"], scope="all-failures", encoder=encoder)
    assert res.n_variants > 0 and not set(encoder.texts) & set(texts)
    assert res.n_cached == len(
        set(texts) & set(q(dbfile, "SELECT ablated_text FROM failure_ablations")["ablated_text"])
    )


def test_bad_input_is_refused_with_one_message_and_nothing_written(dbfile, encoder, run_cli, tmp_path):
    res = run_cli("--db", dbfile, "explain", "--roles", "attribute,colour", expect=2)
    assert "Unknown role(s) colour" in res.output and "attribute, count, relation, action, object" in res.output
    assert q(dbfile, "SELECT count(*) AS n FROM failure_ablations")["n"][0] == 0
    # no failure sample: --sample is refused, --all-failures works
    with open_study(dbfile) as con:
        con.execute("DELETE FROM failure_samples")
    res = run_cli("--db", dbfile, "explain", expect=2)
    assert "no sampled failures" in res.output and "--all-failures" in res.output
    # a run without failures
    with open_study(dbfile) as con:
        con.execute("UPDATE retrieval_ranks SET gt_rank = 1")
    res = run_cli("--db", dbfile, "explain", "--all-failures", expect=2)
    assert "has no R@1 failures" in res.output
    assert q(dbfile, "SELECT count(*) AS n FROM explain_runs")["n"][0] == 0 and not encoder.calls


# ------------------------------------------------------------------------------ views


def blame_reference(abl: pd.DataFrame) -> dict[int, tuple]:
    """caption_id -> (blamed role, rank gain, n anchors, anchor role), from failure_ablations in pandas."""
    out = {}
    for cid, g in abl.groupby("caption_id"):
        gain = (g["gt_rank_before"] + g["n_tied_before"]) - (g["gt_rank_after"] + g["n_tied_after"])
        gap = g["score_gap_after"] - g["score_gap_before"]
        rows = sorted(zip(gain, gap, g["variant_index"], g["role"]), key=lambda t: (-t[0], -t[1], t[2]))
        worst = sorted(zip(gain, gap, g["variant_index"], g["role"]), key=lambda t: (t[0], t[1], t[2]))[0]
        best = rows[0]
        out[int(cid)] = (
            best[3] if best[0] > 0 else "none",
            max(int(best[0]), 0),
            int((gain < 0).sum()),
            worst[3] if worst[0] < 0 else None,
        )
    return out


def test_failure_blame_names_the_most_helpful_role_none_and_the_anchors(dbfile, encoder, run_cli):
    run_cli("--db", dbfile, "explain")
    abl = q(dbfile, "SELECT * FROM failure_ablations")
    blame = q(dbfile, "SELECT * FROM failure_blame")
    n_failures = q(dbfile, "SELECT n_failures, n_no_phrase FROM explain_runs").iloc[0]
    assert len(blame) == n_failures["n_failures"]
    assert (blame["blamed_role"] == "no phrase").sum() == n_failures["n_no_phrase"] > 0
    ref = blame_reference(abl)
    got = blame[blame["blamed_role"] != "no phrase"]
    assert {
        int(r.caption_id): (r.blamed_role, int(r.rank_gain), int(r.n_anchors), r.anchor_role if r.n_anchors else None)
        for r in got.itertuples()
    } == ref
    assert {"none", "attribute"} <= set(blame["blamed_role"]) and (blame["n_anchors"] > 0).any()
    mapping = ablation.role_categories()
    for r in got.itertuples():
        want = mapping[r.blamed_role] if r.blamed_role != "none" else None
        assert (None if pd.isna(r.blamed_category) else r.blamed_category) == want


def test_a_replaced_sample_takes_its_explain_runs_with_it(dbfile, encoder, run_cli, tmp_path):
    """The blame views read a sample-scoped explain run against the failure sample: once the sample is drawn anew,
    the old run's results go with it (else the new sample's failures would show as 'no phrase')."""
    run_cli("--db", dbfile, "explain")
    assert len(q(dbfile, "SELECT * FROM failure_ablations")) > 0
    res = run_cli("--db", dbfile, "sample-failures", "--n", 40, "--overlap", 4, "--per-annotator", 12, "--seed", 7,
                  "--out", tmp_path / "fb", "--no-pictures", "--replace")  # fmt: skip
    assert "and the 1 explain run(s) of them: run clipfail explain again" in res.output, res.output
    assert q(dbfile, "SELECT * FROM explain_runs").empty and q(dbfile, "SELECT * FROM failure_ablations").empty
    assert q(dbfile, "SELECT * FROM failure_blame").empty
    encoded = len(encoder.texts)
    run_cli("--db", dbfile, "explain")
    blame = q(dbfile, "SELECT caption_id, blamed_role FROM failure_blame")
    sample = q(dbfile, "SELECT caption_id FROM failure_samples")
    assert sorted(blame["caption_id"]) == sorted(sample["caption_id"]) and len(sample) == 40
    run = q(dbfile, "SELECT n_failures, n_no_phrase, n_encoded FROM explain_runs").iloc[0]
    assert (blame["blamed_role"] == "no phrase").sum() == run["n_no_phrase"] and run["n_failures"] == 40
    assert run["n_encoded"] == len(encoder.texts) - encoded  # texts of the old sample's variants came from the cache


def test_blame_by_category_says_no_labels_then_follows_the_labels(dbfile, encoder, run_cli, world):
    import csv

    run_cli("--db", dbfile, "explain")
    before = q(dbfile, "SELECT * FROM blame_by_category")
    assert set(before["category"]) == {"no labels"} and before["is_match"].isna().all()
    assert before["percent"].notna().all() and before["percent"].sum() == pytest.approx(100, abs=0.05)
    # label annotator A's set (cycling through the categories); the rest stays 'no labels'
    fa = world.parent.parent / "fa"
    with open(fa / "assign_A.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cats = ["Attribute", "Object", "Count", "Action", "Spatial", "Ambiguous", "Context"]
    for i, r in enumerate(rows):
        r["category"] = cats[i % len(cats)]
    labelled = fa.parent / "labelled_A.csv"
    with open(labelled, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run_cli("--db", dbfile, "import-labels", labelled, "--annotator", "A")
    after = q(dbfile, "SELECT * FROM blame_by_category")
    blame = q(dbfile, "SELECT * FROM failure_blame")
    labels = q(dbfile, "SELECT caption_id, category FROM sample_labels")
    ref = blame.merge(labels, on="caption_id", how="left").fillna({"category": "no labels"})
    want = ref.groupby(["category", "blamed_role"]).size().to_dict()
    assert {(r.category, r.blamed_role): r.n for r in after.itertuples()} == want
    for _cat, g in after.groupby("category"):
        assert g["percent"].sum() == pytest.approx(100, abs=0.05) and (g["n_category"] == g["n"].sum()).all()
    mapping = ablation.role_categories()
    for r in after.itertuples():
        expect = (
            None
            if r.category == "no labels" or r.blamed_role in ("none", "no phrase")
            else (mapping[r.blamed_role] == r.category)
        )
        assert (None if pd.isna(r.is_match) else bool(r.is_match)) == expect
    assert len(set(after["category"])) > 2 and after["is_match"].notna().any()


def kappa_reference(pairs: list[tuple[str | None, str]]) -> tuple[int, int, int, float | None]:
    """(n_labelled, n, n_agree, Cohen's kappa) of (blamed category or None, reference category) pairs, in Python."""
    blamed = [(b, h) for b, h in pairs if b is not None]
    n = len(blamed)
    agree = sum(b == h for b, h in blamed)
    if n == 0:
        return len(pairs), 0, 0, None
    cats = {c for p in blamed for c in p}
    p_o = agree / n
    p_e = sum((sum(b == c for b, _ in blamed) / n) * (sum(h == c for _, h in blamed) / n) for c in cats)
    return len(pairs), n, agree, (None if p_e >= 1 else (p_o - p_e) / (1 - p_e))


def test_blame_agreement_against_each_annotator_and_triage(dbfile, encoder, run_cli, world):
    import csv

    run_cli("--db", dbfile, "explain")
    empty = q(dbfile, "SELECT * FROM blame_agreement")
    assert empty["reference"].tolist() == ["no labels"] and empty["n_labelled"].tolist() == [0]
    assert empty[["coverage", "accuracy", "kappa"]].isna().all().all()
    run_cli("--db", dbfile, "triage")
    fa = world.parent.parent / "fa"
    cats = ["Attribute", "Object", "Count", "Action", "Spatial"]
    for name, annotator in (("assign_A.csv", "A"), ("assign_B.csv", "B"), ("assign_overlap.csv", "A")):
        with open(fa / name, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for i, r in enumerate(rows):
            r["category"] = cats[(i + len(annotator)) % len(cats)]
        out = fa.parent / f"{annotator}_{name}"
        with open(out, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        run_cli("--db", dbfile, "import-labels", out, "--annotator", annotator)
    got = q(dbfile, "SELECT * FROM blame_agreement")
    assert got["reference"].tolist() == ["A", "B", "overlap majority", "all labels", "triage"]
    blame = q(dbfile, "SELECT caption_id, blamed_category FROM failure_blame")
    blamed = {int(c): (None if pd.isna(b) else b) for c, b in zip(blame["caption_id"], blame["blamed_category"])}
    refs = {
        "A": q(dbfile, "SELECT s.caption_id, a.category FROM annotations a JOIN failure_samples s USING (sample_id) "
                       "WHERE a.annotator = 'A'"),
        "B": q(dbfile, "SELECT s.caption_id, a.category FROM annotations a JOIN failure_samples s USING (sample_id) "
                       "WHERE a.annotator = 'B'"),
        "overlap majority": q(dbfile, "SELECT caption_id, category FROM sample_labels WHERE is_overlap"),
        "all labels": q(dbfile, "SELECT caption_id, category FROM sample_labels"),
        "triage": q(dbfile, "SELECT caption_id, suggested_category AS category FROM triage_suggestions "
                            "WHERE suggested_category IS NOT NULL"),
    }  # fmt: skip
    for r in got.itertuples():
        ref = refs[r.reference]
        pairs = [(blamed[int(c)], h) for c, h in zip(ref["caption_id"], ref["category"]) if int(c) in blamed]
        n_labelled, n, agree, kappa = kappa_reference(pairs)
        assert (r.n_labelled, r.n, r.n_agree) == (n_labelled, n, agree) and n > 0
        assert r.coverage == pytest.approx(n / n_labelled) and r.accuracy == pytest.approx(agree / n)
        assert (r.kappa is None or pd.isna(r.kappa)) if kappa is None else r.kappa == pytest.approx(kappa)


# ------------------------------------------------------------------------------ the real model path


def test_explain_end_to_end_with_the_tiny_open_clip_model(run_cli, tmp_db, tmp_path, synthetic_coco):
    """run (ingest to sample-failures) with a random tiny open_clip checkpoint, then explain with no encoder
    injected: the model is loaded from what the text embeddings recorded, and every stored rank equals a plain
    recomputation (encode the stored texts with the model, rank with evaluate's ranking)."""
    from toolkit.embed.encode import encode_texts
    from toolkit.embed.models import TINY_CONFIG, load_model, save_random_checkpoint
    from toolkit.retrieval import ranking

    ckpt = tmp_path / "tiny.safetensors"
    save_random_checkpoint(ckpt, spec=TINY_CONFIG, seed=1)
    run_cli("--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 20, "--model", TINY_CONFIG,
            "--checkpoint", ckpt, "--device", "cpu", "--n", 20, "--overlap", 4, "--per-annotator", 8,
            "--annotators", "A,B", "--out", tmp_path / "fa", "--no-pictures")  # fmt: skip
    out = run_cli("--db", tmp_db, "explain", "--checkpoint", ckpt, "--device", "cpu").output
    assert "explained" in out
    rows = q(tmp_db, "SELECT * FROM failure_ablations ORDER BY caption_id, variant_index")
    er = q(tmp_db, "SELECT * FROM explain_runs").iloc[0]
    assert len(rows) == er["n_variants"] > 0 and er["n_failures"] == 20
    texts = sorted(set(rows["ablated_text"]))
    assert er["n_encoded"] == len(texts)
    bundle = load_model(TINY_CONFIG, checkpoint=ckpt, device="cpu")
    vec = dict(zip(texts, encode_texts(bundle, texts)))
    ids, G = images_of(tmp_db)
    row_of = {int(i): r for r, i in enumerate(ids)}
    Q = np.stack([vec[t] for t in rows["ablated_text"]])
    res = ranking.rank_text_to_image(Q, G, [row_of[int(i)] for i in rows["gt_image_id"]], k=1, device="cpu")
    assert np.array_equal(res.gt_rank, rows["gt_rank_after"]) and np.array_equal(res.n_tied, rows["n_tied_after"])
    assert np.array_equal(ids[res.topk_indices[:, 0]], rows["top1_image_id_after"])
    # the variants are prompts of improve's cache now: explain again encodes nothing and writes nothing
    again = run_cli("--db", tmp_db, "explain", "--checkpoint", ckpt, "--device", "cpu").output
    assert "nothing changed" in again and len(q(tmp_db, "SELECT * FROM explain_runs")) == 1
    assert q(tmp_db, "SELECT count(*) AS n FROM prompts")["n"][0] == len(texts)


def test_status_shows_the_explain_run(dbfile, encoder, run_cli):
    run_cli("--db", dbfile, "explain", "--roles", "count,object")
    n = q(dbfile, "SELECT n_variants, n_failures, n_no_phrase FROM explain_runs").iloc[0]
    out = run_cli("--db", dbfile, "status").output
    assert "explain run 1 of retrieval run 1 (sample; count,object)" in out
    assert f"{n['n_variants']} variants of {n['n_failures']} R@1 failures ({n['n_no_phrase']} with no phrase)" in out


def test_a_failure_while_writing_leaves_no_result_and_keeps_the_prompt_cache(dbfile, encoder, monkeypatch):
    from toolkit.retrieval import explain as stage

    def boom(con, table, df):
        if table == "failure_ablations":
            raise RuntimeError("killed while writing")
        return real(con, table, df)

    real = stage.db.insert_df
    monkeypatch.setattr(stage.db, "insert_df", boom)
    before = {t: q(dbfile, f"SELECT count(*) AS n FROM {t}")["n"][0] for t in ("runs", "prompts", "embedding_sets")}
    with open_study(dbfile) as con, pytest.raises(RuntimeError, match="killed while writing"):
        stage.explain(con, encoder=encoder)
    assert encoder.calls  # it got as far as encoding
    after = {t: q(dbfile, f"SELECT count(*) AS n FROM {t}")["n"][0] for t in ("runs", "prompts", "embedding_sets")}
    # the results are not written; the prompt cache keeps what was encoded (a cache chunk each: runs row, shard)
    n_chunks = len(encoder.calls)
    assert after == {"runs": before["runs"] + n_chunks, "prompts": before["prompts"] + len(encoder.texts),
                     "embedding_sets": before["embedding_sets"] + n_chunks}  # fmt: skip
    assert q(dbfile, "SELECT count(*) AS n FROM explain_runs")["n"][0] == 0
    assert q(dbfile, "SELECT count(*) AS n FROM failure_ablations")["n"][0] == 0
    assert q(dbfile, "SELECT stage FROM runs WHERE stage = 'explain'").empty


# ------------------------------------------------------------------------------ killed halfway, then resumed

KILLER = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import test_explain as T
from toolkit.improve import stage
from toolkit.retrieval import explain as E, ranking
E.CHUNK_TEXTS = int(sys.argv[2])
log, at = sys.argv[3], sys.argv[4]
calls = []
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def encode(texts):
    calls.append(list(texts))
    if at == "encoding" and len(calls) == 2:  # the first chunk is encoded and committed: die encoding the second
        die()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(list(texts)) + "\\n")
    return T.BowEncoder()(texts)
stage.model_encoder_factory = lambda **kw: lambda identity: encode
rank = ranking.rank_text_to_image
def rank_then_die(*a, **kw):  # every chunk is encoded: die while ranking
    die() if at == "ranking" else None
    return rank(*a, **kw)
ranking.rank_text_to_image = rank_then_die
insert_df = E.db.insert_df
def insert_then_die(con, table, df):  # die inside the results' transaction, the ablation rows half written
    out = insert_df(con, table, df)
    die() if at == "writing" and table == "failure_ablations" else None
    return out
E.db.insert_df = insert_then_die
from cli import cli
cli.main(sys.argv[5:], standalone_mode=True)
"""


def _killed_explain(dbfile, tmp_path, chunk: int, at: str) -> list[str]:
    """`clipfail explain` on `dbfile` in a forked copy of this process (helpers.run_script_forked), SIGKILLed `at`
    a point; the texts it encoded."""
    import json
    import signal
    from pathlib import Path

    tests = Path(__file__).parent
    log = tmp_path / f"encoded-{at}.jsonl"
    returncode, output = run_script_forked(KILLER, [tests, chunk, log, at, "--db", dbfile, "explain"])
    assert returncode == -signal.SIGKILL, output
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return [t for line in lines for t in json.loads(line)]


def test_killed_after_its_first_chunk_explain_resumes_without_encoding_anything_twice(
    dbfile, encoder, run_cli, tmp_path, monkeypatch
):
    from toolkit.retrieval import explain as stage

    chunk = 20
    monkeypatch.setattr(stage, "CHUNK_TEXTS", chunk)
    clean = tmp_path / "clean.duckdb"
    shutil.copy(dbfile, clean)
    run_cli("--db", clean, "explain")  # the uninterrupted run, in chunks of 20
    uninterrupted = list(encoder.texts)
    assert len(uninterrupted) > 3 * chunk and all(len(c) <= chunk for c in encoder.calls)

    first = _killed_explain(dbfile, tmp_path, chunk, "encoding")
    assert len(first) == chunk
    # the first chunk is in the prompt cache; no result was written
    assert q(dbfile, "SELECT count(*) AS n FROM prompts")["n"][0] == chunk
    assert q(dbfile, "SELECT count(*) AS n FROM explain_runs")["n"][0] == 0
    assert q(dbfile, "SELECT count(*) AS n FROM failure_ablations")["n"][0] == 0
    assert q(dbfile, "SELECT stage FROM runs WHERE stage LIKE 'explain%'")["stage"].tolist() == [stage.CACHE_STAGE]

    out = run_cli("--db", dbfile, "explain").output
    resumed = encoder.texts[len(uninterrupted) :]
    assert not set(resumed) & set(first) and sorted(first + resumed) == sorted(uninterrupted)
    assert f"{len(resumed):,} texts encoded now, {chunk:,} from the cache" in out
    cols = "* EXCLUDE (explain_run_id)"
    a = q(clean, f"SELECT {cols} FROM failure_ablations ORDER BY caption_id, variant_index")
    b = q(dbfile, f"SELECT {cols} FROM failure_ablations ORDER BY caption_id, variant_index")
    pd.testing.assert_frame_equal(a, b)
    ea = q(clean, "SELECT * EXCLUDE (explain_run_id, created_at, run_id, n_encoded) FROM explain_runs")
    eb = q(dbfile, "SELECT * EXCLUDE (explain_run_id, created_at, run_id, n_encoded) FROM explain_runs")
    pd.testing.assert_frame_equal(ea, eb)
    assert q(dbfile, "SELECT n_encoded FROM explain_runs")["n_encoded"][0] == len(resumed)
    texts = sorted(set(b["ablated_text"]))
    for path in (clean, dbfile):
        assert sorted(q(path, "SELECT text FROM prompts")["text"]) == texts  # each text cached once
        shards = q(path, "SELECT sum(rows) AS n FROM embedding_sets WHERE kind = 'prompt'")["n"][0]
        assert shards == len(texts)


def test_killed_after_encoding_explain_resumes_encoding_nothing_and_stores_what_an_uninterrupted_run_does(
    dbfile, encoder, run_cli, tmp_path, monkeypatch
):
    """Every chunk, the last one included, is in the prompt cache before ranking starts: a kill while ranking, or
    inside the results' transaction, costs no encoding on the rerun."""
    from toolkit.retrieval import explain as stage

    chunk = 20
    monkeypatch.setattr(stage, "CHUNK_TEXTS", chunk)
    clean = tmp_path / "clean.duckdb"
    shutil.copy(dbfile, clean)
    run_cli("--db", clean, "explain")  # the uninterrupted run, in chunks of 20
    uninterrupted, n_chunks = list(encoder.texts), len(encoder.calls)
    assert n_chunks > 3 and len(uninterrupted) % chunk  # a last chunk shorter than the rest

    encoded = _killed_explain(dbfile, tmp_path, chunk, "ranking")
    assert sorted(encoded) == sorted(uninterrupted)  # it got past encoding, the last chunk included
    assert _killed_explain(dbfile, tmp_path, chunk, "writing") == []  # killed again, in the results' transaction
    assert sorted(q(dbfile, "SELECT text FROM prompts")["text"]) == sorted(uninterrupted)  # every chunk cached
    assert q(dbfile, "SELECT count(*) AS n FROM explain_runs")["n"][0] == 0
    assert q(dbfile, "SELECT count(*) AS n FROM failure_ablations")["n"][0] == 0
    stages = q(dbfile, "SELECT stage FROM runs WHERE stage LIKE 'explain%'")["stage"].tolist()
    assert stages == [stage.CACHE_STAGE] * n_chunks

    out = run_cli("--db", dbfile, "explain").output
    assert encoder.texts == uninterrupted  # the rerun encoded nothing
    assert f"0 texts encoded now, {len(uninterrupted):,} from the cache" in out
    cols = "* EXCLUDE (explain_run_id)"
    a = q(clean, f"SELECT {cols} FROM failure_ablations ORDER BY caption_id, variant_index")
    b = q(dbfile, f"SELECT {cols} FROM failure_ablations ORDER BY caption_id, variant_index")
    pd.testing.assert_frame_equal(a, b)
    ea = q(clean, "SELECT * EXCLUDE (explain_run_id, created_at, run_id, n_encoded) FROM explain_runs")
    eb = q(dbfile, "SELECT * EXCLUDE (explain_run_id, created_at, run_id, n_encoded) FROM explain_runs")
    pd.testing.assert_frame_equal(ea, eb)
    assert q(dbfile, "SELECT n_encoded FROM explain_runs")["n_encoded"][0] == 0
    for path in (clean, dbfile):
        assert q(path, "SELECT count(*) AS n FROM prompts")["n"][0] == len(uninterrupted)  # each text cached once
        shards = q(path, "SELECT count(*) AS k, sum(rows) AS n FROM embedding_sets WHERE kind = 'prompt'").iloc[0]
        assert (shards["k"], shards["n"]) == (n_chunks, len(uninterrupted))


# ------------------------------------------------------------------------------ triage uses the blame


def test_triage_gives_the_blamed_phrase_as_evidence_and_fires_only_when_it_moves_the_ground_truth(
    dbfile, encoder, run_cli
):
    from toolkit.labels import triage

    run_cli("--db", dbfile, "triage")
    without = q(dbfile, "SELECT * FROM triage_suggestions WHERE triage_run_id = 1").set_index("caption_id")
    assert without["blame_evidence"].isna().all()
    run_cli("--db", dbfile, "explain")
    run_cli("--db", dbfile, "triage")  # a new explain run is a new input: a new triage run
    run_cli("--db", dbfile, "triage")  # ... and the same again changes nothing
    assert q(dbfile, "SELECT triage_run_id FROM triage_runs")["triage_run_id"].tolist() == [1, 2]
    got = q(dbfile, "SELECT * FROM triage_suggestions WHERE triage_run_id = 2").set_index("caption_id")
    blame = q(dbfile, "SELECT * FROM failure_blame").set_index("caption_id")
    assert sorted(got.index) == sorted(without.index)
    n_decided = n_kept = 0
    for cid, g in got.iterrows():
        old = without.loc[cid]
        b = blame.loc[cid] if cid in blame.index else None
        moves = b is not None and b["rank_gain"] >= 1
        instance = any(c in str(old["rules_fired"]).split(",") for c in ("Object", "Count", "Spatial"))
        if moves:
            assert b["blamed_category"] == ablation.role_categories()[b["blamed_role"]]
            assert g["blame_evidence"] == (
                f"the model hangs on the {b['blamed_role']} '{b['blamed_phrase']}': without it the ground truth "
                f"moves from rank {b['gt_rank_before_pessimistic']} to {b['gt_rank_after_pessimistic']} "
                "(explain run 1)"
            )
            assert b["blamed_category"] in g["rules_fired"].split(",")
        else:  # no explain row, 'none' or 'no phrase': no blame evidence, the suggestion as before
            assert pd.isna(g["blame_evidence"])
        if moves and not instance:
            n_decided += 1
            assert (g["suggested_category"], g["score"]) == (b["blamed_category"], triage.BLAME_SCORE)
            assert g["evidence"].startswith(f"{b['blamed_category']}: {g['blame_evidence']}")  # then any hub note
        else:
            n_kept += 1
            assert g["evidence"] == old["evidence"]
            assert g[["suggested_category"]].fillna("-").tolist() == old[["suggested_category"]].fillna("-").tolist()
    assert n_decided > 5 and n_kept > 5
    assert ((blame["rank_gain"] == 0) & (blame["blamed_role"] == "none")).any()  # 'none' exists, and never fires


# ------------------------------------------------------------------------------ the report section


def test_report_section_what_the_model_hangs_on(dbfile, encoder, run_cli, tmp_path):
    import html

    from toolkit.report.page import write_report

    run_cli("--db", dbfile, "report", "--out", tmp_path / "r0", "--no-figures")
    page = (tmp_path / "r0" / "report.html").read_text(encoding="utf-8")
    assert "11. What the model hangs on" in page and "No explain run yet. Run: clipfail explain" in page
    run_cli("--db", dbfile, "explain")
    ex = q(dbfile, "SELECT * FROM blame_examples WHERE example_order <= 10 ORDER BY example_order, variant_index")
    assert ex["example_order"].nunique() == 10
    # the caption is read from the view when the page is made, and escaped
    with open_study(dbfile) as con:
        con.execute("UPDATE captions SET text = text || ' <script>x</script> & co' WHERE caption_id = ?",
                    [int(ex["caption_id"][0])])  # fmt: skip
    with open_study(dbfile) as con:
        rep = write_report(con, tmp_path / "r1", notes=["DEMO: a random model."])
    page = (tmp_path / "r1" / "report.html").read_text(encoding="utf-8")
    assert "No explain run yet" not in page and "explain: clipfail explain" not in rep.missing
    assert "Made with the model of this report: DEMO: a random model." in page
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt; &amp; co" in page
    # every phrase of the ten examples, with its rank gain from the view
    for r in ex.itertuples():
        assert f"{html.escape(r.role)}: {html.escape(r.phrase)} {int(r.rank_gain):+d}</span>" in page
    blamed = ex[ex["blamed_role"] != "none"].iloc[0]
    assert f"{blamed['blamed_role']} '{html.escape(blamed['blamed_phrase'])}' (+{blamed['blame_rank_gain']})" in page
    assert (ex["rank_gain"] > 0).any() and (ex["rank_gain"] < 0).any()  # both shades are shown
    assert "rgba(46,139,87," in page and "rgba(192,57,43," in page
    # the tables are the views' rows; the figures are written
    by_cat = pd.read_csv(tmp_path / "r1" / "tables" / "blame_by_category.csv")
    assert len(by_cat) == len(q(dbfile, "SELECT * FROM blame_by_category")) > 0
    agree = pd.read_csv(tmp_path / "r1" / "tables" / "blame_agreement.csv")
    assert agree["reference"].tolist() == q(dbfile, "SELECT reference FROM blame_agreement")["reference"].tolist()
    names = {p.name for p in rep.figures}
    assert any(n.endswith("_blame.png") for n in names) and any(n.endswith("_blame_examples.png") for n in names)


# ------------------------------------------------------------------------------ the workbench hint


def test_the_workbench_shows_the_blamed_phrase_as_a_hint_never_on_overlap_unless_asked(dbfile, encoder, run_cli):
    from toolkit.labels import workbench

    wb = workbench.prepare(dbfile, ["A"])
    assert [it["blame"] for it in wb.items["A"]] == [None] * len(wb.items["A"])  # no explain run: no hint
    run_cli("--db", dbfile, "explain")
    blame = q(dbfile, "SELECT * FROM failure_blame").set_index("caption_id")
    for flag in (False, True):
        items = workbench.prepare(dbfile, ["A"], show_suggestions_on_overlap=flag).items["A"]
        for it in items:
            b = blame.loc[it["caption_id"]] if it["caption_id"] in blame.index else None
            shown = b is not None and b["rank_gain"] > 0 and (flag or it["set_name"] != "overlap")
            if not shown:
                assert it["blame"] is None
                continue
            assert it["blame"] == {
                "role": b["blamed_role"], "phrase": b["blamed_phrase"], "category": b["blamed_category"],
                "text": f"the model hangs on the {b['blamed_role']} '{b['blamed_phrase']}': without it the ground "
                f"truth moves from rank {b['gt_rank_before_pessimistic']} to {b['gt_rank_after_pessimistic']} "
                "(clipfail explain, run 1)",
            }  # fmt: skip
        on_overlap = [it["blame"] for it in items if it["set_name"] == "overlap"]
        assert any(on_overlap) is flag and any(it["blame"] for it in items if it["set_name"] == "A")
    # a hint, never a label: nothing was saved
    assert q(dbfile, "SELECT count(*) AS n FROM annotations")["n"][0] == 0
    page = (workbench.Path(workbench.__file__).parent.parent / "data" / "annotate.html").read_text(encoding="utf-8")
    assert '$("blame").textContent = bl ?' in page  # shown as text (never as HTML), and no button is marked


def test_the_page_shows_the_model_hint_selects_nothing_and_hides_it_on_overlap_unless_asked(
    dbfile,
    encoder,
    run_cli,
    browser,  # noqa: F811  (test_annotate's fixture)
):
    """In real Chromium: the hint line is the failure_blame row's, no category is selected or marked by it, and
    overlap items show it only with --show-suggestions-on-overlap."""
    from toolkit.labels import workbench

    run_cli("--db", dbfile, "explain")
    blame = q(dbfile, "SELECT * FROM failure_blame WHERE rank_gain > 0").set_index("caption_id")
    assert q(dbfile, "SELECT count(*) AS n FROM triage_runs")["n"][0] == 0  # no triage: no button is marked at all

    def hint(cid: int) -> str:
        b = blame.loc[cid]
        return (
            f"Model hint (clipfail explain, check it): the model hangs on the {b['blamed_role']} "
            f"'{b['blamed_phrase']}': without it the ground truth moves from rank {b['gt_rank_before_pessimistic']} "
            f"to {b['gt_rank_after_pessimistic']} (clipfail explain, run 1)"
        )

    def nothing_selected(page, n_items: int) -> bool:
        return (
            page.locator("button[data-cat].on, button[data-sec].on, button.suggested").count() == 0
            and page.get_attribute("body", "data-labelled") == ""
            and page.inner_text("#count") == f"0 / {n_items} labelled"
            and page.input_value("#notes") == ""
        )

    for flag in (False, True):
        wb = workbench.prepare(dbfile, ["A"], show_suggestions_on_overlap=flag)
        run = workbench.serve_in_thread(wb, workbench.bind("127.0.0.1", 0))
        try:
            items = run.wb.items["A"]
            own = next(i for i, it in enumerate(items) if it["set_name"] == "A" and it["caption_id"] in blame.index)
            overlap = next(
                i for i, it in enumerate(items) if it["set_name"] == "overlap" and it["caption_id"] in blame.index
            )
            page = open_page(browser, f"{run.url}/a/A/")
            page.evaluate(f"show({own})")
            assert page.locator("#blame").is_visible()
            assert page.inner_text("#blame") == hint(items[own]["caption_id"])
            assert nothing_selected(page, len(items))
            page.evaluate(f"show({overlap})")
            assert page.locator("#blame").is_visible() is flag
            assert page.inner_text("#blame") == (hint(items[overlap]["caption_id"]) if flag else "")
            assert nothing_selected(page, len(items))
            page.close()
        finally:
            run.stop()
    assert q(dbfile, "SELECT count(*) AS n FROM annotations")["n"][0] == 0  # a hint, never a label
