"""Encode captions and images with an open_clip model (the Python API the embed stage uses).

Texts: ``encode_texts(bundle, texts)`` returns L2-normalised float32 embeddings, in input order.
CLIP's text transformer is causal and pools the token at the end-of-text position, so the output
for a caption depends only on the tokens up to and including its EOT token. The fast path
therefore

1. tokenizes exactly as open_clip does (captions longer than the context are truncated, with the
   EOT token written into the last slot, and counted),
2. sorts the captions by real token length (SOT ... EOT) and batches neighbours together,
3. runs each batch only up to its longest caption: the token and positional embeddings and the
   causal attention mask are sliced to that length, and the same transformer blocks, final
   LayerNorm and projection are applied,
4. pools at the EOT position (``argmax`` of the token ids, or the first ``eos_id`` for ``eos``
   pooling), normalises, and restores the input order.

The result equals open_clip's ``encode_text`` on the padded 77-token input within float rounding
(tests check < 1e-5 max abs difference in fp32). Any text tower that is not a causal
open_clip text transformer with EOT pooling (Hugging Face text towers, bidirectional or
CLS-token towers, other pool types) falls back to ``model.encode_text`` on full-length tokens.

Images: ``encode_images(bundle, paths)`` streams files through a torch DataLoader with the
model's own preprocess. Every image is converted to RGB first (CMYK, greyscale, palette and alpha
modes; alpha is dropped exactly as ``Image.convert("RGB")`` does), which is what
``preprocess(Image.open(p).convert("RGB"))`` does. A file that does not decode is a `UserError`
naming it. ``draft=True`` (opt-in) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when that
still leaves both sides at least as large as the preprocess's resize target, so the model sees
the same picture up to resize-interpolation noise, for a fraction of the decode time.
``decode="gpu"`` (opt-in, CUDA only) decodes baseline RGB JPEGs on the GPU in batches and runs the
preprocess there as tensor ops (`preprocess_tensors`); every other file takes the CPU path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import UserError, list_offenders
from toolkit.progress import progress as _progress

DEFAULT_TEXT_BATCH = 256
DEFAULT_IMAGE_BATCH = 64


# --------------------------------------------------------------------------- tokenizing


@dataclass
class Tokens:
    ids: object  # LongTensor [N, context_length], exactly what open_clip's tokenizer returns
    n_truncated: int | None  # captions longer than the context (None: tokenizer cannot tell)
    truncated: np.ndarray | None  # their indices


# Above this many captions, `tokenize` spreads the work over processes (see `tokenize_processes`).
PARALLEL_TOKENIZE_MIN = 8192
TOKENIZE_CHUNK = 2048
_TOKENIZE_JOB = None  # (tokenizer, context length, texts): set before forking tokenizer workers


def _simple_tokenizer(bundle):
    from open_clip.tokenizer import SimpleTokenizer

    tok = bundle.tokenizer
    return tok if isinstance(tok, SimpleTokenizer) and getattr(tok, "reduction_fn", None) is None else None


def _tokenize_span(span) -> tuple[np.ndarray, list[int]]:
    """open_clip's SimpleTokenizer.__call__ on texts[a:b] of the current job, keeping what it truncates.

    Returns int32 ids [b - a, context] (exactly the tokenizer's ids) and the truncated indices (global)."""
    tok, ctx, texts = _TOKENIZE_JOB
    a, b = span
    sot, eot = tok.sot_token_id, tok.eot_token_id
    ids = np.zeros((b - a, ctx), dtype=np.int32)
    truncated = []
    for i in range(a, b):
        seq = [sot] + tok.encode(texts[i]) + [eot]
        if len(seq) > ctx:
            seq = seq[:ctx]
            seq[-1] = eot
            truncated.append(i)
        ids[i - a, : len(seq)] = seq
    return ids, truncated


def _die_with_parent() -> None:
    """Pool initializer: on Linux, a tokenizer worker is killed when the embed process dies (kill -9
    included), instead of waiting forever for work that will not come."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def tokenize_processes(n: int) -> int:
    """Processes `tokenize` uses for n captions: 1 below PARALLEL_TOKENIZE_MIN, else one per
    TOKENIZE_CHUNK captions up to the cores this process may use (at most 16), where fork exists."""
    import multiprocessing as mp

    if n < PARALLEL_TOKENIZE_MIN or "fork" not in mp.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores, -(-n // TOKENIZE_CHUNK)))


def tokenize(bundle, texts: Sequence[str], processes: int | None = None) -> Tokens:
    """Tokenize like ``bundle.tokenizer(texts)`` and count the captions it truncates, in one pass.

    With open_clip's SimpleTokenizer, many captions are split into chunks tokenized by a pool of
    forked processes (`processes`, default `tokenize_processes(len(texts))`); the ids are the same
    whatever the number of processes. Other tokenizers are called as they are (truncation unknown)."""
    import torch

    global _TOKENIZE_JOB
    ctx = int(bundle.context_length)
    texts = [str(t) for t in texts]
    tok = _simple_tokenizer(bundle)
    if tok is None:
        ids = bundle.tokenizer(texts, context_length=ctx) if ctx else bundle.tokenizer(texts)
        return Tokens(ids, None, None)
    n = len(texts)
    procs = tokenize_processes(n) if processes is None else max(1, int(processes))
    spans = [(a, min(n, a + TOKENIZE_CHUNK)) for a in range(0, n, TOKENIZE_CHUNK)] if procs > 1 else [(0, n)]
    _TOKENIZE_JOB = (tok, ctx, texts)
    try:
        if procs > 1 and len(spans) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(procs, len(spans)), initializer=_die_with_parent) as pool:
                parts = pool.map(_tokenize_span, spans, chunksize=1)
        else:
            parts = [_tokenize_span(s) for s in spans]
    finally:
        _TOKENIZE_JOB = None
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, ctx), np.int32)
    truncated = [i for p in parts for i in p[1]]
    return Tokens(torch.from_numpy(ids.astype(np.int64)), len(truncated), np.asarray(truncated, dtype=np.int64))


# --------------------------------------------------------------------------- text encoder


class _CausalTextTower:
    """The pieces of an open_clip causal text transformer that the fast path runs."""

    def __init__(self, owner, pool_type: str, eos_id):
        self.owner = owner  # CLIP (text modules flattened onto it) or TextTransformer
        self.pool_type = pool_type
        self.eos_id = eos_id

    def pool_index(self, ids):
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def forward(self, ids, pool_idx, length: int):
        import torch
        import torch.nn as nn

        o = self.owner
        cast = o.transformer.get_cast_dtype()
        ids = ids[:, :length]
        x = o.token_embedding(ids).to(cast)
        x = x + o.positional_embedding[:length].to(cast)
        mask = o.attn_mask[:length, :length]
        blocks = o.transformer.resblocks
        if _plain_blocks(o.transformer):
            for blk in blocks[:-1]:
                x = blk(x, attn_mask=mask)
            x = _last_block_at(blocks[-1], x, pool_idx)
        else:
            x = o.transformer(x, attn_mask=mask)
            x = x[torch.arange(x.shape[0], device=x.device), pool_idx]
        x = o.ln_final(x)  # per-token LayerNorm: pooling first gives the same numbers
        proj = o.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x


def _plain_blocks(transformer) -> bool:
    """open_clip's standard pre-LN blocks, batch first: the last one can be run for one query."""
    import torch.nn as nn
    from open_clip.transformer import ResidualAttentionBlock

    blocks = transformer.resblocks
    return (
        getattr(transformer, "batch_first", False)
        and len(blocks) > 0
        and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in blocks)
        and type(blocks[-1].attn) is nn.MultiheadAttention
    )


