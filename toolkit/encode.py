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


def tokenize(bundle, texts: Sequence[str]) -> Tokens:
    """Tokenize like ``bundle.tokenizer(texts)`` and count the captions it truncates."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    tok = bundle.tokenizer
    ctx = int(bundle.context_length)
    texts = [str(t) for t in texts]
    if isinstance(tok, SimpleTokenizer) and getattr(tok, "reduction_fn", None) is None:
        # open_clip's SimpleTokenizer.__call__, keeping the untruncated lengths.
        sot, eot = tok.sot_token_id, tok.eot_token_id
        ids = torch.zeros(len(texts), ctx, dtype=torch.long)
        truncated = []
        for i, text in enumerate(texts):
            seq = [sot] + tok.encode(text) + [eot]
            if len(seq) > ctx:
                seq = seq[:ctx]
                seq[-1] = eot
                truncated.append(i)
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return Tokens(ids, len(truncated), np.asarray(truncated, dtype=np.int64))
    ids = tok(texts, context_length=ctx) if ctx else tok(texts)
    return Tokens(ids, None, None)


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
) -> TextEncoding:
    """Encode texts (fast path when the tower allows it); also report truncation."""
    import torch

    if batch_size < 1:
        raise UserError("The batch size must be at least 1.")
    texts = list(texts)
    toks = tokenize(bundle, texts)
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


def _in_process_batches(ds: ImageFiles, batch_size: int):
    """What a DataLoader with num_workers=0 yields, with decoding on one torch thread."""
    from torch.utils.data import default_collate

    for start in range(0, len(ds), batch_size):
        with _single_threaded_torch():
            batch = default_collate([ds[i] for i in range(start, min(len(ds), start + batch_size))])
        yield batch


def default_num_workers(device: str) -> int:
    """Decode workers. On a GPU the model is fast, so most cores decode. On a CPU the model already
    uses every core, so a worker only competes with it: none on 1-2 cores (decoding in between
    batches on one thread costs less than oversubscription), about a quarter of the cores beyond."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda") or device == "mps":
        return max(1, min(16, cores - 1))
    return 0 if cores <= 2 else max(1, cores // 4)


def encode_images(
    bundle,
    paths: Sequence,
    batch_size: int = DEFAULT_IMAGE_BATCH,
    num_workers: int | None = None,
    draft: bool = False,
    progress=None,
) -> np.ndarray:
    """L2-normalised float32 image embeddings [len(paths), dim], in input order."""
    import torch
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise UserError("The batch size must be at least 1.")
    paths = list(paths)
    model = bundle.model
    if num_workers is None:
        num_workers = default_num_workers(bundle.device)
    num_workers = max(0, min(int(num_workers), len(paths) // max(1, batch_size) + 1))
    ds = ImageFiles(paths, bundle.preprocess, bundle.image_size, draft=draft)
    if num_workers == 0:
        loader = _in_process_batches(ds, batch_size)
    else:
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=bundle.device.startswith("cuda"),
            persistent_workers=False,
        )
    dtype = bundle.input_dtype
    out = None
    bar, owned = _bar(progress, len(paths), "images", "image")
    try:
        with torch.inference_mode():
            for x, idx, errs in loader:
                bad = [e for e in errs if e]
                if bad:
                    raise UserError(
                        f"Cannot decode image file(s): {list_offenders(bad, limit=3)}. "
                        "Replace or remove the file(s) and ingest again with --skip-bad-images."
                    )
                x = x.to(bundle.device, dtype=dtype, non_blocking=True)
                feats = _normalise(model.encode_image(x))
                if out is None:
                    out = np.empty((len(paths), feats.shape[1]), dtype=np.float32)
                out[idx.numpy()] = feats
                bar.update(len(idx))
    finally:
        if owned:
            bar.close()
    if out is None:
        out = np.zeros((0, _image_dim(bundle)), np.float32)
    return out


def _image_dim(bundle) -> int:
    import torch

    h, w = bundle.image_size
    with torch.inference_mode():
        x = torch.zeros(1, 3, h, w, device=bundle.device, dtype=bundle.input_dtype)
        return int(bundle.model.encode_image(x).shape[-1])
