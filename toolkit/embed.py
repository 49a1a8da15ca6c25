"""The embed stage: L2-normalised float32 CLIP embeddings of a subset's images and captions.

`embed(con, subset_name, model=SPEC, ...)` writes one ``.npy`` file per kind (``image``: the
subset's images in ``subset_images.position`` order; ``text``: its captions ordered by image
position, then caption position) into a cache folder beside the database
(``<db stem>_cache/embeddings/<subset>/``, or ``cache_dir``), and registers each file in
``embedding_sets`` with its row order in ``embedding_rows``.

Identity and reuse. A set is identified by its kind, the subset (id, config hash and the exact
row order), the model as resolved (open_clip name, pretrained tag, checkpoint sha256), the
precision and, for images, JPEG draft decoding. That identity's hash is stored in the set's
config. Asking again for a set that exists with a matching file checksum computes nothing; a
file that is missing or changed is an error that suggests ``--recompute``, never silently
reused. Device, batch size and workers are recorded but are not part of the identity.

Resume. Rows are computed in shards (512 images or 4096 captions) written atomically under
``.partial/`` in the cache folder. An interrupted run (Ctrl-C, kill) leaves complete shards
behind, and the next run with the same identity reuses them. Only when every shard of a set is
there is the final file written (its name carries the identity and content hashes, so a
recompute never overwrites a file that another set row still references), and all sets of the
run are registered in one transaction together with the run row; the shards are removed after
the commit. The database therefore never references a half-written set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit import artifacts, db
from toolkit import paths as study_paths
from toolkit.errors import UserError, list_offenders
from toolkit.progress import progress as _progress

KINDS = ("image", "text")
SHARD_ROWS = {"image": 512, "text": 4096}


@dataclass
class EmbedResult:
    subset: str
    subset_id: int
    model: str
    pretrained: str | None
    checkpoint_sha256: str | None
    precision: str
    draft: bool
    image_set_id: int
    text_set_id: int
    image_path: str
    text_path: str
    n_images: int
    n_captions: int
    dim: int
    n_truncated: int | None  # captions longer than the text context (truncated as open_clip does)
    context_length: int | None
    computed: list[str] = field(default_factory=list)  # kinds computed by this call
    reused_shards: int = 0  # shards left by an interrupted run and reused
    run_id: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return not self.computed


def default_cache_dir(con) -> Path:
    """`<database folder>/<database stem>_cache/embeddings` (beside the database file)."""
    rows = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    dbfile = Path(rows[0][0]) if rows and rows[0][0] else Path("clipfail.duckdb")
    return dbfile.resolve().parent / f"{dbfile.stem}_cache" / "embeddings"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.") or "x"


def _ids_sha(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def subset_items(con, subset_id: int):
    """(image_ids, rel_paths) in position order and (caption_ids, texts) in (image, caption) position order."""
    imgs = con.execute(
        """
        SELECT si.image_id, i.rel_path
        FROM subset_images si JOIN images i USING (image_id)
        WHERE si.subset_id = ? ORDER BY si.position
        """,
        [subset_id],
    ).df()
    caps = con.execute(
        """
        SELECT sc.caption_id, c.text
        FROM subset_captions sc
        JOIN captions c USING (caption_id)
        JOIN subset_images si ON si.subset_id = sc.subset_id AND si.image_id = sc.image_id
        WHERE sc.subset_id = ? ORDER BY si.position, sc.position
        """,
        [subset_id],
    ).df()
    return imgs, caps


def _existing_set(con, subset_id: int, kind: str, identity_hash: str):
    row = con.execute(
        """
        SELECT embedding_set_id, path, sha256, rows, dim, config_json
        FROM embedding_sets
        WHERE subset_id = ? AND kind = ? AND json_extract_string(config_json, '$.identity_hash') = ?
        ORDER BY embedding_set_id DESC LIMIT 1
        """,
        [subset_id, kind, identity_hash],
    ).fetchone()
    if row is None:
        return None
    keys = ("embedding_set_id", "path", "sha256", "rows", "dim", "config_json")
    out = dict(zip(keys, row))
    out["config"] = json.loads(out.pop("config_json") or "{}")
    out["path"] = str(study_paths.resolve(con, out["path"]))
    return out


class _Shards:
    """Atomic shard files of one set under construction: shard-000000.npy, ... plus a manifest."""

    def __init__(self, folder: Path, identity_hash: str, rows: int, shard_rows: int):
        self.folder, self.rows, self.shard_rows = folder, rows, shard_rows
        self.n = max(1, -(-rows // shard_rows))
        manifest = {"identity_hash": identity_hash, "rows": rows, "shard_rows": shard_rows}
        mpath = folder / "manifest.json"
        if folder.exists():
            try:
                same = json.loads(mpath.read_text()) == manifest
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not mpath.exists():
            mpath.write_text(json.dumps(manifest))

    def span(self, i: int) -> tuple[int, int]:
        return i * self.shard_rows, min(self.rows, (i + 1) * self.shard_rows)

    def path(self, i: int) -> Path:
        return self.folder / f"shard-{i:06d}.npy"

    def load(self, i: int, dim: int | None) -> np.ndarray | None:
        """A complete earlier shard, or None."""
        p = self.path(i)
        if not p.exists():
            return None
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        a, b = self.span(i)
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != b - a or (dim and arr.shape[1] != dim):
            return None
        return arr

    def save(self, i: int, arr: np.ndarray) -> None:
        p = self.path(i)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


def embed(
    con,
    subset_name: str | None = None,
    model: str = "openai/clip-vit-base-patch32",
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    recompute: bool = False,
    draft: bool = False,
    num_workers: int | None = None,
    *,
    progress: bool | None = None,
    shard_rows: dict | None = None,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> EmbedResult:
    """Embed a subset's images and captions (or reuse the cached sets); see the module docstring.

    `on_shard(kind, shard_index, n_shards)` is called after each shard is on disk (tests use it
    to simulate an interruption).
    """
    from toolkit import encode, models

    t0 = time.perf_counter()
    started = db.now()
    if precision not in models.PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}; use one of {', '.join(models.PRECISIONS)}.")
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if num_workers is not None and num_workers < 0:
        raise UserError("--num-workers must be 0 or more.")
    subset = db.get_subset(con, subset_name)
    subset_id, name = int(subset["subset_id"]), str(subset["name"])
    weights = models.weights_identity(model, pretrained, checkpoint)
    ckpt_path = study_paths.to_stored(con, checkpoint) if checkpoint is not None else None

    imgs, caps = subset_items(con, subset_id)
    if imgs.empty:
        raise UserError(f"Subset {name!r} has no images. Ingest it again.")
    image_root = study_paths.resolve(con, subset["image_root"])
    paths = [str(image_root / p) for p in imgs["rel_path"]]
    items = {
        "image": np.asarray(imgs["image_id"], dtype=np.int64),
        "text": np.asarray(caps["caption_id"], dtype=np.int64),
    }
    base = {
        "stage": "embed",
        "subset_id": subset_id,
        "subset_config_hash": str(subset["config_hash"]),
        **weights,
        "precision": precision,
    }
    identities = {
        "image": {**base, "kind": "image", "items_sha256": _ids_sha(items["image"]), "draft": bool(draft)},
        "text": {**base, "kind": "text", "items_sha256": _ids_sha(items["text"])},
    }
    hashes = {k: db.config_hash(v) for k, v in identities.items()}

    fix = "Run the same command with --recompute to rebuild it."
    existing, todo = {}, []
    for kind in KINDS:
        found = None if recompute else _existing_set(con, subset_id, kind, hashes[kind])
        if found is not None:
            artifacts.verify_file(found["path"], found["sha256"], what=f"{kind} embedding file", fix=fix)
            existing[kind] = found
        else:
            todo.append(kind)

    cache_root = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir(con)
    folder = cache_root / _slug(name)
    notes: list[str] = []
    bundle = None
    computed: dict[str, dict] = {}
    reused_shards = 0
    n_truncated = context_length = None
    fast_text = None
    if todo:
        if "image" in todo:
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise UserError(
                    f"Image files of subset {name!r} are missing under {image_root}: "
                    f"{list_offenders(missing, limit=3)}. Restore them, or ingest again with --skip-bad-images. "
                    f"{study_paths.moved_hint(con, '--images-root', name)}"
                )
        bundle = models.load_model(
            model, pretrained=pretrained, checkpoint=checkpoint, device=device, precision=precision
        )
        got = {
            "model": bundle.model_name,
            "pretrained": bundle.pretrained,
            "checkpoint_sha256": bundle.checkpoint_sha256,
        }
        if got != weights:  # pragma: no cover - weights_identity and load_model must agree
            raise RuntimeError(f"model identity mismatch: {got} != {weights}")
        notes.extend(bundle.notes)
        rows_per = dict(SHARD_ROWS, **(shard_rows or {}))
        on_gpu = bundle.device != "cpu"
        img_bs = batch_size or (256 if on_gpu else encode.DEFAULT_IMAGE_BATCH)
        txt_bs = batch_size or (1024 if on_gpu else encode.DEFAULT_TEXT_BATCH)
        for kind in todo:
            n = len(items[kind])
            shards = _Shards(folder / ".partial" / f"{kind}-{hashes[kind][:16]}", hashes[kind], n, rows_per[kind])
            parts, dim = [], None
            unit = "image" if kind == "image" else "caption"
            bar = _progress(total=n, desc=f"{kind} embeddings", unit=unit, enabled=progress)
            try:
                for i in range(shards.n):
                    a, b = shards.span(i)
                    arr = shards.load(i, dim)
                    fresh = arr is None
                    if not fresh:
                        reused_shards += 1
                        bar.update(b - a)
                    elif kind == "image":
                        arr = encode.encode_images(
                            bundle, paths[a:b], batch_size=img_bs, num_workers=num_workers, draft=draft, progress=bar
                        )
                    else:
                        res = encode.encode_texts_with_info(bundle, caps["text"].iloc[a:b].tolist(), txt_bs, bar)
                        arr, fast_text = res.embeddings, res.fast_path
                    if arr.shape[0] != b - a:  # pragma: no cover - encoders return one row per item
                        raise RuntimeError("encoder returned the wrong number of rows")
                    if dim is None:
                        dim = arr.shape[1]
                    if fresh:
                        shards.save(i, arr)
                        if on_shard is not None:
                            on_shard(kind, i, shards.n)
                    parts.append(arr)
            finally:
                bar.close()
            array = np.concatenate(parts) if parts else np.zeros((0, dim or 0), np.float32)
            array = np.ascontiguousarray(array, dtype=np.float32)
            set_cfg = dict(identities[kind], identity_hash=hashes[kind], spec=model, checkpoint=ckpt_path)
            set_cfg.update(_made_with(bundle, kind, img_bs if kind == "image" else txt_bs, num_workers))
            if kind == "text":
                toks = encode.tokenize(bundle, caps["text"].tolist())
                n_truncated, context_length = toks.n_truncated, bundle.context_length
                set_cfg.update(n_truncated=n_truncated, context_length=context_length, fast_text_path=fast_text)
            stem = f"{kind}-{_slug(bundle.model_name)}-{hashes[kind][:12]}"
            tmp = folder / f".{stem}.npy.tmp{os.getpid()}"
            sha = artifacts.save_array(tmp, array)
            final = folder / f"{stem}-{sha[:12]}.npy"
            os.replace(tmp, final)
            computed[kind] = {"array": array, "sha": sha, "path": final, "config": set_cfg, "shards": shards}

        run_config = {
            "stage": "embed",
            "subset_id": subset_id,
            **weights,
            "precision": precision,
            "draft": bool(draft),
            "spec": model,
            "checkpoint": ckpt_path,
            "computed": {k: hashes[k] for k in computed},
            "recompute": bool(recompute),
        }
        with db.transaction(con):
            run_id = db.insert_run(
                con, "embed", run_config, started, model=weights["model"], pretrained=weights["pretrained"]
            )
            for kind, c in computed.items():
                set_id = artifacts.register_embedding_set(
                    con,
                    kind=kind,
                    subset_id=subset_id,
                    model=weights["model"],
                    pretrained=weights["pretrained"],
                    checkpoint_sha256=weights["checkpoint_sha256"],
                    precision=precision,
                    config=c["config"],
                    path=c["path"],
                    array=c["array"],
                    item_ids=items[kind],
                    sha256=c["sha"],
                    run_id=run_id,
                )
                existing[kind] = {
                    "embedding_set_id": set_id,
                    "path": str(c["path"]),
                    "dim": c["array"].shape[1],
                    "config": c["config"],
                }
        for c in computed.values():
            shutil.rmtree(c["shards"].folder, ignore_errors=True)
        partial = folder / ".partial"
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()
    else:
        run_id = None

    text_cfg = existing["text"]["config"]
    if n_truncated is None:
        n_truncated, context_length = text_cfg.get("n_truncated"), text_cfg.get("context_length")
    return EmbedResult(
        subset=name,
        subset_id=subset_id,
        model=weights["model"],
        pretrained=weights["pretrained"],
        checkpoint_sha256=weights["checkpoint_sha256"],
        precision=precision,
        draft=bool(draft),
        image_set_id=int(existing["image"]["embedding_set_id"]),
        text_set_id=int(existing["text"]["embedding_set_id"]),
        image_path=str(existing["image"]["path"]),
        text_path=str(existing["text"]["path"]),
        n_images=len(items["image"]),
        n_captions=len(items["text"]),
        dim=int(existing["image"]["dim"]),
        n_truncated=n_truncated,
        context_length=context_length,
        computed=list(computed),
        reused_shards=reused_shards,
        run_id=run_id,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _made_with(bundle, kind: str, batch_size: int, num_workers) -> dict:
    """How a set was made, beyond its identity (recorded, not compared)."""
    import open_clip
    import torch

    out = {
        "device": bundle.device,
        "batch_size": batch_size,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    if kind == "image":
        out["preprocess"] = " ".join(repr(bundle.preprocess).split())
        out["image_size"] = list(bundle.image_size)
        out["num_workers"] = num_workers
    return out


def embed_subset(con, subset_name: str | None, model_spec: str, **kwargs) -> EmbedResult:
    """`embed` with the model spec as a positional argument."""
    return embed(con, subset_name, model=model_spec, **kwargs)