def _last_block_at(blk, x, pool_idx):
    """The last block's output at the pooled position only.

    Only the EOT row of the last block reaches the output, so its query, attention output and MLP
    are computed for that row alone; keys and values still cover every position up to it (the
    causal mask becomes a key padding mask for that single query). Same weights, same ops.
    """
    import torch

    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    h = blk.ln_1(x)
    q = h[rows, pool_idx].unsqueeze(1)
    future = torch.arange(n, device=x.device).unsqueeze(0) > pool_idx.unsqueeze(1)  # True = not attended
    a = blk.attn(q, h, h, need_weights=False, key_padding_mask=future)[0]
    y = x[rows, pool_idx].unsqueeze(1) + blk.ls_1(a)
    y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
    return y[:, 0]


def _length_batches(lengths, batch_size: int):
    """Batches over captions sorted by descending length: (start, end) pairs.

    A batch holds at most `batch_size` captions. Past a quarter of that, it only takes captions
    as long as its first one, so batches rarely carry padding; on a CPU the cost is proportional
    to the tokens run, so smaller, padding-free batches are cheaper than full, padded ones.
    """
    lengths = [int(v) for v in lengths]
    n, min_fill, i = len(lengths), max(1, batch_size // 4), 0
    while i < n:
        j = i + 1
        while j < n and j - i < batch_size and (lengths[j] == lengths[i] or j - i < min_fill):
            j += 1
        yield i, j
        i = j


def fast_text_tower(model) -> _CausalTextTower | None:
    """The fast-path adapter for `model`'s text tower, or None when only encode_text is exact."""
    from open_clip.transformer import TextTransformer, Transformer

    def usable(o, pool_type):
        return (
            isinstance(getattr(o, "transformer", None), Transformer)
            and getattr(o, "attn_mask", None) is not None  # causal
            and pool_type in ("argmax", "eos")
            and hasattr(o, "token_embedding")
            and hasattr(o, "positional_embedding")
            and hasattr(o, "ln_final")
        )

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):  # CustomTextCLIP with an open_clip text tower
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False) or text.output_tokens:
            return None
        if type(model).encode_text.__qualname__ != "CustomTextCLIP.encode_text":
            return None
        return _CausalTextTower(text, text.pool_type, text.eos_id) if usable(text, text.pool_type) else None
    if text is not None or type(model).__name__ != "CLIP":
        return None  # HF text tower, CoCa, or something we do not know
    pool = getattr(model, "text_pool_type", None)
    if pool == "eos" and getattr(model, "text_eos_id", None) is None:
        return None
    return _CausalTextTower(model, pool, getattr(model, "text_eos_id", None)) if usable(model, pool) else None


