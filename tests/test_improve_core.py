"""Pure functions of the improve stage: phrase slots, template filling, pooling, ranks, statistics."""

from __future__ import annotations

import csv
import math
from importlib import resources

import numpy as np
import pytest

from toolkit import stats
from toolkit.improve import pooling
from toolkit.labels import phrases

# ------------------------------------------------------------------------------------------
# phrase extractor
# ------------------------------------------------------------------------------------------

# caption -> the slots expected from the documented rules (slots not listed must be empty)
PHRASE_TABLE = [
    (
        "A man riding a horse on a beach.",
        {"objects": "man and horse", "actions": "riding a horse", "relation": "on a beach"},
    ),
    (
        "Two dogs are sitting on the couch next to a red pillow.",
        {
            "objects": "dogs and couch",
            "attributes": "red pillow",
            "actions": "sitting on the couch",
            "count": "two dogs",
            "relation": "next to a red pillow",  # strong relations hide the weak "on"
        },
    ),
    (
        "A cat laying on top of a laptop computer.",
        {
            "objects": "cat and laptop computer",
            "actions": "laying on top of a laptop computer",
            "relation": "on top of a laptop computer",
        },
    ),
    (
        "A red double decker bus driving down the street.",
        {
            "objects": "double decker bus",
            "attributes": "red double decker bus",
            "actions": "driving down the street",
        },
    ),
    (
        "A black and white cat sitting in a wooden chair",
        {
            "objects": "cat and chair",
            "attributes": "black and white cat and wooden chair",
            "actions": "sitting in a wooden chair",
            "relation": "in a wooden chair",
        },
    ),
    (
        "a pair of skis leaning against a wall",
        {
            "objects": "skis",
            "actions": "leaning against a wall",
            "count": "a pair of skis",
            "relation": "against a wall",
        },
    ),
    (
        "Three blue circles to the right of a purple square",
        {
            "attributes": "blue circles and purple square",
            "count": "three blue circles",
            "relation": "to the right of a purple square",
        },
    ),
    ("A orange triangle on the left", {"attributes": "orange triangle", "relation": "on the left"}),
    ("A plate with a hot dog and an orange.", {"objects": "hot dog and orange"}),
    ("A teddy bear in front of a large window", {
        "objects": "teddy bear", "attributes": "large window", "relation": "in front of a large window"}),
    (
        "Several giraffes grazing near the trees",
        {
            "objects": "giraffes",
            "actions": "grazing near the trees",
            "count": "several giraffes",
            "relation": "near the trees",
        },
    ),
    ("A painting of a man on a wall", {"objects": "man", "relation": "on a wall"}),  # "a painting" is a noun
    ("a kitchen with a stove, a sink and a refrigerator", {"objects": "stove, sink and refrigerator"}),
    ("The bus is red.", {"objects": "bus"}),  # a predicative adjective has no noun after it
    ("", {}),
]  # fmt: skip


@pytest.mark.parametrize("caption,expected", PHRASE_TABLE)
def test_phrase_extractor_known_slots(caption, expected):
    got = phrases.extract(caption)
    assert set(got) == set(phrases.SLOTS)
    assert got == {slot: expected.get(slot, "") for slot in phrases.SLOTS}


def test_fill_uses_slots_and_falls_back_to_the_caption():
    cap = "A man riding a horse on a beach."
    assert phrases.fill("{caption}", cap) == cap
    assert phrases.fill("a photo of {objects}. {caption}", cap) == "a photo of man and horse. " + cap
    assert phrases.fill("{count}: {caption}", cap) == cap  # no count in this caption
    # one empty slot among several is enough to fall back
    assert phrases.fill("{objects} {count}", cap) == cap
    assert phrases.fill("{{literal}} {objects}", cap) == "{literal} man and horse"
    # precomputed slots are used as given
    assert phrases.fill("x {objects}", cap, slots={"objects": "zebra"}) == "x zebra"


@pytest.mark.parametrize("bad", ["{object}", "{0}", "{}", "{caption!r}", "{objects:>5}", "{caption", "}"])
def test_bad_templates_are_refused(bad):
    with pytest.raises(ValueError):
        phrases.template_slots(bad)


