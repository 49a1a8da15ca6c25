"""Explain benchmark (issue 28): `explain --all-failures` against encoding the failure captions once.

Setup (not timed): a generated COCO-format dataset of N/5 tiny images with 5 COCO-like captions each, ingested;
image embeddings are seeded random unit vectors (512-d), and each caption's embedding is the next image's vector
plus a little noise, so every caption is an R@1 failure (N captions, N failures); they are registered as the
embedding sets of a randomly initialised ViT-B-32-quickgelu (the real model's cost); the real evaluate stage.
Ranks and blames are therefore meaningless here; this measures time only.

Timed, on the CPU, with the same model (random ViT-B-32-quickgelu through the embed stage's `encode_texts`):
- (a) encoding the failure captions once, timed before and again after (b) (the machine may be shared): their mean;
- (b) `toolkit.retrieval.explain.explain(scope="all-failures")`, every role, on a fresh database (an empty
  prompt cache): variants, encoding (the same `encode_texts`), ranking, one transaction.

Prints the failures, variants per failure (average and per role), the ratio (b) / (a), the time of (b) outside the
encoder, and the target: the ratio is at most the average number of variants per failure + 1 (the cost is the
encodings and nothing more).

    python benchmarks/explain.py [--n 5000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.ingest.stage import ingest
from toolkit.retrieval.evaluate import evaluate
from toolkit.retrieval.explain import explain
from toolkit.store import db
from toolkit.store.artifacts import register_embedding_set, save_array
from toolkit.store.study import open_study

MODEL = "ViT-B-32-quickgelu"
# COCO-like captions "<subject> <action> <place>" drawn from word lists, so that (as in COCO) nearly every caption,
# and nearly every variant, is a distinct text: a benchmark whose captions repeat would encode each variant text
# once for many failures and flatter the ratio.
SUBJECTS = "man|woman|dog|cat|boy|girl|horse|giraffe|elephant|zebra|bear|bird|cow|sheep|person|child|bus|truck"
COUNTS = "two|three|four|several|a group of|a pair of"
ADJECTIVES = "red|black|white|brown|small|large|young|old|tall|little|wooden|gray|yellow|green|blue|striped"
ACTIONS = "riding|holding|carrying|eating|pulling|looking at|standing next to|walking past|sitting on|chasing"
THINGS = "horse|umbrella|kite|pizza|bicycle|surfboard|frisbee|bench|couch|skateboard|suitcase|cake|ball|boat|chair"
RELATIONS = "on|in|under|next to|in front of|on top of|behind|near|beside|across from"
PLACES = "beach|kitchen|table|tree|window|bed|street|field|car|train|fence|building|river|counter|sidewalk"


def _np(rng: random.Random, nouns: str, count: bool) -> str:
    noun, adj = rng.choice(nouns.split("|")), rng.choice(ADJECTIVES.split("|")) + " " if rng.random() < 0.5 else ""
    if count and rng.random() < 0.3:
        plural = {"man": "men", "woman": "women", "person": "people", "child": "children", "sheep": "sheep"}
        return f"{rng.choice(COUNTS.split('|'))} {adj}{plural.get(noun, noun + 's')}"
    article = "an" if (adj or noun)[0] in "aeiou" else "a"
    return f"{article} {adj}{noun}" if count or rng.random() < 0.5 else f"the {adj}{noun}"


def coco_like(rng: random.Random) -> str:
    parts = [_np(rng, SUBJECTS, True), rng.choice(ACTIONS.split("|")), _np(rng, THINGS, False),
             rng.choice(RELATIONS.split("|")), _np(rng, PLACES, False)]  # fmt: skip
    return " ".join(parts).capitalize() + "."


def build(tmp: Path, n_captions: int) -> Path:
    n_images = max(2, n_captions // 5)
    rng = random.Random(0)
    root = tmp / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    tiny = Image.new("RGB", (8, 8), (120, 30, 200))
    images, anns = [], []
    for i in range(n_images):
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
    ingest(con, coco_root=root, num_images=n_images)
    sid = con.execute("SELECT subset_id FROM subsets").fetchall()[0][0]
    image_ids = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caption_ids = con.execute(
        """
        SELECT sc.caption_id, sc.image_id FROM subset_captions sc
        JOIN subset_images si ON si.subset_id = sc.subset_id AND si.image_id = sc.image_id
        WHERE sc.subset_id = ? ORDER BY si.position, sc.position
        """,
        [sid],
    ).df()
    gen = np.random.default_rng(0)
    images = gen.standard_normal((len(image_ids), 512)).astype(np.float32)
    row = {int(i): r for r, i in enumerate(image_ids["image_id"])}
    nxt = [(row[int(i)] + 1) % len(images) for i in caption_ids["image_id"]]  # each caption "shows" the next image
    texts = images[nxt] + np.float32(0.1) * gen.standard_normal((len(nxt), 512)).astype(np.float32)
    with db.transaction(con):
        run_id = db.insert_run(con, "embed", {"benchmark": "random vectors"}, db.now(), model=MODEL)
        for kind, ids, arr in (("image", image_ids["image_id"], images), ("text", caption_ids["caption_id"], texts)):
            arr = arr / np.linalg.norm(arr, axis=1, keepdims=True)
            f = tmp / f"{kind}.npy"
            register_embedding_set(
                con, kind=kind, subset_id=sid, model=MODEL, pretrained=None, checkpoint_sha256=None,
                precision="fp32", config={"benchmark": True}, path=f, array=arr, item_ids=ids.to_numpy(),
                sha256=save_array(f, arr), run_id=run_id,
            )  # fmt: skip
    evaluate(con, model=MODEL, device="cpu")
    con.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000, help="captions (every one an R@1 failure)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    import torch

    from toolkit.embed.encode import encode_texts
    from toolkit.embed.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        base = build(tmp, args.n)
        torch.manual_seed(0)
        bundle = load_model(MODEL, device="cpu")
        print(f"setup {time.perf_counter() - t0:.1f} s; model {MODEL} (random init), cpu, torch threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        con = open_study(base)
        captions = [
            r[0]
            for r in con.execute(
                "SELECT c.text FROM retrieval_ranks r JOIN captions c ON c.caption_id = r.query_id "
                "WHERE r.gt_rank > 1 ORDER BY r.query_id"
            ).fetchall()
        ]
        encode_texts(bundle, ["warm-up caption"])

        def once() -> float:
            t = time.perf_counter()
            encode_texts(bundle, captions)
            return time.perf_counter() - t

        t_before = once()
        spent = {"seconds": 0.0, "texts": 0}

        def encoder(texts):
            t = time.perf_counter()
            out = encode_texts(bundle, texts)
            spent["seconds"] += time.perf_counter() - t
            spent["texts"] += len(texts)
            return out

        t = time.perf_counter()
        res = explain(con, scope="all-failures", encoder=encoder, cache_dir=tmp / "cache")
        t_explain = time.perf_counter() - t
        t_after = once()  # (a) again: on a shared machine the load may change while (b) runs
        con.close()
    per = res.n_variants / res.n_failures
    t_once = (t_before + t_after) / 2
    ratio = t_explain / t_once
    print(f"failures {res.n_failures:,}; variants {res.n_variants:,} ({per:.2f} per failure; per role "
          f"{res.variants_by_role}); {res.n_encoded:,} distinct texts encoded; skipped {res.n_skipped_identical} "
          f"identical, {res.n_skipped_empty} empty; {res.n_no_phrase} failures with no phrase")  # fmt: skip
    print(f"  (a) encoding the {len(captions):,} failure captions once : {t_once:8.2f} s (mean of {t_before:.2f} s "
          f"before (b) and {t_after:.2f} s after)")  # fmt: skip
    print(f"  (b) explain --all-failures                       : {t_explain:8.2f} s "
          f"(encoder {spent['seconds']:.2f} s, the rest {t_explain - spent['seconds']:.2f} s)")  # fmt: skip
    print(f"texts encoded per failure {res.n_encoded / res.n_failures:.2f} (the ratio if encoding were the whole "
          f"cost); ratio against (a) before only {t_explain / t_before:.2f}, "
          f"after only {t_explain / t_after:.2f}")  # fmt: skip
    print(f"ratio (b) / (a): {ratio:.2f}   target <= variants per failure + 1 = {per + 1:.2f}: "
          f"{'met' if ratio <= per + 1 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
