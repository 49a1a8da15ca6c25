"""Improve benchmark: three poolings in one run (prompt cache) against separate runs without it.

Setup (not timed): a generated COCO-format dataset of 5000 tiny images with 5 COCO-like captions
each, ingested; image and caption embeddings are seeded random unit vectors (512-d) registered as
the embedding sets of a randomly initialised ViT-B-32-quickgelu (the cost of the real one); the
real evaluate, sample-failures (100 failures, all to annotator A) and import-labels (all Object)
stages; a template set with 15 Object templates. Baselines and gains are therefore meaningless
here; this measures time only.

Timed, each on a fresh copy of that database (an empty prompt cache), in interleaved rounds
(--repeats, default 2; the best time of each configuration counts, as the machine may be shared):
- one `improve --pooling all` (the three poolings share one encoding of the prompts);
- `improve --pooling max`, `--pooling mean`, `--pooling logsumexp`, each run alone;
- and, on the first copy, a re-run with another tau (every prompt cached: scoring only).

Target (issue #7): the three poolings together take at most 1.2x one pooling.

    python benchmarks/improve.py [--captions 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.improve import templates
from toolkit.improve.stage import improve
from toolkit.ingest.stage import ingest
from toolkit.labels.label_import import import_labels
from toolkit.labels.sample import sample_failures
from toolkit.retrieval.evaluate import evaluate
from toolkit.store import db
from toolkit.store.artifacts import register_embedding_set, save_array
from toolkit.store.study import open_study

MODEL = "ViT-B-32-quickgelu"
SUBJECTS = "a man|a woman|two dogs|a black cat|three people|a red bus|a small boy|a white horse|several giraffes|a girl"
ACTIONS = "riding a horse|sitting on the couch|holding an umbrella|eating a pizza|walking down the street|flying a kite"
PLACES = "on a beach|in a kitchen|next to a wooden bench|under a tree|in front of a large window|on top of a table"
EXTRA = [
    "a photo of {caption}",
    "a picture of {caption}",
    "an image showing {caption}",
    "a good photo of {caption}",
    "a cropped photo of {caption}",
]


def coco_like(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS.split("|")), rng.choice(ACTIONS.split("|")), rng.choice(PLACES.split("|"))]
    return " ".join(parts).capitalize() + "."


def build(tmp: Path, n_captions: int) -> Path:
    rng = random.Random(0)
    root = tmp / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    tiny = Image.new("RGB", (8, 8), (120, 30, 200))
    images, anns = [], []
    for i in range(5000):
        image_id = 100_000 + i
        name = f"{image_id:012d}.jpg"
        tiny.save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
        for _ in range(5):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "caption": coco_like(rng)})
    payload = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(payload))

    path = tmp / "base.duckdb"
    con = open_study(path)
    ingest(con, coco_root=root, num_images=5000)
    sid = con.execute("SELECT subset_id FROM subsets").fetchall()[0][0]
    image_ids = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caption_ids = con.execute(
        """
        SELECT sc.caption_id FROM subset_captions sc
        JOIN subset_images si ON si.subset_id = sc.subset_id AND si.image_id = sc.image_id
        WHERE sc.subset_id = ? ORDER BY si.position, sc.position
        """,
        [sid],
    ).df()
    gen = np.random.default_rng(0)
    with db.transaction(con):
        run_id = db.insert_run(con, "embed", {"benchmark": "random vectors"}, db.now(), model=MODEL)
        for kind, ids in (("image", image_ids["image_id"]), ("text", caption_ids["caption_id"])):
            arr = gen.standard_normal((len(ids), 512)).astype(np.float32)
            arr /= np.linalg.norm(arr, axis=1, keepdims=True)
            f = tmp / f"{kind}.npy"
            register_embedding_set(
                con, kind=kind, subset_id=sid, model=MODEL, pretrained=None, checkpoint_sha256=None,
                precision="fp32", config={"benchmark": True}, path=f, array=arr, item_ids=ids.to_numpy(),
                sha256=save_array(f, arr), run_id=run_id,
            )  # fmt: skip
    evaluate(con, model=MODEL, device="cpu")
    out = tmp / "fa"
    sample_failures(con, n=n_captions, overlap=0, per_annotator=n_captions, annotators=["A"], out_dir=out,
                    pictures=False)  # fmt: skip
    with open(out / "assign_A.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["category"] = "Object"
    with open(out / "assign_A.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import_labels(con, [out / "assign_A.csv"])
    tdf = templates.load_set(con, "default")
    objects = list(tdf[tdf["category"] == "Object"]["template"]) + EXTRA
    with open(tmp / "t15.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["template_set", "category", "position", "template"])
        w.writerows(["bench15", "Object", i, t] for i, t in enumerate(objects))
    templates.import_templates(con, tmp / "t15.csv")
    con.close()
    return path


def timed_run(base: Path, dest: Path, encoder, **kw):
    shutil.copy(base, dest)
    con = open_study(dest)
    try:
        t = time.perf_counter()
        res = improve(con, "Object", template_set="bench15", k=15, max_subset=None, encoder=encoder,
                              cache_dir=dest.parent / f"{dest.stem}_cache", **kw)  # fmt: skip
        seconds = time.perf_counter() - t
        ranks = con.execute(
            "SELECT u.pooling, r.caption_id, r.improved_rank FROM improvement_ranks r "
            "JOIN improvement_runs u USING (improvement_id) WHERE list_contains(?, improvement_id) ORDER BY 1, 2",
            [res.improvement_ids],
        ).df()
    finally:
        con.close()
    return seconds, res, ranks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the four runs; the best time of each counts")
    args = ap.parse_args()
    import torch

    from toolkit.embed.encode import encode_texts
    from toolkit.embed.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        base = build(tmp, args.captions)
        torch.manual_seed(0)
        bundle = load_model(MODEL, device="cpu")  # random weights: the real model's cost
        print(f"setup {time.perf_counter() - t0:.1f} s; model {MODEL} (random init), torch threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        calls = {"n": 0, "texts": 0, "seconds": 0.0}

        def encoder(texts):
            calls["n"] += 1
            calls["texts"] += len(texts)
            t = time.perf_counter()
            out = encode_texts(bundle, texts)
            calls["seconds"] += time.perf_counter() - t
            return out

        encoder(["warm-up caption"])
        # Interleaved and repeated (the machine may be shared): each configuration's best time counts.
        times: dict[str, list[float]] = {"all": [], "max": [], "mean": [], "logsumexp": []}
        rest: dict[str, list[float]] = {p: [] for p in times}  # seconds outside the encoder
        ranks_all = res_all = None
        for rep in range(args.repeats):
            for p in ("all", "max", "mean", "logsumexp"):
                enc0 = calls["seconds"]
                secs, res, ranks = timed_run(base, tmp / f"{p}{rep}.duckdb", encoder, poolings=p)
                times[p].append(secs)
                rest[p].append(secs - (calls["seconds"] - enc0))
                if p == "all":
                    res_all, ranks_all = res, ranks
                else:
                    same = ranks_all[ranks_all["pooling"] == p].reset_index(drop=True)
                    assert same["improved_rank"].equals(ranks["improved_rank"].reset_index(drop=True)), p
        print(f"captions {res_all.populations['failures']}, K {res_all.k_per_category['failures']}, "
              f"prompts {res_all.n_prompts} distinct besides the captions ({res_all.n_encoded} encoded), "
              f"{res_all.n_identity} identity prompts")  # fmt: skip
        t_all = min(times["all"])
        singles = {p: min(times[p]) for p in ("max", "mean", "logsumexp")}
        con = open_study(tmp / "all0.duckdb")
        n_before = calls["texts"]
        t = time.perf_counter()
        improve(con, "Object", template_set="bench15", k=15, max_subset=None, poolings="logsumexp",
                tau=0.5, encoder=encoder, cache_dir=tmp / "all0_cache")  # fmt: skip
        t_cached = time.perf_counter() - t
        con.close()
        assert calls["texts"] == n_before, "the cached re-run encoded prompts"
    mean_single = sum(singles.values()) / 3
    every = json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()})
    enc = min(t - r for p in times for t, r in zip(times[p], rest[p]))  # the same encoding work in every run
    rest_all = min(rest["all"])
    rest_one = sum(min(rest[p]) for p in singles) / 3
    print(f"seconds (best of {args.repeats}; every run: {every}):")
    print(f"  three poolings in one run (--pooling all) : {t_all:7.2f}   (outside the encoder {rest_all:.2f})")
    for p, s in singles.items():
        print(f"  {p:<9} alone, empty prompt cache       : {s:7.2f}   (outside the encoder {min(rest[p]):.2f})")
    print(f"  three separate runs, no cache (sum)       : {sum(singles.values()):7.2f}")
    print(f"  re-run, another tau, every prompt cached  : {t_cached:7.2f}")
    print(f"  encoding the {res_all.n_encoded} prompts (fastest of all runs): {enc:7.2f}")
    print(f"ratio all-in-one / one pooling, wall clock (best times): {t_all / mean_single:.3f}   (target <= 1.2)")
    print(
        f"ratio all-in-one / one pooling, same encoding time: {(enc + rest_all) / (enc + rest_one):.3f}"
        "   (every run encodes the same prompts; on a shared machine the wall-clock ratio mostly measures load)"
    )
    print(f"speed-up all-in-one vs three separate runs: {sum(singles.values()) / t_all:.2f}x wall clock, "
          f"{3 * (enc + rest_one) / (enc + rest_all):.2f}x at equal encoding time")  # fmt: skip
    print("identical ranks: the all-in-one run equals each separate run")


if __name__ == "__main__":
    main()
