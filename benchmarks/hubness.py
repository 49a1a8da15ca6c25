"""QB-Norm benchmark (issue 17): QB-Norm with the Dynamic Inverted Softmax against evaluate's ranking.

25,000 captions x 5,000 images, random L2-normalised 512-d vectors, a bank of 5,000 other random
unit vectors (beta 20, k-bank 1). Times `toolkit.improve.transforms.rank_qb_norm` (the bank pass and the
query pass, exact ranks against the whole gallery) and `toolkit.retrieval.ranking.rank_text_to_image`
(what `clipfail evaluate` runs: ranks, ties, top-10), alternately, `--repeats` times each, and
prints the ratio of the best times (target: at most 3x) and the median of per-pair ratios.
Inverted softmax (normaliser over the 25,000 queries) and query expansion (top 3, alpha 0.5) are
timed once each for scale.

Peak memory: each method once in a fresh subprocess, measured as in benchmarks/retrieval.py
(VmHWM after resetting the peak mark, minus the RSS at entry: what the call allocated, inputs
excluded).

    python benchmarks/hubness.py [--repeats 3] [--n 25000] [--m 5000] [--bank 5000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval import PeakRss  # noqa: E402  (benchmarks/retrieval.py)

from toolkit.improve import transforms as H  # noqa: E402
from toolkit.retrieval import ranking as R  # noqa: E402

MB = 1024 * 1024


def make_data(n: int, m: int, bank: int, d: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unit(rows):
        x = torch.randn(rows, d, generator=g)
        return (x / x.norm(dim=1, keepdim=True)).numpy()

    txt, img, bnk = unit(n), unit(m), unit(bank)
    gt = np.arange(n, dtype=np.int64) * m // n
    return txt, img, bnk, gt


def run(kind: str, txt, img, bnk, gt):
    if kind == "evaluate":
        return R.rank_text_to_image(txt, img, gt, k=10, device="cpu").gt_rank
    if kind == "qb-norm":
        return H.rank_qb_norm(txt, img, gt, bnk, beta=20.0, k_bank=1).gt_rank
    if kind == "inverted-softmax":
        return H.rank_inverted_softmax(txt, img, gt, txt, beta=20.0).gt_rank
    if kind == "query-expansion":
        return H.rank_query_expansion(txt, img, gt, top=3, alpha=0.5).gt_rank
    raise ValueError(kind)


def worker(kind: str, n: int, m: int, bank: int) -> dict:
    data = make_data(n, m, bank)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        run(kind, *data)
        seconds = time.perf_counter() - t0
    return {"kind": kind, "seconds": seconds, "peak_bytes": mem.peak_bytes, "method": mem.method}


def in_subprocess(kind: str, n: int, m: int, bank: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--m", str(m), "--bank", str(bank)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=25_000)
    ap.add_argument("--m", type=int, default=5_000)
    ap.add_argument("--bank", type=int, default=5_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.m, args.bank)))
        return
    print(f"torch threads: {torch.get_num_threads()}; {args.n} queries x {args.m} images x 512-d, bank {args.bank}")
    data = make_data(args.n, args.m, args.bank)
    ev, qb = [], []
    for _ in range(args.repeats):
        for kind, times in (("evaluate", ev), ("qb-norm", qb)):
            t0 = time.perf_counter()
            run(kind, *data)
            times.append(time.perf_counter() - t0)
    ratios = [q / e for q, e in zip(qb, ev)]
    print(f"evaluate ranking : best {min(ev):.2f} s  (all: {', '.join(f'{t:.2f}' for t in ev)})")
    print(f"qb-norm (DIS)    : best {min(qb):.2f} s  (all: {', '.join(f'{t:.2f}' for t in qb)})")
    ratio = min(qb) / min(ev)
    print(f"ratio qb-norm / evaluate: {ratio:.2f}x (best times), median per pair {statistics.median(ratios):.2f}x")
    print(f"target <= 3x: {'OK' if ratio <= 3 else 'MISSED'}")
    for kind in ("inverted-softmax", "query-expansion"):
        t0 = time.perf_counter()
        run(kind, *data)
        print(f"{kind:17s}: {time.perf_counter() - t0:.2f} s (once)")
    for kind in ("evaluate", "qb-norm", "inverted-softmax", "query-expansion"):
        r = in_subprocess(kind, args.n, args.m, args.bank)
        print(f"peak memory {kind:17s}: {r['peak_bytes'] / MB:8.1f} MB  ({r['seconds']:.2f} s, {r['method']})")


if __name__ == "__main__":
    main()