@dataclass
class TextEncoding:
    embeddings: np.ndarray  # [N, dim] float32, L2-normalised, input order
    n_truncated: int | None  # captions longer than the context length (truncated as open_clip does)
    truncated: np.ndarray | None  # their indices
    fast_path: bool  # False when the model's encode_text was used


def _bar(progress, total: int, desc: str, unit: str):
    """(bar, owned): `progress` may be True/False/None (a bar of our own, shown only on a
    terminal when None) or an existing tqdm-like bar to update (the caller closes it)."""
    if hasattr(progress, "update"):
        return progress, False
    return _progress(total=total, desc=desc, unit=unit, enabled=progress), True


def _normalise(x) -> np.ndarray:
    import torch.nn.functional as F

    return F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def encode_texts_with_info(
    bundle,
    texts: Sequence[str],
    batch_size: int = DEFAULT_TEXT_BATCH,
    progress=None,
    fast: bool = True,
    tokens: Tokens | None = None,
) -> TextEncoding:
    """Encode texts (fast path when the tower allows it); also report truncation.

    `tokens`: ``tokenize(bundle, texts)`` done already (the embed stage tokenizes every caption
    once, then encodes shard by shard); its truncation count is then reported as it is."""
    import torch

    if batch_size < 1:
        raise UserError("The batch size must be at least 1.")
    texts = list(texts)
    toks = tokenize(bundle, texts) if tokens is None else tokens
    if len(toks.ids) != len(texts):  # pragma: no cover - a caller bug
        raise ValueError(f"{len(toks.ids)} token rows for {len(texts)} texts")
    n = len(texts)
    model = bundle.model
    tower = fast_text_tower(model) if fast else None
    out = None
    bar, owned = _bar(progress, n, "captions", "caption")
    try:
        with torch.inference_mode():
            if n == 0:
                dim = _text_dim(model)
                return TextEncoding(np.zeros((0, dim), np.float32), toks.n_truncated, toks.truncated, tower is not None)
            ids = toks.ids
            if tower is not None:
                pool_idx = tower.pool_index(ids)
                lengths = pool_idx + 1
                # Longest first: a batch that does not fit in memory fails at once, not at the end.
                order = torch.argsort(-lengths, stable=True)
            else:
                order = torch.arange(n)
            if tower is not None:
                spans = _length_batches(lengths[order].tolist(), batch_size)
            else:
                spans = ((i, min(n, i + batch_size)) for i in range(0, n, batch_size))
            for start, end in spans:
                idx = order[start:end]
                batch = ids[idx].to(bundle.device, non_blocking=True)
                if tower is not None:
                    pidx = pool_idx[idx].to(bundle.device)
                    feats = tower.forward(batch, pidx, int(lengths[idx].max()))
                else:
                    feats = model.encode_text(batch)
                feats = _normalise(feats)
                if out is None:
                    out = np.empty((n, feats.shape[1]), dtype=np.float32)
                out[idx.numpy()] = feats
                bar.update(len(idx))
    finally:
        if owned:
            bar.close()
    return TextEncoding(out, toks.n_truncated, toks.truncated, tower is not None)


