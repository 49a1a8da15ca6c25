"""The improve stage through its toolkit function and the CLI, on a real database.

The world: a generated COCO subset (ingest), hand-built embeddings registered as embedding sets
(a fake text encoder: a seeded random unit vector per text, images near the mean of their
captions), the real `evaluate`, `sample-failures` and `import-labels` commands, then `improve`
with the same fake encoder for new prompts (its calls are counted).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from toolkit import stats
from toolkit.improve import pooling
from toolkit.labels import phrases
from toolkit.store import db, paths
from toolkit.store.study import open_study

imp = importlib.import_module("toolkit.improve.stage")

D = 16
MODEL = "fake-16"
CATS = ["Object", "Attribute", "Count", "Ambiguous", "Action", "Spatial", "Context"]
SUBJECTS = [
    "A man",
    "Two dogs",
    "A black cat",
    "Three people",
    "A red bus",
    "A woman",
    "A pair of skis",
    "Several giraffes",
    "A small boy",
    "A white horse",
    "Something",
    "A plate",
]
ACTIONS = [
    "riding a horse",
    "sitting on the couch",
    "holding an umbrella",
    "standing",
    "eating a pizza",
    "",
    "walking down the street",
    "parked",
]
PLACES = ["on a beach", "in a kitchen", "next to a wooden bench", "under a tree", "in front of a large window", "",
          "on top of a table"]  # fmt: skip


def coco_like_captions(n: int) -> list[str]:
    """COCO-like captions that exercise every slot (and some that have none)."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        words = [SUBJECTS[rng.integers(len(SUBJECTS))], ACTIONS[rng.integers(len(ACTIONS))],
                 PLACES[rng.integers(len(PLACES))]]  # fmt: skip
        out.append(" ".join(w for w in words if w) + ".")
    return out


