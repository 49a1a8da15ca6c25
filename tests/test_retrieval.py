"""toolkit.retrieval.ranking: chunked exact ranks equal a plain full-matrix reference, ties follow the policy."""

import numpy as np
import pytest
import torch

from toolkit.embed.devices import resolve_device
from toolkit.retrieval import ranking as R

BACKENDS = ["numpy", "torch"]  # numpy = the CPU counting path; torch = the path CUDA uses


def _normalised(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dataset(seed=0, n_images=120, caps=5, d=16, noise=2.5):
    """Images, and several captions per image that are noisy copies of their image (ranks spread out)."""
    rng = np.random.default_rng(seed)
    img = _normalised(rng, n_images, d)
    gt = np.repeat(np.arange(n_images), caps)
    txt = img[gt] + noise * rng.standard_normal((len(gt), d)).astype(np.float32) / np.sqrt(d)
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    return txt, img, gt


def _full_scores(q, g):
    return torch.mm(torch.from_numpy(q), torch.from_numpy(g).T).numpy()


def _reference_t2i(txt, img, gt, k):
    """Plain reference: the full score matrix, then a full (stable, descending) argsort of each row."""
    S = _full_scores(txt, img)
    order = np.argsort(-S, axis=1, kind="stable")
    rank = 1 + np.argmax(order == gt[:, None], axis=1)
    return S, order, rank, order[:, :k], np.take_along_axis(S, order[:, :k], axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_to_image_equals_full_matrix_argsort(backend):
    txt, img, gt = _dataset()
    S, _, ref_rank, ref_idx, ref_val = _reference_t2i(txt, img, gt, 10)
    r = R.rank_text_to_image(txt, img, gt, k=10, device="cpu", backend=backend)
    # random data has no exact ties, so the argsort position is the rank
    assert (r.n_tied == 0).all()
    np.testing.assert_array_equal(r.gt_rank, ref_rank)
    np.testing.assert_array_equal(r.topk_indices, ref_idx)
    np.testing.assert_allclose(r.topk_scores, ref_val, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.gt_score, S[np.arange(len(gt)), gt], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(r.gt_index, gt)
    # the ranks are spread out, so the comparisons below are not trivial
    assert 1 < np.median(r.gt_rank) < 60 and r.gt_rank.max() > 10
    for K in (1, 5, 10):
        assert r.recall_at(K) == pytest.approx(np.mean(ref_rank <= K))
        # ... and Recall@K agrees with "the GT is among the top-K indices"
        assert r.recall_at(K) == pytest.approx(np.mean((ref_idx[:, :K] == gt[:, None]).any(1)))
    # internal consistency: where the GT is in the top-k, its score there is bit-identical
    pos = np.argwhere(r.topk_indices == gt[:, None])
    assert len(pos) > 50
    np.testing.assert_array_equal(r.topk_scores[pos[:, 0], pos[:, 1]], r.gt_score[pos[:, 0]])
    np.testing.assert_array_equal(pos[:, 1] + 1, r.gt_rank[pos[:, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_built_ties_follow_documented_policy(backend):
    # query (1, 0): each item's score is its first coordinate, exactly representable
    first = np.array([0.5, 1.0, 0.5, 0.25, 0.5, 1.0, 0.0], dtype=np.float32)
    gallery = np.stack([first, np.zeros_like(first)], axis=1)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    r = R.rank_text_to_image(query, gallery, [2], k=3, device="cpu", backend=backend)
    assert r.gt_rank.tolist() == [3]  # optimistic: only items 1 and 5 score strictly higher
    assert r.n_tied.tolist() == [2]  # items 0 and 4 tie with the GT (item 2 itself not counted)
    assert r.pessimistic_rank.tolist() == [5]
    assert r.gt_score.tolist() == [0.5]
    # top-3: descending score, ties by lower index; the tie {0, 2, 4} straddles the cut at 3
    assert r.topk_indices.tolist() == [[1, 5, 0]]
    assert r.topk_scores.tolist() == [[1.0, 1.0, 0.5]]
    assert r.tie_policy == R.TIE_POLICY == "optimistic"


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_images_make_ties_in_random_data(backend):
    txt, img, gt = _dataset(seed=3, n_images=60)
    img = img.copy()
    img[[7, 20, 41]] = img[13]  # three exact copies of image 13
    img[50:58] = img[2]  # a block of 9 identical images, big enough to straddle any top-k cut
    r = R.rank_text_to_image(txt, img, gt, k=5, device="cpu", backend=backend)
    S = _full_scores(txt, img)
    g = S[np.arange(len(gt)), gt]
    np.testing.assert_array_equal(r.gt_rank, 1 + (S > g[:, None]).sum(1))
    np.testing.assert_array_equal(r.n_tied, (S == g[:, None]).sum(1) - 1)
    for img_id, expected_ties in ((13, 3), (7, 3), (2, 8), (55, 8), (0, 0)):
        assert (r.n_tied[gt == img_id] == expected_ties).all()
    # top-k equals a stable descending sort of the full row (ties by lower index), cut at k
    np.testing.assert_array_equal(r.topk_indices, np.argsort(-S, axis=1, kind="stable")[:, :5])
    # some rows really had a tie straddling the cut at k
    straddle = (r.topk_indices[:, -1] >= 50) & (r.topk_indices[:, -1] < 57)
    assert straddle.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_heavily_tied_scores_equal_reference(backend, k):
    """Coarse embeddings ({-1, 0, 1} entries, plus zero rows) give scores with many exact ties."""
    rng = np.random.default_rng(7)
    img = rng.integers(-1, 2, size=(200, 6)).astype(np.float32)
    img[::17] = 0.0  # some all-zero images: score 0 (and -0.0 against negative entries is still == 0)
    gt = rng.integers(0, 200, size=700)
    txt = rng.integers(-1, 2, size=(700, 6)).astype(np.float32)
    S = _full_scores(txt, img)
    g = S[np.arange(len(gt)), gt]
    r = R.rank_text_to_image(txt, img, gt, k=k, device="cpu", backend=backend, chunk=300)
    np.testing.assert_array_equal(r.gt_rank, 1 + (S > g[:, None]).sum(1))
    np.testing.assert_array_equal(r.n_tied, (S == g[:, None]).sum(1) - 1)
    assert r.n_tied.mean() > 5  # the data really is full of ties
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(r.topk_indices, order)
    np.testing.assert_array_equal(r.topk_scores, np.take_along_axis(S, order, axis=1))


def test_identical_for_chunk_sizes_and_backends():
    txt, img, gt = _dataset(seed=1, n_images=520, caps=5, d=12)  # N = 2600: not a multiple of any chunk below
    assert len(gt) % R.MM_ROWS != 0
    base = R.rank_text_to_image(txt, img, gt, k=7, device="cpu")  # default chunk: one block per thread
    for chunk in (1, 100, R.MM_ROWS, 1000, 3 * R.MM_ROWS, 5000):
        for backend in BACKENDS:
            r = R.rank_text_to_image(txt, img, gt, k=7, device="cpu", chunk=chunk, backend=backend)
            for name in ("gt_rank", "n_tied", "gt_score", "gt_index", "topk_indices", "topk_scores"):
                np.testing.assert_array_equal(getattr(r, name), getattr(base, name), err_msg=f"{name} chunk={chunk}")


def test_small_query_batches_score_like_big_ones():
    """A query alone gives the same bits as inside a big batch.

    The GEMM shape is fixed by construction; that a row's position inside the block does not
    matter is the BLAS's behaviour (MKL here). Later stages that re-rank a subset of captions
    rely on it to reproduce evaluate's ranks exactly.
    """
    txt, img, gt = _dataset(seed=2)
    full = R.rank_text_to_image(txt, img, gt, k=10, device="cpu")
    for i in (0, 17, len(gt) - 1):
        one = R.rank_text_to_image(txt[i : i + 1], img, gt[i : i + 1], k=10, device="cpu")
        assert one.gt_score[0] == full.gt_score[i]
        np.testing.assert_array_equal(one.topk_scores[0], full.topk_scores[i])
        assert one.gt_rank[0] == full.gt_rank[i]


def test_score_rows_are_the_scores_rank_queries_compares():
    txt, img, gt = _dataset(seed=6, n_images=150)  # N = 750: a partial last block
    r = R.rank_text_to_image(txt, img, gt, k=5, device="cpu")
    S = R.score_rows(txt, img)
    assert S.shape == (750, 150) and S.dtype == np.float32
    np.testing.assert_array_equal(S[np.arange(len(gt)), gt], r.gt_score)
    np.testing.assert_array_equal(np.take_along_axis(S, r.topk_indices, axis=1), r.topk_scores)
    np.testing.assert_array_equal(1 + (S > r.gt_score[:, None]).sum(1), r.gt_rank)
    # a few rows alone give the same bits
    np.testing.assert_array_equal(R.score_rows(txt[100:103], img), S[100:103])


def _reference_i2t(img, txt, gt):
    """Plain reference for image-to-text: argsort each image's row; best rank over its captions."""
    S = _full_scores(img, txt)
    order = np.argsort(-S, axis=1, kind="stable")
    pos = np.argsort(order, axis=1) + 1  # pos[j, t] = rank of caption t for image j
    best = np.array([pos[j, gt == j].min() for j in range(len(img))])
    return S, order, best


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_to_text_equals_reference(backend):
    txt, img, gt = _dataset(seed=4, n_images=90, noise=3.0)
    S, order, best = _reference_i2t(img, txt, gt)
    r = R.rank_image_to_text(img, txt, gt, k=10, device="cpu", backend=backend, chunk=64)
    np.testing.assert_array_equal(r.gt_rank, best)
    assert (r.gt_rank > 1).any() and (r.gt_rank == 1).any()
    np.testing.assert_array_equal(r.topk_indices, order[:, :10])
    for K in (1, 5, 10):
        # a hit at K if any of the image's captions is among its top K
        hits = np.array([np.isin(order[j, :K], np.flatnonzero(gt == j)).any() for j in range(len(img))])
        assert r.recall_at(K) == pytest.approx(hits.mean())
    # gt_index is the best caption, and gt_score its score
    assert (gt[r.gt_index] == np.arange(len(img))).all()
    np.testing.assert_array_equal(r.gt_score, S[np.arange(len(img)), r.gt_index])
    np.testing.assert_array_equal(r.gt_score, np.array([S[j, gt == j].max() for j in range(len(img))]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_to_text_ties_between_own_captions(backend):
    # scores = first coordinate; image 0's captions are texts 0, 1, 2; texts 1 and 2 tie for its best
    first = np.array([0.25, 0.75, 0.75, 1.0, 0.75, 0.5], dtype=np.float32)
    txt = np.stack([first, np.zeros_like(first)], axis=1)
    text_image = np.array([0, 0, 0, 1, 1, 1])
    img = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    r = R.rank_image_to_text(img, txt, text_image, k=4, device="cpu", backend=backend)
    assert r.gt_rank[0] == 2  # only text 3 scores strictly higher than 0.75
    assert r.n_tied[0] == 1  # text 4 (another image's caption) ties; text 2, its own, does not count
    assert r.gt_index[0] == 1  # the lowest-index caption at the best score
    assert r.topk_indices[0].tolist() == [3, 1, 2, 4]
    # image 1 scores 0 against every text: rank 1, its best caption is text 3 (lowest index), and the
    # 3 captions of image 0 are the non-GT ties
    assert (r.gt_rank[1], r.n_tied[1], r.gt_index[1]) == (1, 3, 3)


def test_k_larger_than_gallery_and_empty_queries():
    txt, img, gt = _dataset(n_images=4, caps=2)
    r = R.rank_text_to_image(txt, img, gt, k=10, device="cpu")
    assert r.topk_indices.shape == (8, 4)
    np.testing.assert_array_equal(np.sort(r.topk_indices, axis=1), np.tile(np.arange(4), (8, 1)))
    empty = R.rank_text_to_image(txt[:0], img, gt[:0], device="cpu")
    assert empty.gt_rank.shape == (0,) and np.isnan(empty.recall_at(1))


def test_bad_inputs_are_refused():
    txt, img, gt = _dataset(n_images=10, caps=2)
    with pytest.raises(ValueError, match="dim"):
        R.rank_text_to_image(txt[:, :5], img, gt, device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        R.rank_text_to_image(txt, img, np.where(gt == 3, 10, gt), device="cpu")
    bad = txt.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        R.rank_text_to_image(bad, img, gt, device="cpu")
    with pytest.raises(ValueError, match="no ground-truth"):
        R.rank_image_to_text(img, txt[:4], gt[:4], device="cpu")  # images 2..9 have no caption left


def test_recall_at_k_and_device():
    assert R.recall_at_k([1, 2, 6, 11], 5) == 0.5
    assert resolve_device("cpu", auto_mps=False) == "cpu"
    assert resolve_device("auto", auto_mps=False) == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    txt, img, gt = _dataset(seed=5)
    a = R.rank_text_to_image(txt, img, gt, device="cpu")
    b = R.rank_text_to_image(txt, img, gt, device="cuda")
    np.testing.assert_array_equal(a.gt_rank, b.gt_rank)
    np.testing.assert_array_equal(a.topk_indices, b.topk_indices)
    np.testing.assert_allclose(a.gt_score, b.gt_score, atol=1e-5)
