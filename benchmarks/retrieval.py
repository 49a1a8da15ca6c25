"""Retrieval-rank benchmark on random L2-normalised 512-d embeddings (issue #4).

1. 25,000 texts x 5,000 images: the time of `rank_text_to_image` (ranks, ties, GT scores, top-10)
   against ONE bare `torch.mm(texts, images.T)` of the same shapes, the FLOP floor.
   Target: at most 1.5x the bare matmul. The two are timed alternately in one process, `--repeats`
   times each; the ratio is reported from the best (min) times and as the median of per-pair ratios.
   Peak memory target: under 1 GB.
2. 250,000 texts x 50,000 images (chunked): throughput (queries/s) and peak memory. `--large-n`
   runs fewer queries; the full-size time is then extrapolated linearly and labelled as such.
   For scale it also times the GEMMs alone on the first 25,000 queries (as rank_queries issues them,
   and as one multi-threaded torch.mm per block).

How memory is measured: each memory figure comes from a fresh subprocess, so allocator caches of
earlier runs cannot hide anything. After the inputs exist, the process resets its peak-RSS mark
(writing 5 to /proc/self/clear_refs) and reads its RSS; after the call it reads VmHWM (peak RSS).
"Peak" is VmHWM minus that baseline: everything the call allocated, outputs included, inputs
excluded. Where clear_refs is not available a 1 ms RSS sampler thread is used instead.

    python benchmarks/retrieval.py [--repeats 5] [--large-n 250000] [--skip-large]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.retrieval import ranking as R  # noqa: E402

MB = 1024 * 1024


def make_data(n: int, m: int, d: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(n, d, generator=g)
    txt /= txt.norm(dim=1, keepdim=True)
    img = torch.randn(m, d, generator=g)
    img /= img.norm(dim=1, keepdim=True)
    gt = np.arange(n, dtype=np.int64) * m // n  # ~n/m captions per image, every image used
    return txt, img, gt


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """Peak RSS increase over the RSS at entry (bytes): VmHWM after clear_refs, or a sampler thread."""

    def __enter__(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "1 ms RSS sampler"
        self.base = _status_kb("VmRSS")
        self.sampled = self.base
        self._stop = threading.Event()
        if self.method != "VmHWM after clear_refs":
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        if self.method == "VmHWM after clear_refs":
            peak = _status_kb("VmHWM")
        else:
            self._t.join()
            peak = self.sampled
        self.peak_bytes = (peak - self.base) * 1024
        return False


def worker(kind: str, n: int, m: int, chunk: int) -> dict:
    """One measured call in this (fresh) process: 'rank' or 'mm'."""
    txt, img, gt = make_data(n, m)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        if kind == "rank":
            res = R.rank_text_to_image(txt, img, gt, k=10, chunk=chunk, device="cpu")
            extra = {"r_at_1": res.recall_at(1), "r_at_10": res.recall_at(10)}
        else:
            torch.mm(txt, img.T)
            extra = {}
        seconds = time.perf_counter() - t0
    return {
        "kind": kind,
        "n": n,
        "m": m,
        "seconds": seconds,
        "peak_bytes": mem.peak_bytes,
        "method": mem.method,
    } | extra


def in_subprocess(kind: str, n: int, m: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--m", str(m)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gemm_floor_seconds(txt, img) -> tuple[float, float]:
    """The GEMMs alone, two ways: (1) as rank_queries issues them on CPU (one task per 512-row
    block, one torch thread per task, a thread pool of torch's thread count); (2) one
    multi-threaded torch.mm per 512-row block, in sequence."""
    n, d = txt.shape
    m = img.shape[0]
    gt_ = img.T
    threads = torch.get_num_threads()
    bufs = [(torch.empty((R.MM_ROWS, d)), torch.empty((R.MM_ROWS, m))) for _ in range(threads)]

    def task(i: int, b: int) -> None:
        q, s = bufs[i % threads]
        bn = min(R.MM_ROWS, n - b)
        q[:bn].copy_(txt[b : b + bn])
        torch.mm(q, gt_, out=s)

    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            starts = list(range(0, n, R.MM_ROWS))
            for i in range(0, len(starts), threads):  # one block per thread at a time, like rank_queries
                list(pool.map(task, range(threads), starts[i : i + threads]))
        pooled = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    q, s = bufs[0]
    t0 = time.perf_counter()
    for b in range(0, n, R.MM_ROWS):
        bn = min(R.MM_ROWS, n - b)
        q[:bn].copy_(txt[b : b + bn])
        torch.mm(q, gt_, out=s)
    return pooled, time.perf_counter() - t0


def part1(repeats: int, chunk: int) -> None:
    n, m = 25_000, 5_000
    print(
        f"== {n:,} texts x {m:,} images, d=512, top-10, chunk={chunk or 'default'}, {torch.get_num_threads()} threads"
    )
    txt, img, gt = make_data(n, m)
    R.rank_text_to_image(txt[:2000], img, gt[:2000], device="cpu")  # warm-up
    torch.mm(txt[:2000], img.T)
    t_mm, t_rank = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(txt, img.T)
        t_mm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = R.rank_text_to_image(txt, img, gt, k=10, chunk=chunk, device="cpu")
        t_rank.append(time.perf_counter() - t0)
    pair = [r / b for r, b in zip(t_rank, t_mm)]
    print(f"bare torch.mm       : min {min(t_mm):.3f} s, median {statistics.median(t_mm):.3f} s")
    print(f"rank_text_to_image  : min {min(t_rank):.3f} s, median {statistics.median(t_rank):.3f} s")
    print(
        f"ratio rank / bare mm: {min(t_rank) / min(t_mm):.2f}x (best times), "
        f"{statistics.median(pair):.2f}x (median of {repeats} paired runs)   [target <= 1.5x]"
    )
    print(
        f"(random data: R@1 {res.recall_at(1):.5f}, R@10 {res.recall_at(10):.5f}, chance ~ {1 / m:.5f}, {10 / m:.5f})"
    )
    del txt, img
    gc.collect()
    mem_rank = in_subprocess("rank", n, m, chunk)
    mem_mm = in_subprocess("mm", n, m, chunk)
    print(
        f"peak memory (RSS increase, fresh process, {mem_rank['method']}): rank {mem_rank['peak_bytes'] / MB:.0f} MiB "
        f"[target < 1 GB]; bare mm {mem_mm['peak_bytes'] / MB:.0f} MiB (its {n}x{m} float32 output alone is "
        f"{n * m * 4 / MB:.0f} MiB)"
    )


def part2(large_n: int, chunk: int) -> None:
    n_full, m = 250_000, 50_000
    n = min(large_n, n_full)
    print(f"\n== {n:,} texts x {m:,} images, d=512, top-10, chunk={chunk or 'default'} (fresh process)")
    r = in_subprocess("rank", n, m, chunk)
    qps = n / r["seconds"]
    print(f"time {r['seconds']:.1f} s, throughput {qps:,.0f} queries/s, peak memory {r['peak_bytes'] / MB:.0f} MiB")
    if n < n_full:
        print(f"EXTRAPOLATED (linear in N) to {n_full:,} queries: {n_full / qps:.0f} s")
    txt, img, _ = make_data(min(n, 25_000), m)
    pooled, sequential = gemm_floor_seconds(txt, img)
    for label, sec in (
        ("as rank_queries issues them (pool, 1 thread each)", pooled),
        ("multi-threaded, per block", sequential),
    ):
        print(
            f"GEMMs alone, {label}, first {len(txt):,} queries: {len(txt) / sec:,.0f} queries/s "
            f"-> full ranking reaches {qps / (len(txt) / sec):.2f} of that"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None, help="default: rank_queries' own (one block per thread)")
    ap.add_argument("--large-n", type=int, default=250_000, help="queries for the 50,000-image run")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--worker", choices=["rank", "mm"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.m, args.chunk)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    part1(args.repeats, args.chunk)
    if not args.skip_large:
        part2(args.large_n, args.chunk)


if __name__ == "__main__":
    main()
