"""Text encoder benchmark: the exact fast path against open_clip's encode_text.

On 2,000 COCO-like captions of 8-25 words, with a randomly initialised ViT-B-32-quickgelu (the
same architecture and cost as the OpenAI weights), both at the same batch size:

- baseline: ``bundle.tokenizer(texts)`` then ``model.encode_text`` on all 77 positions;
- fast: ``toolkit.embed.encode.encode_texts`` (length-sorted batches, each run to its own length).

Tokenization is included in both timings. Prints captions/s of each, the speed-up (target: at
least 4x) and the max abs difference of the normalised embeddings (target: identical within 1e-5).

    python benchmarks/text_encode.py [--n 2000] [--batch-size 256] [--rounds 3] [--lengths uniform|coco]
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import numpy as np
import torch

from toolkit.embed import encode, models

SUBJECTS = [
    "a man",
    "a woman",
    "a young boy",
    "two people",
    "a group of people",
    "a dog",
    "a black cat",
    "a large bus",
    "a train",
    "a plate",
    "a little girl",
    "an elephant",
    "a giraffe",
    "a kitchen",
    "a skier",
    "a surfer",
]
VERBS = [
    "sitting on",
    "standing next to",
    "riding",
    "holding",
    "walking down",
    "looking at",
    "eating",
    "parked near",
    "flying over",
    "playing with",
    "laying on",
    "waiting at",
]
OBJECTS = [
    "a wooden bench",
    "the street",
    "a red frisbee",
    "a wave",
    "a snowy hill",
    "a pizza with cheese",
    "a table",
    "the beach",
    "a laptop computer",
    "a tennis racket",
    "a busy city road",
    "a field of grass",
    "an umbrella",
]
TAILS = [
    "on a sunny day",
    "in front of a building",
    "with trees in the background",
    "while people watch",
    "near the water",
    "at night",
    "under a cloudy sky",
    "inside a small room",
    "next to a white fence",
]


# Approximate share of COCO captions by word count (8..25 words; COCO's mean is about 10.5 words,
# with a long thin tail). Used by --lengths coco; the default, --lengths uniform, draws 8..25
# uniformly, which is longer on average than real COCO and so the harder case for the fast path.
COCO_WORD_SHARE = {8: 11, 9: 22, 10: 21, 11: 14, 12: 10, 13: 7, 14: 5, 15: 3, 16: 2, 17: 1.5, 18: 1, 19: 0.8}
COCO_WORD_SHARE.update({k: 0.4 for k in range(20, 26)})


def coco_like_captions(n: int, seed: int = 0, lo: int = 8, hi: int = 25, lengths: str = "uniform") -> list[str]:
    """Captions that read like COCO's, each with lo..hi words (uniform, or COCO's length shares)."""
    rng = random.Random(seed)
    share = {k: v for k, v in COCO_WORD_SHARE.items() if lo <= k <= hi}
    out = []
    while len(out) < n:
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
        if lengths == "coco":
            target = rng.choices(list(share), weights=list(share.values()))[0]
        else:
            target = rng.randint(lo, hi)
        while len(words) < target:
            words += rng.choice(TAILS + [f"and {o}" for o in OBJECTS]).split()
        words = words[:target]
        out.append(" ".join(words).capitalize() + rng.choice([".", "", "."]))
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def baseline(bundle, texts, batch_size):
    outs = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            ids = bundle.tokenizer(texts[i : i + batch_size]).to(bundle.device)
            outs.append(torch.nn.functional.normalize(bundle.model.encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(outs).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="ViT-B-32-quickgelu")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (see the code)")
    ap.add_argument("--lengths", choices=["uniform", "coco"], default="uniform", help="word-count distribution")
    args = ap.parse_args()

    torch.manual_seed(0)
    bundle = models.load_model(args.model, device=args.device)
    texts = coco_like_captions(args.n, lengths=args.lengths)
    lengths = [len(t.split()) for t in texts]
    tok_len = (encode.tokenize(bundle, texts).ids.argmax(-1) + 1).float()
    print(
        f"model {bundle.model_name} (random weights) on {bundle.device}, torch threads {torch.get_num_threads()}; "
        f"{len(texts)} captions, {min(lengths)}-{max(lengths)} words, tokens mean {tok_len.mean():.1f} "
        f"max {int(tok_len.max())} of {bundle.context_length}; batch size {args.batch_size}"
    )
    encode.encode_texts(bundle, texts[:64], batch_size=args.batch_size)  # warm-up (allocator, oneDNN)
    baseline(bundle, texts[:64], args.batch_size)

    # Interleaved rounds: each round runs the fast path on all captions and the baseline on one
    # slice of them (the slices cover every caption once). Both are then measured over the same
    # stretch of time, so a machine whose load changes (shared CPUs) biases the ratio less.
    # CPU seconds (user + sys of this process) are printed too.
    def timed(fn):
        c, t = _cpu(), time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t, _cpu() - c

    rounds = max(1, args.rounds)
    bounds = np.linspace(0, len(texts), rounds + 1).astype(int)
    fast_w, fast_c, ref_parts, t_ref, c_ref = [], [], [], 0.0, 0.0
    for r in range(rounds):
        fast, w, c = timed(lambda: encode.encode_texts_with_info(bundle, texts, batch_size=args.batch_size))
        fast_w.append(w)
        fast_c.append(c)
        part, w, c = timed(lambda r=r: baseline(bundle, texts[bounds[r] : bounds[r + 1]], args.batch_size))
        ref_parts.append(part)
        t_ref += w
        c_ref += c
        print(f"round {r + 1}: fast path {fast_w[-1]:.2f} s on {len(texts)}; encode_text {w:.2f} s on {len(part)}")
    ref = np.concatenate(ref_parts)
    t_fast, c_fast = float(np.mean(fast_w)), float(np.mean(fast_c))
    diff = float(np.abs(fast.embeddings - ref).max())
    n = len(texts)
    print(f"encode_text (77 positions): {t_ref:8.2f} s  {n / t_ref:8.1f} captions/s  ({c_ref:.1f} CPU s)")
    print(f"fast path (sorted, sliced): {t_fast:8.2f} s  {n / t_fast:8.1f} captions/s  ({c_fast:.1f} CPU s)")
    print(
        f"speed-up: {t_ref / t_fast:.2f}x wall, {c_ref / c_fast:.2f}x CPU time (target >= 4x)   "
        f"max abs diff: {diff:.2e} (target < 1e-5)"
    )
    print(f"truncated captions: {fast.n_truncated}; fast path used: {fast.fast_path}")


if __name__ == "__main__":
    main()
