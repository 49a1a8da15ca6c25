"""Exact retrieval ranks, top-k and Recall@K, computed in chunks of queries with bounded memory.

The score of a query against a gallery item is the float32 dot product that `torch.mm` computes
(the cosine similarity when both sides are L2-normalised, as CLIP embeddings are). Queries are
processed `chunk` rows at a time, so the working memory is about `chunk x M x 4` bytes (the float32
score blocks), plus small per-thread buffers, whatever the number of queries N. The default
(chunk=None) is one 512-row block per CPU thread on CPU, and as many blocks as fit in
AUTO_CHUNK_BYTES (1 GiB) of scores on CUDA; on CPU it is capped by that too.

Definitions (all computed from the SAME score block, never from a separate dot product, so the
comparisons below are consistent with each other bit for bit):

- GT score: the score of the query's ground-truth item, read from the computed score row. With
  several ground-truth items (image-to-text: an image has several captions) it is the best of them,
  and `gt_index` is that caption (the lowest gallery index if several GT items share the best score).
- `gt_rank` (tie policy "optimistic"): 1 + the number of gallery items whose score is STRICTLY
  higher than the GT score. Rank 1 is best. An item tied with the GT score does not push it down.
  With several GT items this is the best rank among them (no other GT item can score strictly
  higher than the best one), which is how CLIP papers score image-to-text retrieval: a hit at K if
  any of the image's captions is in the top K.
- `n_tied`: the number of NON-ground-truth gallery items whose score is exactly equal to the GT
  score. `gt_rank + n_tied` is the pessimistic rank: the worst position at which the (first)
  ground-truth item could appear under an adversarial ordering of ties.
- Recall@K = mean(gt_rank <= K) (optimistic ranks).
- Top-k: the k highest scores of the row, in descending score order; among equal scores the lower
  gallery index comes first. That rule also decides which tied items make it into the top-k when a
  tie straddles position k, so the output is fully deterministic. It equals a stable descending
  sort of the full row, truncated to k.

Exactness: comparisons are exact IEEE float32 comparisons of the computed scores, so the ranks,
ties and top-k agree with each other and with a full-matrix reference that uses the same scores.
A BLAS does not promise the same rounding for every matrix shape: MKL, for one, rounds a product
with fewer than 12 query rows differently in the last bit. So the GEMM is always issued in blocks
of exactly MM_ROWS query rows, aligned at multiples of MM_ROWS (the last block zero-padded), and
`chunk` (rows scored together, which bounds memory) is rounded up to a multiple of MM_ROWS. A
query's scores therefore come from an identical BLAS call whatever the chunk size, and chunking
cannot change a score, a rank or a tie. Another BLAS or device may still round a score differently
in the last bit (about 1e-7), which can only swap items whose scores are that close.

On CPU the counts and the top-k run in NumPy on threads, in cache-sized row blocks (see
`_NumpyRows`); on CUDA everything stays in torch on the device (torch.topk, then a stable re-sort).
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

TIE_POLICY = "optimistic"
TIE_POLICY_DOC = (
    "optimistic: gt_rank = 1 + #items scoring strictly higher than the GT score; n_tied = #non-GT items "
    "with exactly the GT score (pessimistic rank = gt_rank + n_tied); top-k ties broken by lower index"
)
AUTO_CHUNK_BYTES = 1 << 30  # cap on the score blocks held at once when chunk=None
MM_ROWS = 512  # query rows per GEMM call (fixed; see "Exactness" above)


@dataclass
class RankResult:
    """Per-query results, one row per query (numpy arrays)."""

    gt_rank: np.ndarray  # int64 (N,), optimistic rank, 1 = best
    n_tied: np.ndarray  # int64 (N,), non-GT items with exactly the GT score
    gt_score: np.ndarray  # float32 (N,)
    gt_index: np.ndarray  # int64 (N,), gallery index of the (best) GT item
    topk_indices: np.ndarray  # int64 (N, k)
    topk_scores: np.ndarray  # float32 (N, k)
    tie_policy: str = TIE_POLICY

    @property
    def pessimistic_rank(self) -> np.ndarray:
        return self.gt_rank + self.n_tied

    def recall_at(self, k: int) -> float:
        return recall_at_k(self.gt_rank, k)


def recall_at_k(gt_rank, k: int) -> float:
    """Recall@K = mean(rank <= K); NaN for no queries."""
    gt_rank = np.asarray(gt_rank)
    if gt_rank.size == 0:
        return float("nan")
    return float(np.mean(gt_rank <= k))


def _torch_device(device: str | torch.device = "auto") -> torch.device:
    """`toolkit.embed.devices.resolve_device` (the one device resolver) as a torch.device: 'auto' picks cuda
    when available, else cpu (never mps: ranks stay on the CPU on a Mac); a device that is unavailable
    or unknown is a UserError."""
    from toolkit.embed.devices import resolve_device as _resolve

    return torch.device(_resolve(device, auto_mps=False))


def _as_2d(x, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dim), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    return t


def _check_finite(t: torch.Tensor, name: str, step: int = 1 << 14) -> None:
    for s in range(0, t.shape[0], step):
        if not bool(torch.isfinite(t[s : s + step]).all()):
            raise ValueError(f"{name} contains NaN or infinite values")


def _descending_keys(vals: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the descending order of the float32 values (-0.0 == 0.0)."""
    bits = (vals + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0
    mono = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))  # order-preserving map to uint32
    return ~mono