def test_default_templates_file():
    text = resources.files("toolkit").joinpath("data/templates_default.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert rows and set(rows[0]) == {"template_set", "category", "position", "template"}
    by_cat: dict[str, list] = {}
    for r in rows:
        phrases.template_slots(r["template"])  # every template is valid
        by_cat.setdefault(r["category"], []).append((int(r["position"]), r["template"]))
    assert set(by_cat) == {"Object", "Attribute", "Action", "Context", "Count", "Spatial"}
    for items in by_cat.values():
        items.sort()
        assert [p for p, _ in items] == list(range(len(items)))
        assert len(items) >= 8
        assert items[0][1] == "{caption}"
        assert len({t for _, t in items}) == len(items)


# ------------------------------------------------------------------------------------------
# pooling and ranks
# ------------------------------------------------------------------------------------------


def _normed(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_ranks(scores_per_query, gt, method, tau=1.0):
    """A plain loop over queries and images: pooled score, then 1 + #strictly higher."""
    out = []
    for S, g in zip(scores_per_query, gt):
        S = np.asarray(S, dtype=np.float64)
        K, M = S.shape
        pooled = []
        for j in range(M):
            col = [float(v) for v in S[:, j]]
            if method == "max":
                pooled.append(max(col))
            elif method == "mean":
                pooled.append(math.fsum(col) / K)
            else:
                m = max(col)
                pooled.append(m + tau * math.log(math.fsum(math.exp((v - m) / tau) for v in col) / K))
        out.append(1 + sum(p > pooled[g] for p in pooled))
    return np.array(out)


@pytest.fixture(scope="module")
def hand_built():
    rng = np.random.default_rng(7)
    d, M, N, K = 16, 60, 25, 6
    images = _normed(rng, M, d)
    gt = rng.integers(0, M, N)
    # captions near their image, prompts near their caption
    captions = images[gt] + 2.5 * _normed(rng, N, d)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    prompts = captions[:, None, :] + 1.0 * _normed(rng, N, K, d)
    prompts /= np.linalg.norm(prompts, axis=2, keepdims=True)
    return dict(images=images, gt=gt, captions=captions, prompts=prompts.astype(np.float32))


def _baseline(h):
    base_scores = h["captions"] @ h["images"].T
    return pooling.gt_ranks(base_scores, h["gt"]), base_scores


@pytest.mark.parametrize("method", pooling.POOLINGS)
def test_identity_template_gives_baseline_ranks(hand_built, method):
    base_ranks, base_scores = _baseline(hand_built)
    scores = base_scores[:, None, :]  # K = 1: the caption itself
    pooled = pooling.pool_scores(scores, method, tau=1.0)
    assert np.array_equal(pooled, base_scores.astype(np.float64))  # exact, not just the ranks
    assert np.array_equal(pooling.gt_ranks(pooled, hand_built["gt"]), base_ranks)
    assert base_ranks.min() >= 1 and (base_ranks > 1).any()  # the data is not trivial


@pytest.mark.parametrize("method", pooling.POOLINGS)
@pytest.mark.parametrize("K", [2, 3, 7, 10])
def test_duplicated_caption_templates_give_baseline_ranks(hand_built, method, K):
    base_ranks, base_scores = _baseline(hand_built)
    scores = np.repeat(base_scores[:, None, :], K, axis=1)
    pooled = pooling.pool_scores(scores, method, tau=0.5)
    assert np.array_equal(pooled, base_scores.astype(np.float64))
    assert np.array_equal(pooling.gt_ranks(pooled, hand_built["gt"]), base_ranks)


@pytest.mark.parametrize("method", pooling.POOLINGS)
def test_pooled_ranks_equal_plain_reference(hand_built, method):
    h = hand_built
    scores = np.einsum("nkd,md->nkm", h["prompts"], h["images"])
    got = pooling.gt_ranks(pooling.pool_scores(scores, method, tau=0.05), h["gt"])
    want = reference_ranks(scores, h["gt"], method, tau=0.05)
    assert np.array_equal(got, want)
    assert len(set(got.tolist())) > 3


def test_logsumexp_limits(hand_built):
    h = hand_built
    scores = np.einsum("nkd,md->nkm", h["prompts"], h["images"])
    r_max = pooling.gt_ranks(pooling.pool_scores(scores, "max"), h["gt"])
    r_mean = pooling.gt_ranks(pooling.pool_scores(scores, "mean"), h["gt"])
    assert not np.array_equal(r_max, r_mean)  # the limits are distinguishable on this data
    tiny = pooling.pool_scores(scores, "logsumexp", tau=1e-9)
    huge = pooling.pool_scores(scores, "logsumexp", tau=1e7)
    assert np.array_equal(pooling.gt_ranks(tiny, h["gt"]), r_max)
    assert np.array_equal(pooling.gt_ranks(huge, h["gt"]), r_mean)
    # pooled values sit between mean and max, on the cosine scale (the -tau*log K shift)
    mid = pooling.pool_scores(scores, "logsumexp", tau=0.1)
    assert (mid <= scores.max(axis=1) + 1e-12).all() and (mid >= scores.mean(axis=1) - 1e-12).all()
    # the shift changes no rank: tau*logsumexp(s/tau) without it ranks the same
    from scipy.special import logsumexp

    unshifted = 0.1 * logsumexp(scores.astype(np.float64) / 0.1, axis=1)
    assert np.array_equal(pooling.gt_ranks(unshifted, h["gt"]), pooling.gt_ranks(mid, h["gt"]))


def test_mean_pooling_ranks_as_embedding_average_ensemble():
    """Mean of cosines == cosine with the mean embedding (linearity); normalising it keeps the ranks."""
    rng = np.random.default_rng(3)
    d, M, N, K = 32, 400, 50, 10
    images = _normed(rng, M, d).astype(np.float64)
    gt = rng.integers(0, M, N)
    prompts = _normed(rng, N, K, d).astype(np.float64) + images[gt][:, None, :] * 0.08
    prompts /= np.linalg.norm(prompts, axis=2, keepdims=True)
    mean_pooled = pooling.pool_scores(np.einsum("nkd,md->nkm", prompts, images), "mean")
    avg = prompts.mean(axis=1)
    ensemble = avg @ images.T
    ensemble_normed = (avg / np.linalg.norm(avg, axis=1, keepdims=True)) @ images.T
    np.testing.assert_allclose(mean_pooled, ensemble, rtol=0, atol=1e-12)
    r = pooling.gt_ranks(mean_pooled, gt)
    assert np.array_equal(r, pooling.gt_ranks(ensemble, gt))
    assert np.array_equal(r, pooling.gt_ranks(ensemble_normed, gt))
    assert len(set(r.tolist())) > 5


def test_gt_ranks_tie_policy_is_optimistic():
    pooled = np.array([[0.5, 0.5, 0.2, 0.9], [0.1, 0.1, 0.1, 0.1]])
    assert pooling.gt_ranks(pooled, [0, 3]).tolist() == [2, 1]  # ties do not push the GT down


def _plain_counts(scores, gt):
    """A plain loop: 1 + #other columns strictly higher, and #other columns exactly equal, per row."""
    out = []
    for row, g in zip(np.asarray(scores), gt):
        v = row[g]
        higher = sum(1 for j, x in enumerate(row) if j != g and x > v)
        same = sum(1 for j, x in enumerate(row) if j != g and x == v)
        out.append((1 + higher, same))
    return np.array(out)


def test_tie_counts_equal_a_plain_reference_on_scores_with_known_ties():
    rng = np.random.default_rng(11)
    N, M = 60, 25
    scores = np.round(rng.uniform(0, 1, (N, M)) * 6) / 6  # 7 levels: most GT scores tie with others
    gt = rng.integers(0, M, N)
    rank, tied = pooling.gt_rank_counts(scores, gt)
    want = _plain_counts(scores, gt)
    assert np.array_equal(rank, want[:, 0]) and np.array_equal(tied, want[:, 1])
    assert (tied > 0).mean() > 0.5 and (rank + tied > rank).any()  # the ties are real
    assert np.array_equal(pooling.gt_ranks(scores, gt), rank)
    # every image ties: rank 1 counted optimistically, M pessimistically (a method must not win this way)
    r, t = pooling.gt_rank_counts(np.full((3, M), 0.25), [0, 7, M - 1])
    assert r.tolist() == [1, 1, 1] and (r + t).tolist() == [M, M, M]


def test_tie_counts_are_retrieval_ranks_n_tied():
    """The same definition as evaluate's retrieval_ranks (gt_rank, n_tied), on float32 scores with exact ties
    (duplicated images)."""
    from toolkit.retrieval import ranking as R

    rng = np.random.default_rng(4)
    images = _normed(rng, 30, 8)
    images[10:20] = images[:10]  # every image 0..19 has a twin: its captions tie with it
    gt = rng.integers(0, 30, 90)
    texts = images[gt] + 0.3 * _normed(rng, 90, 8)
    r = R.rank_text_to_image(texts, images, gt, device="cpu")
    rank, tied = pooling.gt_rank_counts(R.score_rows(texts, images), gt)
    assert np.array_equal(rank, r.gt_rank) and np.array_equal(tied, r.n_tied)
    assert np.array_equal(rank + tied, r.pessimistic_rank) and (tied > 0).sum() > 30


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_scores_that_are_not_finite_are_refused(bad):
    scores = np.zeros((4, 6))
    scores[2, 5] = bad  # a NaN would compare false with everything and rank its row first
    with pytest.raises(pooling.NonFiniteScores, match="1 scores of 1 queries"):
        pooling.gt_rank_counts(scores, [0, 1, 2, 3])


def test_stats_are_stored_for_both_counts_and_ties_do_not_win():
    """compute_stats: the optimistic columns from rank <= K, the *_pessimistic ones from rank + n_tied <= K
    (baseline and improved alike), each equal to toolkit.stats on those hits; a fix that only ties the GT image
    with every other image fixes nothing pessimistically."""
    import pandas as pd

    from toolkit.improve.stage import compute_stats

    rng = np.random.default_rng(8)
    n, M = 80, 40
    base = rng.integers(1, 30, n)
    base_tied = rng.integers(0, 3, n) * (rng.uniform(size=n) < 0.3)
    ranks = pd.DataFrame(
        {
            "category": np.where(np.arange(n) % 2, "Object", "Count"),
            "baseline_rank": base,
            "baseline_n_tied": base_tied,
            "improved_rank": np.ones(n, np.int64),  # every image ties with the GT image
            "improved_n_tied": np.full(n, M - 1),
        }
    )
    st = compute_stats(ranks, seed=3, n_resamples=500).set_index(["category", "k"])
    for (cat, k), row in st.iterrows():
        g = ranks if cat == "*" else ranks[ranks["category"] == cat]
        for suffix, b, a in (
            ("", g["baseline_rank"] <= k, g["improved_rank"] <= k),
            (
                "_pessimistic",
                g["baseline_rank"] + g["baseline_n_tied"] <= k,
                g["improved_rank"] + g["improved_n_tied"] <= k,
            ),
        ):
            b, a = b.to_numpy(), a.to_numpy()
            lo, hi = stats.paired_bootstrap_ci(b, a, n_resamples=500, seed=3)
            assert row[f"baseline_hits{suffix}"] == b.sum() and row[f"improved_hits{suffix}"] == a.sum()
            assert row[f"n_fixed{suffix}"] == (~b & a).sum() and row[f"n_broken{suffix}"] == (b & ~a).sum()
            assert row[f"ci_low_pp{suffix}"] == 100 * lo and row[f"ci_high_pp{suffix}"] == 100 * hi
            assert row[f"mcnemar_p{suffix}"] == stats.mcnemar_exact(b, a)
        assert row["improved_hits"] == row["n"]  # optimistically everything is "fixed"...
        assert row["improved_hits_pessimistic"] == 0 and row["n_fixed_pessimistic"] == 0  # ...pessimistically nothing
    assert (st["baseline_hits"] != st["baseline_hits_pessimistic"]).any()  # the baseline's ties count too


def test_pooling_rejects_bad_input():
    with pytest.raises(ValueError):
        pooling.pool_scores(np.zeros((0, 3)), "max")
    with pytest.raises(ValueError):
        pooling.pool_scores(np.zeros((2, 3)), "median")
    with pytest.raises(ValueError):
        pooling.pool_scores(np.zeros((2, 3)), "logsumexp", tau=0)


# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------


def _paired(rng, n, p_base, p_new):
    return rng.random(n) < p_base, rng.random(n) < p_new


def test_bootstrap_is_seeded_and_repeatable():
    base, new = _paired(np.random.default_rng(1), 1000, 0.3, 0.45)
    a = stats.paired_bootstrap_ci(base, new, seed=42)
    b = stats.paired_bootstrap_ci(base, new, seed=42)
    others = {stats.paired_bootstrap_ci(base, new, seed=s) for s in range(43, 48)}
    assert a == b
    # the interval sits on a lattice of 1/n, so one other seed may give the same one; five do not
    assert others - {a}
    delta = new.mean() - base.mean()
    assert a[0] <= delta <= a[1]
    assert a[0] < a[1]


def test_bootstrap_matches_index_resampling():
    """The count-based resampling has the distribution of the textbook index resampling."""
    base, new = _paired(np.random.default_rng(2), 60, 0.3, 0.5)
    lo, hi = stats.paired_bootstrap_ci(base, new, seed=0, n_resamples=20_000)
    rng = np.random.default_rng(123)
    d = new.astype(float) - base.astype(float)
    idx = rng.integers(0, len(d), size=(20_000, len(d)))
    naive = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    # Monte Carlo error of a 2.5% quantile with 20k resamples is well under 0.02 here
    assert abs(lo - naive[0]) < 0.02 and abs(hi - naive[1]) < 0.02


def test_bootstrap_degenerate_cases():
    same = np.array([True, False, True, True])
    assert stats.paired_bootstrap_ci(same, same) == (0.0, 0.0)
    assert stats.paired_bootstrap_ci(np.zeros(5, bool), np.ones(5, bool)) == (1.0, 1.0)
    lo, hi = stats.paired_bootstrap_ci([], [])
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ci([True], [True, False])


def test_mcnemar_matches_scipy_binomtest():
    from scipy.stats import binomtest

    rng = np.random.default_rng(5)
    for _ in range(40):
        n = int(rng.integers(1, 120))
        base, new = _paired(rng, n, rng.random(), rng.random())
        b = int((base & ~new).sum())
        c = int((~base & new).sum())
        want = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
        assert stats.mcnemar_exact(base, new) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_mcnemar_hand_computed_values():
    # b=0, c=5: p = 2 * (1/2)^5
    assert stats.mcnemar_exact_counts(0, 5) == 0.0625
    # b=1, c=9: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert stats.mcnemar_exact_counts(1, 9) == 22 / 1024
    assert stats.mcnemar_exact_counts(4, 4) == 1.0
    assert stats.mcnemar_exact_counts(0, 0) == 1.0
    # hit vectors: 3 pairs hit->miss, 0 miss->hit, 2 concordant
    assert stats.mcnemar_exact([1, 1, 1, 0, 1], [0, 0, 0, 0, 1]) == 0.25
    # large n stays exact and finite
    p = stats.mcnemar_exact_counts(4000, 4300)
    assert 0 < p < 0.01


def test_cohen_kappa_hand_computed():
    a = ["Object", "Object", "Action", "Count", "Object", "Action"]
    b = ["Object", "Action", "Action", "Count", "Object", "Object"]
    # p_o = 4/6; shares a: O 3/6, A 2/6, C 1/6; b: O 3/6, A 2/6, C 1/6 -> p_e = (9+4+1)/36 = 14/36
    p_o, p_e = 4 / 6, 14 / 36
    assert stats.cohen_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)


def test_cohen_kappa_textbook_example():
    """Worked example of the Wikipedia article "Cohen's kappa" (also in many textbooks): 50 grant
    proposals read by A and B; both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    p_o = 0.70, p_e = 0.5*0.6 + 0.5*0.4 = 0.50, kappa = 0.40."""
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.40, abs=1e-12)