def encode_texts(
    bundle,
    texts: Sequence[str],
    batch_size: int = DEFAULT_TEXT_BATCH,
    progress=None,
    fast: bool = True,
) -> np.ndarray:
    """L2-normalised float32 text embeddings [len(texts), dim], in input order."""
    return encode_texts_with_info(bundle, texts, batch_size=batch_size, progress=progress, fast=fast).embeddings


def _text_dim(model) -> int:
    import torch

    with torch.inference_mode():
        dev = next(model.parameters()).device
        ctx = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", 77)
        return int(model.encode_text(torch.zeros(1, ctx, dtype=torch.long, device=dev)).shape[-1])


# --------------------------------------------------------------------------- images


def open_rgb(path, draft_size: tuple[int, int] | None = None):
    """Open an image file as an RGB PIL image (optionally JPEG-draft-decoded to >= draft_size)."""
    from PIL import Image

    img = Image.open(path)
    if draft_size is not None and img.format == "JPEG":
        img.draft(img.mode, draft_size)
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency; avoids PIL's warning, same RGB values
    return img.convert("RGB")


class ImageFiles:
    """A map-style dataset: path -> (preprocessed tensor, index, error message or '')."""

    def __init__(self, paths, preprocess, image_size, draft: bool = False):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.size = (int(image_size[0]), int(image_size[1]))
        side = max(self.size)
        self.draft_size = (side, side) if draft else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch

        path = self.paths[i]
        try:
            x = self.preprocess(open_rgb(path, self.draft_size))
            return x, i, ""
        except Exception as exc:  # any decode failure is reported with the file's name
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return torch.zeros(3, *self.size), i, f"{path} ({reason})"