class _NumpyRows:
    """CPU statistics of a block of score rows in NumPy, a cache-sized sub-block at a time.

    NumPy's comparisons and byte sums are several times faster than torch's broadcasting ones on
    this kind of CPU, its ufuncs release the GIL, and the top-k below avoids torch.topk's per-row
    overhead.

    Counts: bytes of `x > g` and `x == g`, summed per row.

    Top-k: split each row into k column ranges; every range's maximum is >= tau, the smallest of
    those k maxima, so at least k scores are >= tau, and the top-k (ties included) are among the
    scores >= tau. Those few candidates (about 3k per row on random data) are sorted by (row,
    descending score, ascending index) and the first k of each row are taken. That is exactly a
    stable descending sort of the row cut at k, with no special case for ties at the cut.
    """

    def __init__(self, n_cols: int, k: int):
        self.M, self.k = n_cols, k
        self.block = max(8, (4 << 20) // (4 * n_cols))  # ~4 MB of scores per sub-block
        # the counts are sums of 0/1 bytes; uint16 is enough (and faster) below 65536 columns
        self.sum_dtype = np.uint16 if n_cols < 65536 else np.int64
        self.bounds = [(i * n_cols) // k for i in range(k + 1)]  # k non-empty column ranges (k <= M)

    def new_buffer(self) -> np.ndarray:
        return np.empty((self.block, self.M), dtype=bool)

    def _topk(self, x: np.ndarray, b: np.ndarray, tv: np.ndarray, ti: np.ndarray) -> None:
        r, M, k = x.shape[0], self.M, self.k
        maxima = np.empty((r, k), dtype=np.float32)
        for j in range(k):
            np.max(x[:, self.bounds[j] : self.bounds[j + 1]], axis=1, out=maxima[:, j])
        tau = maxima.min(axis=1)
        np.greater_equal(x, tau[:, None], out=b)
        flat = np.flatnonzero(b)  # row-major: by row, then ascending column
        rows, cols = np.divmod(flat, M)
        vals = x.reshape(-1)[flat]
        key = (rows.astype(np.uint64) << np.uint64(32)) | _descending_keys(vals).astype(np.uint64)
        order = np.argsort(key, kind="stable")  # stable: equal scores keep ascending column order
        starts = np.searchsorted(rows, np.arange(r))  # first candidate of each row (rows is sorted)
        take = order[starts[:, None] + np.arange(k)]
        ti[:] = cols[take]
        tv[:] = vals[take]

    def __call__(self, S: np.ndarray, g: np.ndarray, n_gt, n_eq, tv, ti, buf: np.ndarray) -> None:
        """Fill n_gt, n_eq (counts against g) and tv, ti (ordered top-k) for the rows of S."""
        for s in range(0, S.shape[0], self.block):
            e = min(s + self.block, S.shape[0])
            x, gg, b = S[s:e], g[s:e, None], buf[: e - s]
            u8 = b.view(np.uint8)
            np.greater(x, gg, out=b)
            n_gt[s:e] = np.add.reduce(u8, axis=1, dtype=self.sum_dtype)
            np.equal(x, gg, out=b)
            n_eq[s:e] = np.add.reduce(u8, axis=1, dtype=self.sum_dtype)
            self._topk(x, b, tv[s:e], ti[s:e])


def _order_topk(S: torch.Tensor, vals_all: torch.Tensor, idx_all: torch.Tensor, k: int):
    """From the k(+1) largest scores of each row (sorted by value), the deterministic top-k.

    Descending score, ties broken by lower index (= a stable descending sort of the row, cut at k).
    """
    vals, idx = vals_all[:, :k], idx_all[:, :k]
    # put equal scores in index order: sort by index, then stable sort by score (descending)
    idx, perm = torch.sort(idx, dim=1)
    vals = torch.gather(vals, 1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    idx = torch.gather(idx, 1, perm)
    if vals_all.shape[1] > k:
        # a tie straddling position k: which tied items get in is not defined by topk, so redo
        # those (rare) rows with a full stable sort
        boundary = torch.nonzero(vals_all[:, k - 1] == vals_all[:, k]).flatten()
        if boundary.numel():
            sv, si = torch.sort(S[boundary], dim=1, descending=True, stable=True)
            vals[boundary] = sv[:, :k]
            idx[boundary] = si[:, :k]
    return vals, idx


def rank_queries(
    queries,
    gallery,
    gt_indptr,
    gt_indices,
    *,
    k: int = 10,
    chunk: int | None = None,
    device: str | torch.device = "auto",
    progress: bool | None = False,
    desc: str = "ranking",
    backend: str | None = None,
) -> RankResult:
    """Rank every query's ground-truth item(s) against the whole gallery.

    queries: N x d, gallery: M x d (float; cast to float32 a chunk at a time).
    Ground truth in CSR form: query i's GT gallery indices are gt_indices[gt_indptr[i]:gt_indptr[i+1]]
    (at least one each). See the module docstring for the exact definitions and tie policy.
    """
    Q = _as_2d(queries, "queries")
    G = _as_2d(gallery, "gallery")
    N, d = Q.shape
    M = G.shape[0]
    if G.shape[1] != d:
        raise ValueError(f"queries have dim {d} but gallery has dim {G.shape[1]}")
    if M == 0:
        raise ValueError("the gallery is empty")
    if k < 1:
        raise ValueError("k must be >= 1")
    if chunk is not None and chunk < 1:
        raise ValueError("chunk must be >= 1")
    indptr = np.asarray(gt_indptr, dtype=np.int64)
    indices = np.asarray(gt_indices, dtype=np.int64)
    if indptr.shape != (N + 1,) or indptr[0] != 0 or indptr[-1] != len(indices):
        raise ValueError("gt_indptr must have N+1 entries, start at 0 and end at len(gt_indices)")
    counts = np.diff(indptr)
    if (counts < 1).any():
        raise ValueError(f"{int((counts < 1).sum())} queries have no ground-truth item")
    if len(indices) and (indices.min() < 0 or indices.max() >= M):
        raise ValueError(f"ground-truth indices must be in [0, {M})")
    _check_finite(Q, "queries")
    _check_finite(G, "gallery")

    dev = _torch_device(device)
    k = min(k, M)
    Gt = G.to(dev, torch.float32).T  # d x M view; no copy when already float32 on dev
    indices_t = torch.from_numpy(indices).to(dev)

    out = RankResult(
        gt_rank=np.empty(N, dtype=np.int64),
        n_tied=np.empty(N, dtype=np.int64),
        gt_score=np.empty(N, dtype=np.float32),
        gt_index=np.empty(N, dtype=np.int64),
        topk_indices=np.empty((N, k), dtype=np.int64),
        topk_scores=np.empty((N, k), dtype=np.float32),
    )
    if N == 0:
        return out

    if backend is None:
        backend = "numpy" if dev.type == "cpu" else "torch"
    if backend not in ("numpy", "torch") or (backend == "numpy" and dev.type != "cpu"):
        raise ValueError(f"backend {backend!r} does not run on device {dev}")
    gt = _GroundTruth(indices_t, indptr, counts, M)
    # rows scored at the same time: `chunk` rounded up to whole GEMM blocks, at most all queries
    n_blocks = -(-N // MM_ROWS)
    if chunk is None:
        fit = max(1, AUTO_CHUNK_BYTES // (MM_ROWS * M * 4))
        blocks_at_once = min(fit, torch.get_num_threads()) if dev.type == "cpu" else fit
    else:
        blocks_at_once = -(-chunk // MM_ROWS)
    blocks_at_once = min(n_blocks, max(1, blocks_at_once))
    bar = None
    if progress is not False:
        from toolkit.progress import progress as _progress

        bar = _progress(total=N, desc=desc, unit="query", enabled=progress)
    try:
        with torch.inference_mode():
            if backend == "numpy":
                _rank_cpu(Q, Gt, gt, out, k, blocks_at_once, bar)
            else:
                _rank_torch(Q, Gt, gt, out, k, blocks_at_once, bar)
    finally:
        if bar is not None:
            bar.close()
    return out


class _GroundTruth:
    """Reads each query's GT score from its computed score row (best GT item when there are several)."""

    def __init__(self, indices: torch.Tensor, indptr: np.ndarray, counts: np.ndarray, M: int):
        self.indices, self.indptr, self.counts, self.M = indices, indptr, counts, M
        self.single = bool((counts == 1).all())

    def __call__(self, S: torch.Tensor, s: int, e: int):
        """For rows s..e (S = their scores): GT score, GT index, and how many GT items have that score."""
        c, dev, M = e - s, S.device, self.M
        ar = torch.arange(c, device=dev)
        if self.single:
            gidx = self.indices[s:e]
            return S[ar, gidx], gidx, torch.ones(c, dtype=torch.int64, device=dev)
        lo, hi = int(self.indptr[s]), int(self.indptr[e])
        cols = self.indices[lo:hi]
        rows = torch.repeat_interleave(ar, torch.from_numpy(self.counts[s:e]).to(dev))
        v = S[rows, cols]
        g = torch.full((c,), -torch.inf, device=dev).scatter_reduce(0, rows, v, "amax")
        at_best = v == g[rows]
        cand = torch.where(at_best, cols, torch.full_like(cols, M))
        gidx = torch.full((c,), M, dtype=torch.int64, device=dev).scatter_reduce(0, rows, cand, "amin")
        n_at_best = torch.zeros(c, dtype=torch.int64, device=dev).scatter_add(0, rows, at_best.to(torch.int64))
        return g, gidx, n_at_best


def _scores(Q: torch.Tensor, Gt: torch.Tensor, b: int, q_buf: torch.Tensor, s_out: torch.Tensor) -> int:
    """Scores of queries b .. b+MM_ROWS into s_out (MM_ROWS x M): always the same GEMM shape and
    row alignment (the last block zero-padded), so chunking cannot change a score. Returns the
    number of real rows."""
    n = min(MM_ROWS, Q.shape[0] - b)
    q_buf[:n].copy_(Q[b : b + n])
    if n < MM_ROWS:
        q_buf[n:].zero_()
    torch.mm(q_buf, Gt, out=s_out)
    return n


def _store(out: RankResult, s: int, e: int, g, gidx, n_at_best) -> None:
    out.gt_rank[s:e] += 1  # held the count of strictly higher scores
    out.n_tied[s:e] -= n_at_best.cpu().numpy()  # held the count of equal scores, GT items included
    out.gt_score[s:e] = g.cpu().numpy()
    out.gt_index[s:e] = gidx.cpu().numpy()


def _rank_cpu(Q, Gt, gt: _GroundTruth, out: RankResult, k: int, blocks_at_once: int, bar) -> None:
    """CPU: independent tasks of one GEMM block each, on `blocks_at_once` (<= torch threads) threads.

    Each task runs its GEMM on one thread, then its NumPy statistics on the rows it just computed.
    Threads never wait for each other (no barrier between the GEMM and the statistics, and no
    spinning OpenMP team competing with NumPy), which is what makes this path fast on few cores.
    torch's thread count is set to 1 for the duration and restored afterwards.
    """
    d, M = Gt.shape
    N = Q.shape[0]
    workers = max(1, min(blocks_at_once, torch.get_num_threads()))
    stats = _NumpyRows(M, k)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        free.put((torch.empty((MM_ROWS, d)), torch.empty((MM_ROWS, M)), stats.new_buffer()))

    def task(b: int) -> int:
        q_buf, s_buf, bool_buf = free.get()
        try:
            with torch.inference_mode():
                n = _scores(Q, Gt, b, q_buf, s_buf)
                e = b + n
                S = s_buf[:n]
                g, gidx, n_at_best = gt(S, b, e)
                counts_and_topk = (out.gt_rank[b:e], out.n_tied[b:e], out.topk_scores[b:e], out.topk_indices[b:e])
                stats(S.numpy(), g.numpy(), *counts_and_topk, bool_buf)
                _store(out, b, e, g, gidx, n_at_best)
            return n
        finally:
            free.put((q_buf, s_buf, bool_buf))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for fut in [pool.submit(task, b) for b in range(0, N, MM_ROWS)]:
                n = fut.result()
                if bar is not None:
                    bar.update(n)
    finally:
        torch.set_num_threads(threads)


def _rank_torch(Q, Gt, gt: _GroundTruth, out: RankResult, k: int, blocks_at_once: int, bar) -> None:
    """torch on the device (CUDA): chunks of `blocks_at_once` GEMM blocks; torch.topk, then a stable re-sort."""
    d, M = Gt.shape
    N, dev = Q.shape[0], Gt.device
    rows_per = blocks_at_once * MM_ROWS
    s_buf = torch.empty((rows_per, M), dtype=torch.float32, device=dev)
    q_buf = torch.empty((MM_ROWS, d), dtype=torch.float32, device=dev)
    kk = min(k + 1, M)
    for s in range(0, N, rows_per):
        e = min(s + rows_per, N)
        for b in range(s, e, MM_ROWS):
            _scores(Q, Gt, b, q_buf, s_buf[b - s : b - s + MM_ROWS])
        S = s_buf[: e - s]
        g, gidx, n_at_best = gt(S, s, e)
        gcol = g[:, None]
        out.gt_rank[s:e] = (S > gcol).sum(1).cpu().numpy()
        out.n_tied[s:e] = (S == gcol).sum(1).cpu().numpy()
        vals_all, idx_all = torch.topk(S, kk, dim=1, largest=True, sorted=True)
        tv, ti = _order_topk(S, vals_all, idx_all, k)
        out.topk_scores[s:e] = tv.cpu().numpy()
        out.topk_indices[s:e] = ti.cpu().numpy()
        _store(out, s, e, g, gidx, n_at_best)
        if bar is not None:
            bar.update(e - s)


def score_rows(queries, gallery, device: str | torch.device = "cpu") -> np.ndarray:
    """The float32 score matrix (N x M) of queries against the gallery, bit for bit the scores that
    `rank_queries` compares (same GEMM blocks, issued the same way on the same device).

    For later stages that re-score some queries (a subset of captions, prompt variants) and need
    exactly the ranks evaluate stored. Memory is N x M x 4 bytes: pass a few thousand rows at a time.
    """
    Q = _as_2d(queries, "queries")
    G = _as_2d(gallery, "gallery")
    dev = _torch_device(device)
    Gt = G.to(dev, torch.float32).T
    N, d = Q.shape
    M = G.shape[0]
    out = torch.empty((-(-N // MM_ROWS) * MM_ROWS, M), dtype=torch.float32, device=dev)
    starts = range(0, N, MM_ROWS)
    with torch.inference_mode():
        if dev.type != "cpu":
            q_buf = torch.empty((MM_ROWS, d), device=dev)
            for b in starts:
                _scores(Q, Gt, b, q_buf, out[b : b + MM_ROWS])
            return out[:N].cpu().numpy()
        threads = torch.get_num_threads()
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            free.put(torch.empty((MM_ROWS, d)))

        def task(b: int) -> None:
            q_buf = free.get()
            try:
                with torch.inference_mode():
                    _scores(Q, Gt, b, q_buf, out[b : b + MM_ROWS])
            finally:
                free.put(q_buf)

        torch.set_num_threads(1)  # as in _rank_cpu: one single-threaded GEMM per block
        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(task, starts))
        finally:
            torch.set_num_threads(threads)
    return out[:N].numpy()


def rank_text_to_image(text_emb, image_emb, text_gt_image, **kw) -> RankResult:
    """Each text (row of text_emb) against all images; text i's GT is image row text_gt_image[i]."""
    gt = np.asarray(text_gt_image, dtype=np.int64)
    n = len(gt)
    return rank_queries(text_emb, image_emb, np.arange(n + 1, dtype=np.int64), gt, **kw)


def image_to_text_gt(text_gt_image, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ground truth for image-to-text: image j's GTs are the text rows whose image is j (ascending)."""
    gt = np.asarray(text_gt_image, dtype=np.int64)
    order = np.argsort(gt, kind="stable")
    counts = np.bincount(gt, minlength=n_images)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, order.astype(np.int64)


def rank_image_to_text(image_emb, text_emb, text_gt_image, **kw) -> RankResult:
    """Each image against all texts; a hit at K if any of its captions is in its top K.

    Its rank is the best rank among its captions; gt_index is that caption's text row. Every image
    must have at least one caption (drop caption-less images before calling).
    """
    n_images = _as_2d(image_emb, "image_emb").shape[0]
    indptr, indices = image_to_text_gt(text_gt_image, n_images)
    return rank_queries(image_emb, text_emb, indptr, indices, **kw)