def test_kappa_degenerate_cases():
    assert math.isnan(stats.cohen_kappa(["X"] * 4, ["X"] * 4))  # p_e = 1: undefined
    assert math.isnan(stats.cohen_kappa([], []))
    assert stats.cohen_kappa(["X", "Y"], ["X", "Y"]) == 1.0
    assert math.isnan(stats.fleiss_kappa([["X", "X"], ["X", "X"]]))
    assert math.isnan(stats.fleiss_kappa([]))
    with pytest.raises(ValueError):
        stats.cohen_kappa(["X"], ["X", "Y"])
    with pytest.raises(ValueError):
        stats.fleiss_kappa([["X", "X"], ["X"]])  # raters per item differ


# The worked example of the Wikipedia article "Fleiss' kappa": 10 subjects, 14 raters, 5
# categories; P_bar = 0.378, P_e = 0.213, kappa = 0.210.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_textbook_example():
    assert stats.fleiss_kappa_table(FLEISS_TABLE) == pytest.approx(0.20993, abs=5e-5)
    # the same from label lists, one per rater
    items = [[c for c, n in enumerate(row) for _ in range(n)] for row in FLEISS_TABLE]
    assert stats.fleiss_kappa(items) == pytest.approx(stats.fleiss_kappa_table(FLEISS_TABLE), abs=1e-12)


def test_fleiss_equals_cohen_shape_for_two_raters_hand_value():
    # two raters: Fleiss' kappa uses pooled marginals (Scott's pi), hand-computed here
    items = [["O", "O"], ["O", "A"], ["A", "A"], ["C", "C"]]
    # P_i = 1, 0, 1, 1 -> P_bar = 0.75; p = O 3/8, A 3/8, C 2/8 -> P_e = (9+9+4)/64 = 22/64
    p_e = 22 / 64
    assert stats.fleiss_kappa(items) == pytest.approx((0.75 - p_e) / (1 - p_e), abs=1e-12)
