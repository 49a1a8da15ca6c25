"""`clipfail embed --engine ray` against `--engine local` (issue 19), on this machine.

Writes N photo-like 640x480 JPEGs with 5 captions each (benchmarks/embed_pipeline.py's data), ingests
them once, and embeds them with the packaged tiny model:

- local: `--engine local` (this process; decode workers as the stage picks them);
- ray, 1 CPU actor and 2 CPU actors: `--engine ray --workers 1|2` on a local Ray instance
  (`ray.init(num_cpus=<cores>)`, started once and NOT counted: a cluster is started once and serves
  many runs). Each Ray run includes starting its actor pools and loading the model in each actor.

Each run goes into a fresh copy of the ingested database (so nothing is reused) and is timed from the
call to its return (planning, computing, the final files and the registration). Prints a Markdown
table: seconds, images per second of that whole stage (its images over its seconds, which include
the captions, model loads and registration: not the image part's own throughput), and the ratio to
local; and checks that every run's arrays equal local's within 1e-5.

    python benchmarks/ray_engine.py [--n 2000] [--repeat 1] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_pipeline import ingest, make_coco  # noqa: E402


def arrays(db_path: str) -> dict:
    from toolkit.store import artifacts
    from toolkit.store.study import open_study

    con = open_study(db_path, read_only=True)
    try:
        df = con.execute("SELECT embedding_set_id, kind FROM embedding_sets").df()
        return {r.kind: artifacts.load_embedding_set(con, int(r.embedding_set_id)).array for r in df.itertuples()}
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--data", default=None, help="Folder for the generated images (kept; default: a temp folder).")
    args = ap.parse_args()

    import numpy as np
    import ray

    from toolkit.embed.stage import embed

    tmp = Path(tempfile.mkdtemp(prefix="clipfail-ray-bench-"))
    coco = Path(args.data) if args.data else tmp / "coco"
    make_coco(coco, args.n, 5)
    base = tmp / "base.duckdb"
    ingest(base, coco, args.n, 5)
    cores = len(os.sched_getaffinity(0))
    t = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(f"local Ray instance with {cores} CPUs started in {time.perf_counter() - t:.1f} s (not counted)")
    configs = [("local", {}), ("ray, 1 CPU actor", {"engine": "ray", "workers": 1})]
    configs.append(("ray, 2 CPU actors", {"engine": "ray", "workers": 2}))
    rows, ref = [], None
    try:
        for label, kw in configs:
            times = []
            for r in range(args.repeat):
                db = tmp / f"run-{len(rows)}-{r}.duckdb"
                shutil.copy(base, db)
                t = time.perf_counter()
                embed(str(db), "bench", model="tiny-clip", progress=False, **kw)
                times.append(time.perf_counter() - t)
                got = arrays(str(db))
                if ref is None:
                    ref = got
                for kind in ("image", "text"):
                    diff = float(np.abs(got[kind] - ref[kind]).max())
                    assert diff < 1e-5, f"{label}: {kind} differs from local by {diff}"
                shutil.rmtree(tmp / f"{db.stem}_cache", ignore_errors=True)
                db.unlink()
            rows.append((label, min(times)))
    finally:
        ray.shutdown()
    local = rows[0][1]
    print(f"\n{args.n} images + {5 * args.n} captions, tiny-clip, {cores} cores, load {os.getloadavg()[0]:.1f}\n")
    print("| engine | stage seconds | images / stage second | vs local |")
    print("|---|---:|---:|---:|")
    for label, s in rows:
        print(f"| {label} | {s:.1f} | {args.n / s:.0f} | {local / s:.2f}x |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
