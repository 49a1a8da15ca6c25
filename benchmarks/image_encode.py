"""Image encoder benchmark: end-to-end images/s against the bare model forward.

Writes 500 photo-like 640x480 JPEGs (smooth structure plus sensor-like noise, quality 90; flat
drawn scenes would decode unrealistically fast), then with a randomly initialised
ViT-B-32-quickgelu (the same cost as the OpenAI weights) times

- bare: ``model.encode_image`` + normalisation on pre-made 224x224 tensors, nothing else;
- embed: ``toolkit.embed.encode.encode_images`` on the files: DataLoader workers decoding, converting
  and preprocessing with the model's own transform, the forward, normalisation and float32 output;

at the same batch size. The order is bare, embed, bare, and the bare time is the mean of its two
runs, so a change in machine load during the run biases the ratio less. Prints images/s, the
ratio embed/bare (target: at least 0.9), CPU seconds, and the peak RSS of the main process during
the embed run and of its largest decode worker (read from the kernel, so measuring costs nothing).

    python benchmarks/image_encode.py [--n 500] [--batch-size 64] [--num-workers N] [--draft]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toolkit.embed import encode, models


def photo_like_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), dtype=np.float32)
        arr = np.clip(base + rng.normal(0, 10, (480, 640, 3)).astype(np.float32), 0, 255).astype(np.uint8)
        p = folder / f"{i:012d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (peak RSS) so the next phase is measured on its own (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(key: str = "VmHWM:") -> float:
    """VmHWM (peak resident set since the last reset) or VmRSS of this process, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def bare_forward(bundle, n: int, batch_size: int) -> float:
    h, w = bundle.image_size
    batches = [torch.randn(min(batch_size, n - i), 3, h, w) for i in range(0, n, batch_size)]
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            x = x.to(bundle.device, dtype=bundle.input_dtype)
            torch.nn.functional.normalize(bundle.model.encode_image(x).float(), dim=-1).cpu().numpy()
    if bundle.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=None, help="default: the embed stage's default")
    ap.add_argument("--draft", action="store_true", help="JPEG draft decoding (opt-in in the embed stage)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="ViT-B-32-quickgelu")
    args = ap.parse_args()

    torch.manual_seed(0)
    bundle = models.load_model(args.model, device=args.device)
    workers = encode.default_num_workers(bundle.device) if args.num_workers is None else args.num_workers
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = photo_like_jpegs(Path(tmp), args.n)
        print(
            f"wrote {len(paths)} 640x480 JPEGs in {time.perf_counter() - t:.1f} s; model {bundle.model_name} "
            f"(random weights) on {bundle.device}, torch threads {torch.get_num_threads()}, batch size "
            f"{args.batch_size}, workers {workers}, draft {args.draft}"
        )
        bare_forward(bundle, args.batch_size, args.batch_size)  # warm-up
        encode.encode_images(bundle, paths[: args.batch_size], batch_size=args.batch_size, num_workers=0)

        c = _cpu()
        t_bare1 = bare_forward(bundle, len(paths), args.batch_size)
        c_bare1 = _cpu() - c
        reset = _reset_peak_rss()
        rss_start = _status_mib("VmRSS:")
        c, t = _cpu(), time.perf_counter()
        emb = encode.encode_images(
            bundle, paths, batch_size=args.batch_size, num_workers=workers, draft=args.draft, progress=False
        )
        t_embed, c_embed = time.perf_counter() - t, _cpu() - c
        rss_main = _status_mib()
        rss_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0
        c = _cpu()
        t_bare2 = bare_forward(bundle, len(paths), args.batch_size)
        c_bare2 = _cpu() - c

    n = len(paths)
    t_bare = (t_bare1 + t_bare2) / 2
    assert emb.shape[0] == n and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    print(f"bare forward runs: {t_bare1:.2f} s and {t_bare2:.2f} s ({c_bare1:.1f} and {c_bare2:.1f} CPU s)")
    print(f"bare forward : {n / t_bare:8.2f} images/s")
    print(f"embed path   : {n / t_embed:8.2f} images/s  ({t_embed:.2f} s, {c_embed:.1f} CPU s incl. workers)")
    print(f"ratio embed/bare: {t_bare / t_embed:.3f} (target >= 0.9)")
    since = "during the embed run" if reset else "over the whole benchmark"
    print(
        f"peak RSS {since}: main process {rss_main:.0f} MiB ({rss_start:.0f} MiB when it started; model "
        f"weights {_weights_mib(bundle):.0f} MiB)"
        + (
            f"; largest decode worker {rss_worker:.0f} MiB (a forked worker's RSS counts the parent's pages "
            "it shares copy-on-write)"
            if workers
            else "; no decode workers"
        )
    )


def _weights_mib(bundle) -> float:
    return sum(p.numel() * p.element_size() for p in bundle.model.parameters()) / 2**20


if __name__ == "__main__":
    main()