@contextlib.contextmanager
def _single_threaded_torch():
    """Run small tensor ops (ToTensor, Normalize) on one thread, as DataLoader workers do.

    On a busy machine a multi-threaded elementwise op on a 224x224 image waits for a descheduled
    OpenMP thread and takes tens of milliseconds instead of a fraction of one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_process_batches(ds, batch_size: int):
    """What a DataLoader with num_workers=0 yields, with decoding on one torch thread."""
    from torch.utils.data import default_collate

    collate = _as_list if isinstance(ds, GpuJpegImages) else default_collate
    for start in range(0, len(ds), batch_size):
        with _single_threaded_torch():
            batch = collate([ds[i] for i in range(start, min(len(ds), start + batch_size))])
        yield batch


def default_num_workers(device: str) -> int:
    """Decode workers. On a GPU the model is fast, so most cores decode. On a CPU the model already
    uses every core, so a worker only competes with it: none on 1-2 cores (decoding in between
    batches on one thread costs less than oversubscription), about a quarter of the cores beyond."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda") or device == "mps":
        return max(1, min(16, cores - 1))
    return 0 if cores <= 2 else max(1, cores // 4)


DECODES = ("cpu", "gpu")


def loader_batch_size(n: int, batch_size: int, num_workers: int) -> int:
    """Files per loader batch: the model's batch size, or a fraction 1/k of it when that gives each
    decode worker fewer than 4 batches of the stream, so the stream's last round leaves few workers
    idle (20 batches of 256 over 15 workers run in 2 rounds, the second with 5 workers busy). The
    model still runs on batches of exactly `batch_size` (the last one smaller), cut from the stream."""
    if num_workers <= 0 or n <= 0:
        return batch_size
    target = max(1, -(-n // (4 * num_workers)))
    if target >= batch_size:
        return batch_size
    k = -(-batch_size // target)
    return -(-batch_size // k)


def check_decode(decode: str, device: str, draft: bool = False) -> None:
    """Refuse an image decoder this machine or these options cannot use, saying what to pass instead."""
    if decode not in DECODES:
        raise UserError(f"Unknown --decode {decode!r}; use cpu or gpu.")
    if decode == "cpu":
        return
    if draft:
        raise UserError("--draft-decode is for the CPU decoder; drop it or --decode gpu.")
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            "--decode gpu decodes JPEGs on a CUDA GPU (torchvision's nvJPEG decoder), and CUDA is not available "
            "here. Drop --decode gpu (the default --decode cpu is exact)."
        )
    if not str(device).startswith("cuda"):
        raise UserError(f"--decode gpu needs the model on a CUDA device, not {device}. Use --device cuda.")


def encode_images(
    bundle,
    paths: Sequence,
    batch_size: int = DEFAULT_IMAGE_BATCH,
    num_workers: int | None = None,
    draft: bool = False,
    progress=None,
    decode: str = "cpu",
    on_batch=None,
    stats: dict | None = None,
) -> np.ndarray:
    """L2-normalised float32 image embeddings [len(paths), dim], in input order.

    All files go through one loader (workers started once). `on_batch(indices, embeddings)` is
    called after each batch, in input order (the embed stage cuts its shards from it).
    ``decode="gpu"`` decodes JPEGs on the model's CUDA device (see `GpuJpegImages`); `stats`, when
    given, receives ``cpu_fallbacks``: how many files took the CPU path instead."""
    import torch
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise UserError("The batch size must be at least 1.")
    check_decode(decode, bundle.device, draft)
    paths = list(paths)
    model = bundle.model
    if num_workers is None:
        num_workers = default_num_workers(bundle.device)
    num_workers = max(0, min(int(num_workers), -(-len(paths) // 8)))  # at least 8 files a worker
    if decode == "gpu":
        spec = gpu_preprocess_or_refuse(bundle)
        gpu = GpuJpegImages(paths, bundle.preprocess, bundle.image_size, spec, bundle.device)
        ds = gpu
    else:
        ds = ImageFiles(paths, bundle.preprocess, bundle.image_size, draft=draft)
    per_load = loader_batch_size(len(paths), batch_size, num_workers)
    if num_workers == 0:
        loader = _in_process_batches(ds, per_load)
    else:
        loader = DataLoader(
            ds,
            batch_size=per_load,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=bundle.device.startswith("cuda") and decode == "cpu",
            persistent_workers=False,
            collate_fn=_as_list if decode == "gpu" else None,
        )
    dtype = bundle.input_dtype
    out = None
    bar, owned = _bar(progress, len(paths), "images", "image")
    pending: list = []

    def forward():
        """Run the model on the first `batch_size` pending rows (all of them at the end of the stream)."""
        nonlocal out
        x = torch.cat([p[0] for p in pending]) if len(pending) > 1 else pending[0][0]
        rows = np.concatenate([p[1] for p in pending])
        pending.clear()
        if len(rows) > batch_size:
            pending.append((x[batch_size:], rows[batch_size:]))
            x, rows = x[:batch_size], rows[:batch_size]
        feats = _normalise(model.encode_image(x.to(bundle.device, dtype=dtype, non_blocking=True)))
        if out is None:
            out = np.empty((len(paths), feats.shape[1]), dtype=np.float32)
        out[rows] = feats
        if on_batch is not None:
            on_batch(rows, feats)
        bar.update(len(rows))

    try:
        with torch.inference_mode():
            for batch in loader:
                x, idx, errs = gpu.assemble(batch) if decode == "gpu" else batch
                bad = [e for e in errs if e]
                if bad:
                    raise UserError(
                        f"Cannot decode image file(s): {list_offenders(bad, limit=3)}. "
                        "Replace or remove the file(s) and ingest again with --skip-bad-images."
                    )
                pending.append((x, idx.numpy() if hasattr(idx, "numpy") else np.asarray(idx)))
                while sum(len(p[1]) for p in pending) >= batch_size:
                    forward()
            if pending:
                forward()
    finally:
        if owned:
            bar.close()
        if stats is not None and decode == "gpu":
            stats["cpu_fallbacks"] = stats.get("cpu_fallbacks", 0) + gpu.n_cpu
    if out is None:
        out = np.zeros((0, _image_dim(bundle)), np.float32)
    return out


# --------------------------------------------------------------------------- GPU JPEG decoding


@dataclass(frozen=True)
class TensorPreprocess:
    """The model's eval preprocess as tensor ops: Resize (bicubic, antialiased) -> CenterCrop ->
    RGB -> [0, 1] -> Normalize. `resize` is torchvision's size: an int (shorter side) or (h, w)."""

    resize: object
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """torchvision's Resize output size (its `_compute_resized_output_size`, max_size None)."""
        if isinstance(self.resize, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        return int(self.resize[0]), int(self.resize[1])


def tensor_preprocess_spec(preprocess) -> TensorPreprocess | None:
    """`preprocess` (open_clip's eval transform) as a TensorPreprocess, or None when it holds a step
    that the tensor path does not reproduce (another interpolation, resize mode or transform)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    steps = list(getattr(preprocess, "transforms", []))
    resize = crop = norm = None
    for t in steps:
        name = type(t).__name__
        if isinstance(t, T.Resize) and resize is None and crop is None:
            size = t.size
            if t.interpolation != InterpolationMode.BICUBIC or t.max_size is not None or t.antialias is False:
                return None
            if isinstance(size, list | tuple) and len(size) == 1:
                size = size[0]
            resize = int(size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        elif isinstance(t, T.CenterCrop) and resize is not None and crop is None:
            crop = (int(t.size[0]), int(t.size[1]))
        elif name in ("MaybeConvertMode", "_convert_to_rgb") or getattr(t, "__name__", "") == "_convert_to_rgb":
            if getattr(t, "mode", "RGB") != "RGB":
                return None
        elif name in ("MaybeToTensor", "ToTensor"):
            pass
        elif isinstance(t, T.Normalize) and crop is not None and norm is None:
            norm = (tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std))
        else:
            return None
    if resize is None or crop is None or norm is None or len(norm[0]) != 3 or len(norm[1]) != 3:
        return None
    return TensorPreprocess(resize, crop, norm[0], norm[1])


def gpu_preprocess_or_refuse(bundle) -> TensorPreprocess:
    """The tensor form of `bundle`'s preprocess, or a UserError when --decode gpu cannot reproduce it."""
    spec = tensor_preprocess_spec(bundle.preprocess)
    if spec is None:
        shown = " ".join(repr(bundle.preprocess).split())
        raise UserError(f"--decode gpu cannot reproduce this model's preprocess ({shown}). Use --decode cpu.")
    return spec


def preprocess_tensor(img, spec: TensorPreprocess, device=None):
    """One decoded image (uint8 [C, H, W], C = 1 or 3) -> the model's input [3, crop_h, crop_w], float32.

    The same steps as the PIL preprocess, on `device`: bicubic antialiased resize (torch's
    antialiased bicubic is PIL's filter; the result is rounded to uint8 as PIL's is), centre crop
    (zero padding when the image is smaller, as torchvision pads), scale to [0, 1], normalise."""
    return preprocess_tensors([img], spec, device)[0]


def preprocess_tensors(imgs, spec: TensorPreprocess, device=None):
    """`preprocess_tensor` for a list of images, [N, 3, crop_h, crop_w]; images of one size are
    resized together (one kernel for the group instead of one per image)."""
    import torch
    import torch.nn.functional as F

    imgs = [x.to(device) if device is not None else x for x in imgs]
    imgs = [x.expand(3, -1, -1) if x.shape[0] == 1 else x for x in imgs]  # grey -> RGB, as PIL's convert
    if not imgs:
        h, w = spec.crop
        return torch.zeros(0, 3, h, w)
    dev = imgs[0].device
    mean = torch.tensor(spec.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    out = [None] * len(imgs)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, x in enumerate(imgs):
        groups.setdefault((int(x.shape[-2]), int(x.shape[-1])), []).append(k)
    ch, cw = spec.crop
    for (h, w), ks in groups.items():
        x = torch.stack([imgs[k] for k in ks]).float()
        oh, ow = spec.resized_size(h, w)
        if (oh, ow) != (h, w):
            x = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
        if ch > oh or cw > ow:  # torchvision pads with zeros, then crops
            pt, pl = max(0, (ch - oh) // 2), max(0, (cw - ow) // 2)
            x = F.pad(x, (pl, max(0, cw - ow) - pl, pt, max(0, ch - oh) - pt))
            oh, ow = int(x.shape[-2]), int(x.shape[-1])
        top, left = int(round((oh - ch) / 2.0)), int(round((ow - cw) / 2.0))
        x = (x[:, :, top : top + ch, left : left + cw] / 255.0 - mean) / std
        for j, k in enumerate(ks):
            out[k] = x[j]
    return torch.stack(out)


def gpu_decodable(data: bytes) -> bool:
    """A baseline (or extended sequential) 3-component JPEG without an Adobe colour transform marker:
    what nvJPEG decodes to the same RGB as libjpeg. Progressive, lossless, CMYK, greyscale and
    Adobe-marked files, files that do not end with the end-of-image marker (truncated: a decoder
    may fill them in grey where PIL refuses them), and anything that is not a JPEG take the CPU path."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xEE:  # APP14 Adobe: a colour transform nvJPEG may not honour
            return False
        if marker in (0xC0, 0xC1):
            return i + 9 < n and data[i + 9] == 3
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # progressive, lossless, arithmetic coding
        if marker == 0xDA:  # start of scan before any frame header
            return False
        i += 2 + length
    return False


def _as_list(batch):
    return batch


class GpuJpegImages:
    """A map-style dataset for ``decode="gpu"``: workers read a file's bytes (JPEGs nvJPEG decodes)
    or decode it with PIL and the model's own preprocess (every other file), and `assemble` decodes
    a batch's JPEGs on the device, preprocesses them there (`preprocess_tensor`) and stacks the
    batch. A batch the GPU decoder refuses is decoded one file at a time; a file it still refuses
    takes the CPU path."""

    def __init__(self, paths, preprocess, image_size, spec: TensorPreprocess, device: str):
        self.cpu = ImageFiles(paths, preprocess, image_size)
        self.spec, self.device = spec, device
        self.n_cpu = 0  # files that took the CPU path (in the main process's view)

    def __len__(self):
        return len(self.cpu)

    def __getitem__(self, i):
        path = self.cpu.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            return ("error", None, i, f"{path} ({exc.strerror or exc})")
        if gpu_decodable(data):
            return ("jpeg", data, i, "")
        x, _, err = self.cpu[i]
        return ("tensor", x, i, err)

    def _decode(self, datas: list):
        """uint8 [3, H, W] tensors on the device for each JPEG (None where the decoder refuses it)."""
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            from torchvision.io import ImageReadMode, decode_jpeg

        def dec(x):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(x, mode=ImageReadMode.RGB, device=self.device)

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if not raw:
            return []
        try:
            return list(dec(raw))
        except RuntimeError:
            out = []
            for r in raw:
                try:
                    out.append(dec(r))
                except RuntimeError:
                    out.append(None)
            return out

    def assemble(self, items):
        """(inputs [B, 3, h, w] on the device, indices, error messages) for a batch of __getitem__ items."""
        import torch

        jpegs = [k for k, it in enumerate(items) if it[0] == "jpeg"]
        decoded = dict(zip(jpegs, self._decode([items[k][1] for k in jpegs])))
        ok = [k for k in jpegs if decoded[k] is not None]
        on_gpu = dict(zip(ok, preprocess_tensors([decoded[k] for k in ok], self.spec))) if ok else {}
        h, w = self.cpu.size
        xs, errs = [], []
        for k, (what, payload, i, err) in enumerate(items):
            if k in on_gpu:
                xs.append(on_gpu[k])
                errs.append("")
                continue
            if what == "jpeg":  # refused by the GPU decoder: the CPU path, in this process
                payload, _, err = self.cpu[i]
            if what != "error":
                self.n_cpu += 1
            xs.append(payload.to(self.device) if payload is not None else torch.zeros(3, h, w, device=self.device))
            errs.append(err)
        return torch.stack(xs), torch.tensor([it[2] for it in items]), errs


def _image_dim(bundle) -> int:
    import torch

    h, w = bundle.image_size
    with torch.inference_mode():
        x = torch.zeros(1, 3, h, w, device=bundle.device, dtype=bundle.input_dtype)
        return int(bundle.model.encode_image(x).shape[-1])