def fake_vec(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(D)
    return (v / np.linalg.norm(v)).astype(np.float32)


class FakeEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.stack([fake_vec(t) for t in texts]) if texts else np.zeros((0, D), np.float32)

    @property
    def n_texts(self):
        return sum(len(c) for c in self.calls)


def _cli(args):
    from click.testing import CliRunner

    from cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, f"{args}: {res.output}\n{res.exception!r}"
    return res


@pytest.fixture(scope="module")
def world(synthetic_coco_master, tmp_path_factory):
    """Path of a database with a labelled failure sample of a text-to-image retrieval run."""
    from toolkit.store.artifacts import register_embedding_set, save_array

    root = tmp_path_factory.mktemp("improve_world")
    path = root / "db" / "base.duckdb"  # the .npy files lie outside its folder: stored absolute, so copies share them
    path.parent.mkdir()
    _cli(["--db", path, "ingest", "--coco-root", synthetic_coco_master, "--num-images", "40"])
    con = open_study(path)
    ids = [r[0] for r in con.execute("SELECT caption_id FROM captions ORDER BY caption_id").fetchall()]
    con.register("new_texts", pd.DataFrame({"caption_id": ids, "text": coco_like_captions(len(ids))}))
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
    T = np.stack([fake_vec(t) for t in caps["text"]])
    rng = np.random.default_rng(0)
    img = []
    for iid in image_ids:
        v = T[(caps["image_id"] == iid).to_numpy()].mean(axis=0) + 0.2 * rng.standard_normal(D)
        img.append(v / np.linalg.norm(v))
    imgs = np.stack(img).astype(np.float32)
    with db.transaction(con):
        run_id = db.insert_run(con, "embed", {"test": "hand-built"}, db.now(), model=MODEL)
        for kind, arr, ids in (("image", imgs, image_ids), ("text", T, caps["caption_id"].tolist())):
            f = root / f"{kind}.npy"
            register_embedding_set(
                con, kind=kind, subset_id=sid, model=MODEL, pretrained=None, checkpoint_sha256=None,
                precision="fp32", config={"kind": kind}, path=f, array=arr, item_ids=ids,
                sha256=save_array(f, arr), run_id=run_id,
            )  # fmt: skip
    con.close()
    # pinned to the cpu: the tests below compare scores bit for bit, and improve re-scores on the device type
    # that evaluate recorded (test_improve_follows_the_retrieval_runs_device covers the others)
    _cli(["--db", path, "evaluate", "--model", MODEL, "--device", "cpu"])
    out = root / "fa"
    _cli(["--db", path, "sample-failures", "--n", 60, "--overlap", 9, "--per-annotator", 15, "--out", out,
          "--no-pictures"])  # fmt: skip
    # labels: cycle through the categories; the overlap file is labelled identically by A, B and C
    k = 0
    for name in ["assign_A.csv", "assign_B.csv", "assign_C.csv", "assign_overlap.csv"]:
        with open(out / name, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            r["category"] = CATS[k % len(CATS)]
            k += 1
        with open(out / name, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    _cli(["--db", path, "import-labels", out / "assign_A.csv", out / "assign_B.csv", out / "assign_C.csv"])
    for a in "ABC":
        _cli(["--db", path, "import-labels", out / "assign_overlap.csv", "--annotator", a])
    return path


@pytest.fixture
def dbfile(world, tmp_path):
    dest = tmp_path / "db.duckdb"
    shutil.copy(world, dest)
    return dest


@pytest.fixture
def con(dbfile):
    """One open connection to a private copy of the world (for tests that do not run the CLI)."""
    c = open_study(dbfile)
    yield c
    c.close()


class Opened:
    """A database path or an open connection, used as a connection (opened and closed only for a path)."""

    def __init__(self, target):
        self.target = target
        self.con = None

    def __enter__(self):
        if isinstance(target := self.target, (str, Path)):
            self.con = open_study(target)
            return self.con
        return target

    def __exit__(self, *exc):
        if self.con is not None:
            self.con.close()


def q(target, sql, params=None):
    with Opened(target) as con:
        return con.execute(sql, params or []).df()


def run_improve(target, categories="Object", encoder=None, **kw):
    with Opened(target) as con:
        cache = paths.prompt_cache_dir(con)
        return imp.improve(con, categories, encoder=encoder or FakeEncoder(), cache_dir=cache, **kw)


def snapshot(target):
    tables = ["runs", "improvement_runs", "improvement_ranks", "improvement_stats", "prompts", "embedding_sets"]
    with Opened(target) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").df() for t in tables}


def assert_unchanged(path, before):
    after = snapshot(path)
    for t in before:
        pd.testing.assert_frame_equal(before[t], after[t], obj=t)


def test_world_is_not_trivial(world):
    labels = q(world, "SELECT category, count(*) AS n FROM sample_labels WHERE NOT is_overlap GROUP BY 1")
    n = dict(zip(labels["category"], labels["n"]))
    assert n["Object"] >= 5 and n["Attribute"] >= 5 and n["Count"] >= 5
    succ = q(world, "SELECT count(*) AS n FROM retrieval_ranks WHERE gt_rank = 1")["n"][0]
    assert succ >= 10


# ------------------------------------------------------------------------------------------------


def reference_prompts(caption, templates, k):
    """The documented rule, written plainly: the caption, then each template's text unless a slot is empty or
    the text (case and white space aside) was already taken, cut at k. `phrases.fill` gives the caption
    itself for a template with an empty slot, which the duplicate check then drops."""
    out = []
    for t in ["{caption}", *templates]:
        text = phrases.fill(t, caption)
        if " ".join(text.split()).lower() not in [" ".join(o.split()).lower() for o in out]:
            out.append(text)
    return out[:k]


def reference_ranks(target, res, pooling_name, tau=1.0, mode="own", categories=("Object",), k=10):
    """Plain recomputation: prompts by the rule above, fake embeddings, float64 scores, pooled by loops."""
    with Opened(target) as con:
        imp_id = con.execute(
            "SELECT improvement_id FROM improvement_runs WHERE list_contains(?, improvement_id) AND pooling = ? "
            "AND population = 'failures'",
            [res.improvement_ids, pooling_name],
        ).fetchone()[0]
        rows = con.execute(
            "SELECT r.*, c.text, c.image_id FROM improvement_ranks r JOIN captions c USING (caption_id) "
            "WHERE improvement_id = ? ORDER BY caption_id",
            [imp_id],
        ).df()
        rr = con.execute("SELECT * FROM retrieval_runs WHERE retrieval_run_id = ?", [res.retrieval_run_id]).df()
        from toolkit.store.artifacts import load_embedding_set

        images = load_embedding_set(con, int(rr["image_embedding_set_id"][0]))
        tdf = con.execute("SELECT * FROM prompt_templates WHERE template_set = 'default-v2' ORDER BY position").df()
    gallery = images.array.astype(np.float64)
    col = {int(i): j for j, i in enumerate(images.item_ids)}
    union = list(dict.fromkeys(t for c in categories for t in tdf[tdf["category"] == c]["template"]))
    want = []
    for r in rows.itertuples():
        tl = list(tdf[tdf["category"] == r.category]["template"]) if mode == "own" else union
        prompts = reference_prompts(r.text, tl, k)
        assert r.n_prompts == r.n_distinct_prompts == len(prompts)
        P = np.stack([fake_vec(t) for t in prompts]).astype(np.float64)
        S = P @ gallery.T
        pooled = []
        for j in range(S.shape[1]):
            s = [float(x) for x in S[:, j]]
            if pooling_name == "max":
                pooled.append(max(s))
            elif pooling_name == "mean":
                pooled.append(math.fsum(s) / len(s))
            else:
                m = max(s)
                pooled.append(m + tau * math.log(math.fsum(math.exp((x - m) / tau) for x in s) / len(s)))
        g = pooled[col[int(r.image_id)]]
        want.append(1 + sum(p > g for p in pooled))
        assert r.improved_n_tied == sum(p == g for p in pooled) - 1  # the other images with the GT's score
    return rows, np.array(want)


@pytest.mark.parametrize("mode", ["own", "union"])
def test_pooled_ranks_equal_a_reference_computation(con, mode):
    cats = ("Object", "Count")
    res = run_improve(con, ",".join(cats), poolings="all", tau=0.2, template_mode=mode)
    assert len(res.improvement_ids) == 3
    for p in pooling.POOLINGS:
        rows, want = reference_ranks(con, res, p, tau=0.2, mode=mode, categories=cats)
        assert np.array_equal(rows["improved_rank"].to_numpy(), want), p
        assert set(rows["category"]) == set(cats)
    # the baseline is the retrieval run's own rank
    base = q(
        con,
        "SELECT r.caption_id, r.baseline_rank, rr.gt_rank, r.baseline_n_tied, rr.n_tied FROM improvement_ranks r "
        "JOIN retrieval_ranks rr "
        "ON rr.query_id = r.caption_id AND rr.retrieval_run_id = ? WHERE improvement_id = ?",
        [res.retrieval_run_id, res.improvement_ids[0]],
    )
    assert (base["baseline_rank"] == base["gt_rank"]).all() and (base["gt_rank"] > 1).all()
    assert (base["baseline_n_tied"] == base["n_tied"]).all()
    k = q(con, "SELECT DISTINCT k_per_category, k_prompts FROM improvement_runs")
    assert k.values.tolist() == [['{"Object": 10, "Count": 10}', 10]]


def _set_templates(target, name, per_cat):
    with Opened(target) as con:
        rows = [(name, c, i, t) for c, ts in per_cat.items() for i, t in enumerate(ts)]
        df = pd.DataFrame(rows, columns=["template_set", "category", "position", "template"])
        db.insert_df(con, "prompt_templates", df)


@pytest.mark.parametrize(
    "templates,k",
    [
        (["{caption}"], 1),  # identity only: K=1 is the baseline itself
        (["{caption}", "{count} zzz qqq"], 2),  # one real template: only the captions with a count change
    ],
)
def test_identity_templates_reproduce_the_baseline_ranks(con, templates, k):
    _set_templates(con, "ident", {"Object": templates, "Attribute": templates, "Count": templates})
    enc = FakeEncoder()
    res = run_improve(con, "Object,Attribute,Count", encoder=enc, poolings="all", tau=0.05, template_set="ident",
                      control="all", k=k)  # fmt: skip
    ranks = q(con, "SELECT r.*, c.text FROM improvement_ranks r JOIN captions c USING (caption_id)")
    assert len(ranks) == 3 * (res.populations["failures"] + res.populations["all"])
    has_count = ranks["text"].map(lambda t: bool(phrases.extract(t)["count"]))
    if k == 1:
        assert enc.calls == [] and (ranks["n_prompts"] == 1).all()  # every prompt is the caption: nothing encoded
    else:
        # the template applies exactly where a count is found, and only there the caption gets a second prompt
        assert (ranks["n_prompts"] == np.where(has_count, 2, 1)).all()
        assert sorted(enc.calls[0]) == sorted(
            {phrases.extract(t)["count"] + " zzz qqq" for t in ranks["text"][has_count]}
        )
        mean_ids = q(con, "SELECT improvement_id FROM improvement_runs WHERE pooling = 'mean'")["improvement_id"]
        changed = ranks[has_count & ranks["improvement_id"].isin(mean_ids)]
        changed = changed.merge(q(con, "SELECT query_id AS caption_id, gt_score FROM retrieval_ranks"))
        assert len(changed) > 5 and (changed["improved_score"] != changed["gt_score"].astype(np.float64)).all()
        # the distribution of effective K per run and category, as the view gives it
        view = q(con, "SELECT * FROM improvement_effective_k")
        want = (
            ranks.assign(effective_k=ranks["n_prompts"])
            .groupby(["improvement_id", "category", "effective_k"], dropna=False)
            .size()
        )
        got = view.set_index(["improvement_id", "category", "effective_k"])["n_captions"]
        assert got.sort_index().to_dict() == want.sort_index().to_dict()
        assert (view["k_prompts"] == 2).all() and (view["is_below_k"] == (view["effective_k"] < 2)).all()
        assert (view["n_with_repeats"] == 0).all()
        share = view.groupby(["improvement_id", "category"], dropna=False)["pct_of_category"].sum()
        assert np.allclose(share, 100, atol=0.02)
        ranks = ranks[~has_count]
        assert len(ranks) > 10
    assert (ranks["n_distinct_prompts"] == ranks["n_prompts"]).all()
    assert (ranks["improved_rank"] == ranks["baseline_rank"]).all()
    # scores, not just ranks: the pooled GT score is the retrieval run's GT score, bit for bit
    gt = q(con, "SELECT query_id AS caption_id, gt_score FROM retrieval_ranks")
    m = ranks.merge(gt, on="caption_id")
    assert np.array_equal(m["improved_score"].to_numpy(), m["gt_score"].to_numpy(np.float64))


@pytest.mark.parametrize(
    "templates",
    [
        ["{caption}", "  {caption}", "{caption}  "],  # copies of the caption (white space aside)
        ["{caption}", "{caption_lc}."],  # the caption with a lower-case first letter: the same input to CLIP
    ],
)
def test_a_set_that_gives_no_prompt_besides_the_caption_is_refused_before_encoding(con, templates):
    _set_templates(con, "empty", {"Spatial": templates})
    before = snapshot(con)
    enc = FakeEncoder()
    from toolkit.errors import UserError

    with pytest.raises(UserError, match="gives none of the .* captions of the subset a prompt other than the caption"):
        run_improve(con, "Spatial", encoder=enc, template_set="empty", k=2)
    assert enc.calls == []
    assert_unchanged(con, before)


def test_another_pooling_or_tau_encodes_nothing(con):
    enc = FakeEncoder()
    r1 = run_improve(con, "Object,Attribute", encoder=enc, poolings="max")
    first = enc.n_texts
    assert first > 0 and len(enc.calls) == 1 and r1.n_encoded == first
    assert len(set(enc.calls[0])) == first  # each distinct prompt encoded once
    r2 = run_improve(con, "Object,Attribute", encoder=enc, poolings="mean")
    r3 = run_improve(con, "Object,Attribute", encoder=enc, poolings="logsumexp", tau=0.3)
    r4 = run_improve(con, "Object,Attribute", encoder=enc, poolings="all")  # max reused, lse tau=1 new
    assert enc.n_texts == first and len(enc.calls) == 1
    assert r2.n_encoded == r3.n_encoded == r4.n_encoded == 0
    assert r4.reused_ids == r1.improvement_ids + r2.improvement_ids
    assert len(set(r1.improvement_ids + r2.improvement_ids + r3.improvement_ids + r4.improvement_ids)) == 4
    shards = q(con, "SELECT * FROM embedding_sets WHERE kind = 'prompt'")
    assert len(shards) == 1 and shards["rows"][0] == first
    # the cache key is (model identity, text): another model or precision finds nothing
    identity = {"model": MODEL, "pretrained": None, "checkpoint_sha256": None, "precision": "fp32"}
    texts = sorted(set(enc.calls[0]))
    assert len(imp.cached_prompts(con, identity, texts)) == len(texts)
    assert imp.cached_prompts(con, identity | {"model": "other"}, texts).empty
    assert imp.cached_prompts(con, identity | {"precision": "fp16"}, texts).empty
    assert imp.cached_prompts(con, identity | {"checkpoint_sha256": "ab" * 32}, texts).empty
    # a new template set with partly new prompts encodes only those
    tdf = con.execute("SELECT * FROM prompt_templates WHERE template_set = 'default'").df()
    tdf["template_set"] = "plus"
    # (in place of Object's last slot template before K=10: it applies to the same captions)
    last = (tdf["category"] == "Object") & (tdf["position"] == 9)
    assert tdf.loc[last, "template"].tolist() == ["the main subjects of this photo are {objects}."]
    tdf.loc[last, "template"] = "an unusual photo of {objects}."
    db.insert_df(con, "prompt_templates", tdf)
    r5 = run_improve(con, "Object,Attribute", encoder=enc, poolings="max", template_set="plus")
    assert 0 < r5.n_encoded == enc.n_texts - first
    assert all(t.startswith("an unusual photo of") for t in enc.calls[-1])


def test_same_config_is_a_noop(con):
    run_improve(con, "Object", poolings="all", control="successes:5")
    before = snapshot(con)
    enc = FakeEncoder()
    res = run_improve(con, "Object", encoder=enc, poolings="all", control="successes:5")
    assert res.is_noop and enc.calls == []
    assert_unchanged(con, before)


def test_subset_cap_is_seeded_and_overlap_optional(con):
    n_obj = q(con, "SELECT count(*) AS n FROM sample_labels WHERE category = 'Object' AND NOT is_overlap")["n"][0]
    n_all = q(con, "SELECT count(*) AS n FROM sample_labels WHERE category = 'Object'")["n"][0]
    assert n_all > n_obj >= 5

    def chosen(**kw):
        res = run_improve(con, "Object", poolings="max", **kw)
        ids = q(con, "SELECT caption_id FROM improvement_ranks WHERE improvement_id = ? ORDER BY 1",
                [res.improvement_ids[0]])  # fmt: skip
        return res, ids["caption_id"].tolist()

    _, full = chosen()
    assert len(full) == n_obj
    _, a = chosen(max_subset=4, seed=1)
    _, b = chosen(max_subset=4, seed=1)
    _, c = chosen(max_subset=4, seed=2)
    assert a == b and len(a) == 4 and set(a) <= set(full)
    assert a != c
    res, with_overlap = chosen(include_overlap=True)
    assert len(with_overlap) == n_all
    assert q(con, "SELECT is_overlap_included FROM improvement_runs WHERE improvement_id = ?",
             [res.improvement_ids[0]])["is_overlap_included"][0]  # fmt: skip


def test_controls(con):
    res = run_improve(con, "Object,Attribute", poolings="max,mean", control="successes:6", seed=3)
    assert res.populations["successes"] == 6
    runs = q(con, "SELECT * FROM improvement_runs ORDER BY improvement_id")
    assert list(runs["population"]) == ["failures", "failures", "successes", "successes"]
    assert runs["run_id"].nunique() == 1
    succ = q(con, "SELECT r.* FROM improvement_ranks r JOIN improvement_runs u USING (improvement_id) "
             "WHERE u.population = 'successes'")  # fmt: skip
    assert (succ["baseline_rank"] == 1).all()
    assert (succ["n_prompts"] == 10).all()  # Object's list, then Attribute's, cut at K = 10
    assert (q(con, "SELECT k_prompts FROM improvement_runs")["k_prompts"] == 10).all()
    view = q(con, "SELECT * FROM improvement_recall WHERE population = 'successes' AND k = 1")
    for row in view.itertuples():
        broke = int((succ[succ["improvement_id"] == row.improvement_id]["improved_rank"] > 1).sum())
        assert row.n_broken == broke and row.n_fixed == 0
        assert row.baseline_pct == 100.0
        assert row.delta_pp == pytest.approx(-100 * broke / 6, abs=0.006)
    res_all = run_improve(con, "Object", poolings="max", control="all")
    n_caps = q(con, "SELECT count(*) AS n FROM retrieval_ranks")["n"][0]
    assert res_all.populations["all"] == n_caps
    all_ranks = q(con, "SELECT * FROM improvement_ranks WHERE improvement_id = ?", [res_all.improvement_ids[-1]])
    labelled = all_ranks.dropna(subset=["category"])
    assert 0 < len(labelled) < len(all_ranks)  # labelled captions keep their label, the rest are NULL


def test_views_and_stored_statistics_agree_with_the_ranks(con):
    res = run_improve(con, "Object,Attribute,Count", poolings="all", seed=7)
    ranks = q(con, "SELECT * FROM improvement_ranks")
    view = q(con, "SELECT * FROM improvement_recall")
    assert len(view) == 3 * len(res.improvement_ids)
    for row in view.itertuples():
        g = ranks[ranks["improvement_id"] == row.improvement_id]
        b = (g["baseline_rank"] <= row.k).to_numpy()
        a = (g["improved_rank"] <= row.k).to_numpy()
        assert row.n == len(g)
        assert row.baseline_pct == round(100 * b.mean(), 2)
        assert row.improved_pct == round(100 * a.mean(), 2)
        assert row.delta_pp == pytest.approx(100 * (a.mean() - b.mean()), abs=0.0051)
        assert row.mcnemar_p == pytest.approx(stats.mcnemar_exact(b, a), rel=1e-12)
        lo, hi = stats.paired_bootstrap_ci(b, a, seed=7)
        assert (row.ci_low_pp, row.ci_high_pp) == (round(100 * lo, 2), round(100 * hi, 2))
        assert row.n_fixed == int((~b & a).sum()) and row.n_broken == int((b & ~a).sum())
    assert (view[view["k"] == 1]["baseline_pct"] == 0).all()  # R@1 failures by construction
    cat = q(con, "SELECT * FROM category_recall_delta")
    assert set(cat["category"]) == {"Object", "Attribute", "Count"}
    for row in cat.itertuples():
        g = ranks[(ranks["improvement_id"] == row.improvement_id) & (ranks["category"] == row.category)]
        a = (g["improved_rank"] <= row.k).to_numpy()
        assert row.n == len(g) and row.improved_pct == round(100 * a.mean(), 2)
        assert row.mcnemar_p == pytest.approx(stats.mcnemar_exact((g["baseline_rank"] <= row.k).to_numpy(), a))
    st = q(con, "SELECT * FROM improvement_stats")
    assert len(st) == 3 * 4 * len(res.improvement_ids)  # K x (whole run + 3 categories)
    assert (st["bootstrap_resamples"] == 10_000).all() and (st["bootstrap_seed"] == 7).all()


def test_cli_prints_the_reference_table_shape(dbfile, run_cli):
    # fill the prompt cache through the API (the CLI would load a real model for new prompts)
    run_improve(dbfile, "Object", poolings="max")
    out = run_cli("--db", dbfile, "improve", "--categories", "object", "--pooling", "all").output
    # with every prompt cached, the CLI encodes nothing and never needs the model
    assert "0 encoded now" in out
    assert "Object failures (n=" in out and "K 10, retrieval run" in out and "Baseline: R@1 0.00" in out
    n = int(out.split("Object failures (n=")[1].split(",")[0])
    assert f"Prompts per caption (effective K): 10 for {n} captions" in out
    for label in ("max", "mean", "logsumexp (tau=1)"):
        assert label in out
    for col in ("improved R@1", "improved R@10", "ΔR@1 (pp)", "ΔR@10 (pp)", "95% CI (pp)", "McNemar p"):
        assert col in out
    again = run_cli("--db", dbfile, "improve", "--categories", "Object", "--pooling", "all").output
    assert "nothing changed" in again


BAD_IMPROVE = [
    (["--categories", "Nonsense"], "Unknown categories: Nonsense"),
    (["--categories", "Ambiguous"], "no templates for Ambiguous"),
    (["--categories", "Object", "--pooling", "median"], "Unknown pooling"),
    (["--categories", "Object", "--pooling", "logsumexp", "--tau", "0"], "Invalid value for '--tau': 0.0 is not in"),
    (["--categories", "Object", "--control", "some"], "--control 'some' is not understood"),
    (["--categories", "Object", "--control", "successes:100000"], "more than the"),
    (["--categories", "Object", "--template-set", "nope"], "No template set named 'nope'"),
    (["--categories", "Object", "--run", "999"], "No retrieval run with id 999"),
    (["--categories", "Object", "--k", "0"], "Invalid value for '--k': 0 is not in the range 1<=x<=2147483647"),
    (["--categories", "Object", "--k", "-2"], "Invalid value for '--k': -2 is not in the range 1<=x<=2147483647"),
    (["--categories", "Object,Count", "--k", "20"], "(templates per category: Object 19, Count 19). Give --k 19"),
    (["--categories", "Object,Count", "--template-mode", "union", "--k", "38"], "the 37 distinct templates of"),
    (["--categories", "Object", "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295"),
    (["--categories", "Object", "--seed", str(2**32)], "is not in the range 0<=x<=4294967295"),
    (["--categories", "Object", "--seed", "99999999999999999999999"], "is not in the range 0<=x<=4294967295"),
]


@pytest.mark.parametrize("kw,message", [({"k": 0}, "--k must be a whole number of at least 1"),
                                        ({"k": -1}, "--k must be"), ({"k": 2.5}, "--k must be"),
                                        ({"seed": -1}, "--seed must be a whole number from 0 to 4294967295"),
                                        ({"seed": 2**32}, "--seed must be")])  # fmt: skip
def test_bad_k_or_seed_through_the_api(con, kw, message):
    from toolkit.errors import UserError

    before = snapshot(con)
    with pytest.raises(UserError, match=message):
        run_improve(con, "Object", **kw)
    assert_unchanged(con, before)


def test_bad_input_is_a_clear_error_and_writes_nothing(dbfile, run_cli):
    before = snapshot(dbfile)
    for args, message in BAD_IMPROVE:
        res = run_cli("--db", dbfile, "improve", *args, expect=2)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert_unchanged(dbfile, before)


def test_no_labels_is_a_clear_error(run_cli, tmp_path):
    res = run_cli("--db", tmp_path / "empty.duckdb", "improve", "--categories", "Object", expect=2)
    assert "No labels have been imported yet: improve needs labelled R@1 failures" in res.output


def test_interrupted_write_leaves_the_database_unchanged(con, monkeypatch):
    before = snapshot(con)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(imp, "compute_stats", boom)
    with pytest.raises(KeyboardInterrupt):
        run_improve(con, "Object", poolings="all")
    assert_unchanged(con, before)


def test_tampered_prompt_shard_is_refused(con):
    run_improve(con, "Object", poolings="max")
    path = paths.resolve(con, q(con, "SELECT path FROM embedding_sets WHERE kind = 'prompt'")["path"][0])
    arr = np.load(path)
    arr[0, 0] += 1
    np.save(path, arr)
    from toolkit.errors import UserError

    with pytest.raises(UserError, match="has changed since it was written"):
        run_improve(con, "Object", poolings="mean")


def test_recompute_prompts_replaces_a_damaged_shard_with_the_command_the_message_gives(
    dbfile, run_cli, monkeypatch
):  # fmt: skip
    import shlex

    from toolkit.errors import UserError

    run_improve(dbfile, "Object", poolings="max")
    old = q(dbfile, "SELECT embedding_set_id, path FROM embedding_sets WHERE kind = 'prompt'")
    old_texts = set(q(dbfile, "SELECT p.text FROM embedding_rows er JOIN prompts p ON p.prompt_id = er.item_id "
                              "WHERE er.embedding_set_id = ?", [int(old["embedding_set_id"][0])])["text"])  # fmt: skip
    shard = paths.resolve(dbfile, old["path"][0])  # stored relative to the database's folder
    arr = np.load(shard)
    arr[0, 0] += 1
    np.save(shard, arr)
    with pytest.raises(UserError) as err:
        run_improve(dbfile, "Attribute,Object", poolings="mean", k=12)
    message = str(err.value)
    assert "Delete that prompt shard" not in message
    command = message.split("with: ", 1)[1]
    args = shlex.split(command)
    assert args[:3] == ["clipfail", "--db", str(dbfile)] and args[-1] == "--recompute-prompts"
    assert "--k 12" in command and "--categories Object,Attribute" in command and "--pooling mean" in command
    # the command works as given (a fake encoder stands in for the model, which tests cannot load)
    enc = FakeEncoder()
    monkeypatch.setattr(imp, "model_encoder_factory", lambda **kw: lambda identity: enc)
    out = run_cli(*args[1:]).output
    assert "encoded now" in out
    shards = q(dbfile, "SELECT embedding_set_id FROM embedding_sets WHERE kind = 'prompt'")["embedding_set_id"]
    assert len(shards) == 1 and int(old["embedding_set_id"][0]) not in set(shards)
    new_texts = set(q(dbfile, "SELECT p.text FROM embedding_rows er JOIN prompts p ON p.prompt_id = er.item_id "
                              "WHERE er.embedding_set_id = ?", [int(shards[0])])["text"])  # fmt: skip
    assert old_texts < new_texts and len(enc.calls) == 1 and set(enc.calls[0]) == new_texts
    assert not q(
        dbfile, "SELECT * FROM embedding_rows WHERE embedding_set_id = ?", [int(old["embedding_set_id"][0])]
    ).shape[0]
    cfg = q(dbfile, "SELECT config_json FROM runs WHERE stage = 'improve' ORDER BY run_id DESC LIMIT 1")["config_json"][
        0
    ]
    assert '"dropped_prompt_shards":[' + str(int(old["embedding_set_id"][0])) + "]" in cfg
    # the cache is whole again: the first configuration with another pooling encodes nothing
    res = run_improve(dbfile, "Object", encoder=enc, poolings="logsumexp")
    assert res.n_encoded == 0 and len(enc.calls) == 1


def _record_device(path, device):
    with Opened(path) as con:
        run_id, cfg = con.execute(
            "SELECT r.run_id, r.config_json FROM runs r JOIN retrieval_runs rr USING (run_id)"
        ).fetchall()[0]
        cfg = json.loads(cfg) | {"device": device}
        con.execute("UPDATE runs SET config_json = ? WHERE run_id = ?", [db.canonical_json(cfg), run_id])


@pytest.mark.parametrize("cuda_here", [True, False])
def test_improve_follows_the_retrieval_runs_device(dbfile, monkeypatch, cuda_here, run_cli):
    """Evaluate ranked on CUDA: improve re-scores on CUDA when it can, else on the CPU and says so."""
    import torch

    from toolkit.retrieval import ranking as retrieval

    _record_device(dbfile, "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_here)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda_here else 0)
    used = []
    real = retrieval.score_rows

    def score_rows(queries, gallery, device="cpu"):
        used.append(str(device))
        return real(queries, gallery, device="cpu")  # no GPU in the tests: compute on the CPU, record the ask

    monkeypatch.setattr(retrieval, "score_rows", score_rows)
    res = run_improve(dbfile, "Object", poolings="max")
    cfg = json.loads(q(dbfile, "SELECT config_json FROM runs WHERE run_id = ?", [res.run_id])["config_json"][0])
    assert cfg["retrieval_device"] == "cuda:0"
    if cuda_here:
        assert set(used) == {"cuda:0"} and cfg["score_device"] == "cuda:0"
        assert cfg["score_device_note"] is None and res.notes == []
    else:
        assert set(used) == {"cpu"} and cfg["score_device"] == "cpu"
        assert "ranked on cuda:0, which this machine does not have; improve re-scored on the cpu" in res.notes[0]
        assert cfg["score_device_note"] == res.notes[0] and "not bit for bit" in res.notes[0]
        out = run_cli("--db", dbfile, "improve", "--categories", "Object", "--pooling", "max").output
        assert "Note: Retrieval run" in out and "nothing changed" in out
    # the scoring device is part of the configuration: the other device's result is not reused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not cuda_here)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if cuda_here else 1)
    other = run_improve(dbfile, "Object", poolings="max")
    assert other.improvement_ids != res.improvement_ids and not other.reused_ids


def test_a_retrieval_run_without_a_recorded_device_is_rescored_on_the_cpu_with_a_note(con):
    _record_device(con, None)
    res = run_improve(con, "Object", poolings="max")
    assert "did not record its device; improve re-scored on the cpu" in res.notes[0]


# ------------------------------------------------------------------------------------------------
# templates


def test_templates_list_export_import_round_trip(dbfile, run_cli, tmp_path):
    out = run_cli("--db", dbfile, "templates", "list").output
    assert "default" in out and "Spatial" in out
    shown = run_cli("--db", dbfile, "templates", "list", "--set", "default-v2").output
    assert "{caption}" in shown and "{objects}" in shown
    f = tmp_path / "t.csv"
    run_cli("--db", dbfile, "templates", "export", "--set", "default-v2", "--out", f)
    text = f.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "template_set,category,position,template"
    res = run_cli("--db", dbfile, "templates", "import", f).output
    assert "nothing changed" in res
    res = run_cli("--db", dbfile, "templates", "import", f, "--set", "copy").output
    assert "Imported template set 'copy': 114 templates" in res
    a = q(
        dbfile,
        "SELECT category, position, template FROM prompt_templates WHERE template_set = 'default-v2' ORDER BY ALL",
    )
    b = q(dbfile, "SELECT category, position, template FROM prompt_templates WHERE template_set = 'copy' ORDER BY ALL")
    pd.testing.assert_frame_equal(a, b)
    # header + default (60) + default-v2 (114) + copy (114)
    assert run_cli("--db", dbfile, "templates", "export").output.count("\n") == 1 + 60 + 114 + 114
    # a shipped set's name stands for its shipped content: changing it is refused, even with --replace
    changed = text.replace("a photo of {objects}.", "a photo of some {objects}.")
    (tmp_path / "changed.csv").write_text(changed, encoding="utf-8")
    res = run_cli("--db", dbfile, "templates", "import", tmp_path / "changed.csv", "--replace", expect=2)
    assert "is a template set shipped with clipfail" in res.output


def _write(path, rows, header=("template_set", "category", "position", "template")):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize(
    "rows,message",
    [
        ([["s", "Objekt", 0, "{caption}"]], "unknown category 'Objekt'"),
        ([["s", "Object", 0, "{caption}"], ["s", "Object", 1, "a {thing}"]], "uses {thing}"),
        ([["s", "Object", 0, "a photo of {objects}"]], "no identity template"),
        ([["s", "Object", 0, "{caption}"], ["s", "Object", 0, "x {objects}"]], "position 0 given twice"),
        ([["s", "Object", "x", "{caption}"]], "not a whole number"),
        ([["s", "Object", 0, "{caption}"], ["s", "Object", 1, "{caption"]], "malformed"),
    ],
)
def test_bad_template_files_import_nothing(dbfile, run_cli, tmp_path, rows, message):
    before = q(dbfile, "SELECT * FROM prompt_templates ORDER BY ALL")
    res = run_cli("--db", dbfile, "templates", "import", _write(tmp_path / "bad.csv", rows), expect=2)
    assert message in res.output and "Traceback" not in res.output
    pd.testing.assert_frame_equal(before, q(dbfile, "SELECT * FROM prompt_templates ORDER BY ALL"))


def test_template_replace_rules(dbfile, run_cli, tmp_path):
    f1 = _write(tmp_path / "a.csv", [["mine", "Object", 0, "{caption}"], ["mine", "Object", 1, "a photo of {objects}"]])
    f2 = _write(tmp_path / "b.csv", [["mine", "Object", 0, "{caption}"], ["mine", "Object", 1, "{objects}!"]])
    run_cli("--db", dbfile, "templates", "import", f1)
    assert "already exists" in run_cli("--db", dbfile, "templates", "import", f2, expect=2).output
    assert "Replaced" in run_cli("--db", dbfile, "templates", "import", f2, "--replace").output
    run_improve(dbfile, "Object", poolings="max", template_set="mine", k=2)
    res = run_cli("--db", dbfile, "templates", "import", f1, "--replace", expect=2)
    assert "--replace refused" in res.output
    # without positions: file order
    f3 = _write(
        tmp_path / "c.csv", [["Object", "{caption}"], ["Object", "x {objects}"]], header=("category", "template")
    )
    run_cli("--db", dbfile, "templates", "import", f3, "--set", "nopos")
    got = q(dbfile, "SELECT position, template FROM prompt_templates WHERE template_set = 'nopos' ORDER BY 1")
    assert got["template"].tolist() == ["{caption}", "x {objects}"]


def test_readme_example_queries_run(con):
    run_improve(con, "Object,Attribute", poolings="max,mean", control="successes:4")
    examples = Path(__file__).parent.parent / "queries" / "examples" / "improve.sql"
    statements = [s for s in examples.read_text(encoding="utf-8").split(";") if s.strip()]
    assert len(statements) == 8
    results = [con.execute(s).df() for s in statements]
    assert all(len(r) > 0 for r in results)
    table = results[0]
    assert list(table["pooling"]) == ["max", "mean"] and set(table["categories"]) == {"Object,Attribute"}


def test_readme_example_reference_table_keeps_two_runs_of_one_subset_apart(con):
    """The first example query grouped by (categories, pooling, tau, n) and took max() of each K's value: two runs
    of the same captions with another --k (or template set or mode) were merged into one row holding the larger
    Recall@K of either. Each row must be one improvement run's values, as the view gives them."""
    ids = [run_improve(con, "Object", poolings="max", k=k).improvement_ids[0] for k in (2, 10)]
    view = con.execute(
        "SELECT improvement_id, k, improved_pct, delta_pp FROM improvement_recall "
        "WHERE list_contains(?, improvement_id)",
        [ids],
    ).df()
    assert view.groupby("k")["improved_pct"].nunique().max() > 1  # the two runs differ somewhere
    examples = Path(__file__).parent.parent / "queries" / "examples" / "improve.sql"
    first = examples.read_text(encoding="utf-8").split(";")[0]
    table = con.execute(first).df()
    rows = table[(table["categories"] == "Object") & (table["pooling"] == "max")]
    assert len(rows) == 2
    got = sorted(tuple(r) for r in rows[["r1", "r5", "r10", "d1", "d5", "d10"]].itertuples(index=False))
    want = sorted(
        tuple(g.set_index("k").loc[k, c] for c in ("improved_pct", "delta_pp") for k in (1, 5, 10))
        for _, g in view.groupby("improvement_id")
    )
    assert got == want


# ------------------------------------------------------------------------------------------------
# end to end with a real (tiny, randomly initialised) open_clip model through every stage's CLI


@pytest.fixture(scope="module")
def tiny_world(synthetic_coco_master, tmp_path_factory):
    from toolkit.embed.models import save_random_checkpoint

    root = tmp_path_factory.mktemp("improve_tiny")
    path = root / "tiny.duckdb"
    ckpt = root / "tiny-clip.pt"
    save_random_checkpoint(ckpt, "tiny-clip", seed=3)
    _cli(["--db", path, "ingest", "--coco-root", synthetic_coco_master, "--num-images", "30"])
    _cli(["--db", path, "embed", "--model", "tiny-clip", "--checkpoint", ckpt, "--device", "cpu"])
    _cli(["--db", path, "evaluate", "--device", "cpu"])
    out = root / "fa"
    _cli(["--db", path, "sample-failures", "--n", 40, "--overlap", 4, "--per-annotator", 12, "--out", out,
          "--no-pictures"])  # fmt: skip
    cats = ["Count", "Attribute", "Spatial", "Object"]
    for name in ["assign_A.csv", "assign_B.csv", "assign_C.csv"]:
        with open(out / name, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for i, r in enumerate(rows):
            r["category"] = cats[i % len(cats)]
        with open(out / name, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        _cli(["--db", path, "import-labels", out / name])
    return path, ckpt


def test_end_to_end_with_a_tiny_open_clip_model(tiny_world, tmp_path, run_cli):
    path, ckpt = tiny_world  # only this test uses (and changes) it
    # the checkpoint is found from the text embeddings' record; prompts are encoded by that model
    # --device cpu: the prompt embeddings are compared below with the CPU encoding of the same model
    out = run_cli(
        "--db", path, "improve", "--categories", "Count,Attribute", "--pooling", "max", "--device", "cpu"
    ).output
    assert "Attribute+Count failures" in out and "Baseline: R@1 0.00" in out
    encoded = int(out.split(" encoded now")[0].rsplit(", ", 1)[1])
    assert encoded > 0
    again = run_cli("--db", path, "improve", "--categories", "Count,Attribute", "--pooling", "all", "--tau", "0.5")
    assert "0 encoded now" in again.output  # another pooling and tau: nothing to encode
    for label in ("max", "mean", "logsumexp (tau=0.5)"):
        assert label in again.output
    # the cache holds exactly what the embed stage's fast text path gives for those prompts
    from toolkit.embed.encode import encode_texts
    from toolkit.embed.models import load_model
    from toolkit.store.artifacts import load_embedding_set

    con = open_study(path)
    try:
        sid = con.execute("SELECT embedding_set_id FROM embedding_sets WHERE kind = 'prompt'").fetchall()[0][0]
        shard = load_embedding_set(con, sid)
        texts = (
            con.execute(
                "SELECT p.text FROM embedding_rows er JOIN prompts p ON p.prompt_id = er.item_id "
                "WHERE er.embedding_set_id = ? ORDER BY er.row_index",
                [sid],
            )
            .df()["text"]
            .tolist()
        )
    finally:
        con.close()
    assert len(texts) == encoded
    bundle = load_model("tiny-clip", checkpoint=ckpt, device="cpu")
    np.testing.assert_allclose(encode_texts(bundle, texts[:50]), shard.array[:50], atol=1e-6, rtol=0)
    # identity-only templates: every pooling reproduces the evaluate stage's ranks exactly
    f = _write(tmp_path / "ident.csv", [["ident", c, 0, "{caption}"] for c in ("Count", "Attribute", "Spatial")])
    run_cli("--db", path, "templates", "import", f)
    run_cli("--db", path, "improve", "--categories", "Count,Attribute,Spatial", "--pooling", "all",
            "--template-set", "ident", "--control", "all", "--k", 1)  # fmt: skip
    ranks = q(
        path,
        "SELECT r.baseline_rank, r.improved_rank, r.improved_score, rr.gt_rank, rr.gt_score "
        "FROM improvement_ranks r JOIN improvement_runs u USING (improvement_id) "
        "JOIN retrieval_ranks rr ON rr.retrieval_run_id = u.retrieval_run_id AND rr.query_id = r.caption_id "
        "WHERE u.template_set = 'ident'",
    )
    n_fail = q(path, "SELECT count(*) AS n FROM sample_labels WHERE category <> 'Object' AND NOT is_overlap")["n"][0]
    assert len(ranks) == 3 * (q(path, "SELECT count(*) AS n FROM retrieval_ranks")["n"][0] + n_fail)
    assert (ranks["improved_rank"] == ranks["gt_rank"]).all() and (ranks["baseline_rank"] == ranks["gt_rank"]).all()
    assert np.array_equal(ranks["improved_score"].to_numpy(), ranks["gt_score"].to_numpy(np.float64))
    # another model's weights are refused for new prompts, with a clear message
    other = tmp_path / "other.pt"
    from toolkit.embed.models import save_random_checkpoint

    save_random_checkpoint(other, "tiny-clip", seed=4)
    res = run_cli("--db", path, "improve", "--categories", "Spatial", "--checkpoint", other, expect=2)
    assert "is not the one that made the text embeddings" in res.output


def test_report_shows_the_effective_k_of_each_subset(con, tmp_path):
    from toolkit.report.page import write_report

    a = run_improve(con, "Object", poolings="max")
    b = run_improve(con, "Attribute", poolings="max", k=15)
    dist = q(con, "SELECT n_prompts, count(*) AS n FROM improvement_ranks WHERE improvement_id = ? GROUP BY 1 "
                  "ORDER BY 1 DESC", b.improvement_ids)  # fmt: skip
    assert len(dist) == 2 and dist["n_prompts"].tolist() == [15, 10]  # captions without an attribute: 1 + 9 framings
    # a run made before K could be chosen (no k_prompts) is still shown, with what it recorded
    con.execute("UPDATE improvement_runs SET k_prompts = NULL WHERE improvement_id = ?", a.improvement_ids)
    page = write_report(con, out_dir=tmp_path / "rep", figures=False).html_path.read_text(encoding="utf-8")
    parts = ", ".join(f"{k} for {n} caption{'s' if n != 1 else ''}" for k, n in zip(dist["n_prompts"], dist["n"]))
    assert f"Distinct prompts per caption: K 15 asked; effective K {parts} (view improvement_effective_k)" in page
    assert "mode own, K 15)" in page
    assert "Templates per category (K, copies of the caption included): {&quot;Object&quot;: 10}" in page


def test_templates_export_guards_formulas_and_import_reads_its_own_guard_back(dbfile, run_cli, tmp_path):
    """Issue 24, item 11 (same class): the templates CSV is opened in spreadsheets too."""
    rows = [
        ["=set", "Object", 0, "{caption}"],
        ["=set", "Object", 1, '=HYPERLINK("http://x") {objects}'],
        ["=set", "Object", 2, "''=quoted {objects}"],  # a guarded cell: the template is '=quoted {objects}'
        ["=set", "Object", 6, "'=guarded {objects}"],  # and this one =guarded {objects}
        ["=set", "Object", 3, "@{objects}"],
        ["=set", "Object", 4, "- {caption}"],
        ["=set", "Object", 5, "'plain quote {objects}"],
    ]
    run_cli("--db", dbfile, "templates", "import", _write(tmp_path / "f.csv", rows))
    out = tmp_path / "out.csv"
    run_cli("--db", dbfile, "templates", "export", "--set", "=set", "--out", out)
    with open(out, encoding="utf-8", newline="") as fh:
        cells = list(csv.reader(fh))[1:]
    assert [c[0] for c in cells] == ["'=set"] * 7
    assert sorted(c[3] for c in cells) == sorted(
        ["{caption}", "'=HYPERLINK(\"http://x\") {objects}", "''=quoted {objects}", "'@{objects}",
         "'- {caption}", "'plain quote {objects}", "'=guarded {objects}"]
    )  # fmt: skip
    stored = q(dbfile, "SELECT template FROM prompt_templates WHERE template_set = '=set'")["template"]
    assert {"'=quoted {objects}", "=guarded {objects}", "'plain quote {objects}"} <= set(stored)
    run_cli("--db", dbfile, "templates", "import", out, "--set", "copy")
    sql = "SELECT category, position, template FROM prompt_templates WHERE template_set = ? ORDER BY ALL"
    pd.testing.assert_frame_equal(q(dbfile, sql, ["=set"]), q(dbfile, sql, ["copy"]))
