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
``.partial/<kind>-<identity>/`` in the cache folder, each with its sha256 in the folder's
manifest. The images of every shard still to compute go through ONE loader (workers start once),
and each shard is cut from that stream and saved as soon as its last row arrives; the captions
are tokenized once, all together (which also counts truncation), then encoded shard by shard.
An interrupted run (Ctrl-C, kill) leaves complete shards behind, and the next run with
the same identity reuses those whose checksum matches the manifest (any other shard is computed
again). A lock file (``flock``) beside the folder is held while a set is computed, so two
processes embedding the same set into one cache folder never share or delete each other's shards:
the second one is refused with a message to wait. Every shard and every final array is checked
(finite, unit length within the precision's tolerance) before it is saved or registered. Only
when every shard of a set is there is the final file written (its name carries the identity and
content hashes, so a recompute never overwrites a file that another set row still references),
and all sets of the run are registered in one transaction together with the run row; the shards
are removed after the commit. The database therefore never references a half-written set.

A run with nothing to compute reads the database, checks identities and file checksums, and
returns: no model, no workers, and (for the common specs, see `models._resolve_light`) no torch or
open_clip import. A ``--checkpoint``'s sha256 is looked up in ``checkpoint-sha256.json`` in the
cache root (by path, size, mtime, ctime and inode) and written there after a successful run.

The database is not held open while the model encodes: `embed` reads its inputs, closes the
database, computes, and opens it again to register the sets, checking the identity again there
(a set that another process registered meanwhile is reused, not duplicated).
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

from toolkit.embed.devices import resolve_device
from toolkit.errors import UserError, list_offenders
from toolkit.progress import progress as _progress
from toolkit.store import artifacts, db
from toolkit.store import paths as study_paths
from toolkit.store.study import open_study

KINDS = ("image", "text")
SHARD_ROWS = {"image": 512, "text": 4096}
CHECKPOINT_SUMS = "checkpoint-sha256.json"  # in the cache root: a checkpoint's sha256 by (path, size, times, inode)


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
    decode: str = "cpu"

    @property
    def is_noop(self) -> bool:
        return not self.computed


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
    """Atomic shard files of one set under construction: shard-000000.npy, ... plus a manifest.

    The manifest records the identity, the row layout and the sha256 of every shard written. A
    shard is reused only when its file's checksum matches its manifest entry; a shard without an
    entry (an older run, a crash between the shard and the manifest write) or with another checksum
    is computed again. The caller holds the folder's `_PartialLock` throughout.
    """

    def __init__(self, folder: Path, identity_hash: str, rows: int, shard_rows: int):
        self.folder, self.rows, self.shard_rows = folder, rows, shard_rows
        self.n = max(1, -(-rows // shard_rows))
        self.header = {"identity_hash": identity_hash, "rows": rows, "shard_rows": shard_rows}
        self.mpath = folder / "manifest.json"
        self.sums: dict[str, str] = {}
        if folder.exists():
            try:
                manifest = json.loads(self.mpath.read_text())
                same = {k: manifest.get(k) for k in self.header} == self.header
            except (OSError, ValueError, AttributeError):
                manifest, same = {}, False
            if not same:
                shutil.rmtree(folder)
            elif isinstance(manifest.get("shards"), dict):
                self.sums = {str(k): str(v) for k, v in manifest["shards"].items()}
        folder.mkdir(parents=True, exist_ok=True)
        if not self.mpath.exists():
            self._write_manifest()

    def _write_manifest(self) -> None:
        tmp = self.mpath.with_name(self.mpath.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({**self.header, "shards": self.sums}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.mpath)

    def span(self, i: int) -> tuple[int, int]:
        return i * self.shard_rows, min(self.rows, (i + 1) * self.shard_rows)

    def path(self, i: int) -> Path:
        return self.folder / f"shard-{i:06d}.npy"

    def load(self, i: int, dim: int | None) -> np.ndarray | None:
        """A complete earlier shard whose checksum matches the manifest, or None."""
        p = self.path(i)
        want = self.sums.get(str(i))
        if want is None or not p.is_file():
            return None
        try:
            if artifacts.sha256_file(p) != want:
                return None
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        a, b = self.span(i)
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != b - a or (dim and arr.shape[1] != dim):
            return None
        return arr

    def save(self, i: int, arr: np.ndarray) -> None:
        """Write shard i atomically, then record its sha256 in the manifest (also atomically)."""
        p = self.path(i)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        sha = artifacts.sha256_file(tmp)
        os.replace(tmp, p)
        self.sums[str(i)] = sha
        self._write_manifest()


class _PartialLock:
    """An exclusive, non-blocking ``flock`` on ``<partial folder>.lock``.

    Held from before a set's shards are read or written until they are registered (or the run
    fails), so that two processes embedding the same set into one cache folder (two databases with
    the same subset sharing ``--cache-dir``) never share, reset or delete each other's shards. The
    second one gets a clear UserError instead. The lock file is removed on release; an acquirer
    checks that the file it locked is still the one at the path (else it retries), so removing it
    is safe. Where fcntl is unavailable (Windows), no lock is taken.
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = path, what, None

    def acquire(self) -> _PartialLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        for _ in range(50):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileNotFoundError:  # the parent was removed by a finishing run: make it again
                continue
            except OSError as exc:  # a symlink planted at the lock's path, a read-only folder, ...
                raise UserError(
                    f"Cannot create the lock file {self.path} ({exc.strerror or exc}). Remove whatever is at "
                    "that path, or choose a writable --cache-dir."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = ""
                try:
                    holder = os.read(fd, 64).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                pid = f" (process {holder})" if holder.isdigit() else ""
                raise UserError(
                    f"Another clipfail embed{pid} is computing the same {self.what} into {self.path.parent}. "
                    "Wait for it to finish, then run this command again."
                ) from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return self
            os.close(fd)  # we locked a file that its holder removed on release: lock the new one
        raise UserError(f"Could not lock {self.path}; run the command again.")  # pragma: no cover

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


NORM_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}


def check_embeddings(array: np.ndarray, kind: str, precision: str, item_ids: np.ndarray, what: str) -> None:
    """Refuse an array that is not finite and L2-normalised (within the precision's tolerance)."""
    unit = "image_id" if kind == "image" else "caption_id"
    if array.ndim != 2 or array.shape[0] != len(item_ids) or (array.size and array.shape[1] < 1):
        raise UserError(f"The {what} have shape {array.shape}, expected {len(item_ids)} rows.")
    finite = np.isfinite(array).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(array), array, 0).astype(np.float64), axis=1)
    bad_norm = finite & (np.abs(norms - 1.0) > NORM_TOLERANCE.get(precision, 1e-4))
    half = precision != "fp32"
    if not finite.all():
        rows = np.flatnonzero(~finite)
        detail = f"{len(rows)} row(s) contain NaN or infinite values"
        hint = (
            f"--precision {precision} can overflow for this model: use --precision fp32"
            + (" or bf16" if precision == "fp16" else "")
            if half
            else "Check the model's weights (--checkpoint / --pretrained)"
        )
    elif bad_norm.any():
        rows = np.flatnonzero(bad_norm)
        detail = f"{len(rows)} row(s) are not unit length (norm {norms[rows[0]]:.6g})"
        hint = "Check the model's weights (--checkpoint / --pretrained)"
    else:
        return
    raise UserError(
        f"The {what} are not usable: {detail} (first: row {int(rows[0])}, {unit} {int(item_ids[rows[0]])}). "
        f"Nothing was registered. {hint}, then run the command again."
    )


@dataclass
class _Plan:
    """What embed needs from the database, read in one short connection."""

    subset_id: int
    name: str
    weights: dict
    ckpt_path: str | None
    items: dict
    paths: list
    captions: list
    image_root: Path
    identities: dict
    hashes: dict
    existing: dict  # kind -> set row (reused)
    known: dict  # kind -> the newest set id of that identity when the inputs were read (or None)
    todo: list
    folder: Path
    remember: tuple | None = None  # (sums file, record): a checkpoint sum to remember once the run succeeds


def _plan(con, subset_name, model, pretrained, checkpoint, precision, cache_dir, recompute, draft, decode) -> _Plan:
    from toolkit.embed import models

    subset = db.get_subset(con, subset_name)
    subset_id, name = int(subset["subset_id"]), str(subset["name"])
    cache_root = Path(cache_dir).expanduser().resolve() if cache_dir else study_paths.embedding_cache_dir(con)
    sums_file = cache_root / CHECKPOINT_SUMS
    weights = models.weights_identity(model, pretrained, checkpoint, sums_file=sums_file)
    remember = weights.pop("_remember", None)
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
    if decode != "cpu":  # only then, so that the sets made before --decode existed keep their identity
        identities["image"]["decode"] = decode
    hashes = {k: db.config_hash(v) for k, v in identities.items()}

    fix = "Run the same command with --recompute to rebuild it."
    existing, known, todo = {}, {}, []
    for kind in KINDS:
        found = _existing_set(con, subset_id, kind, hashes[kind])
        known[kind] = None if found is None else int(found["embedding_set_id"])
        if found is not None and not recompute:
            moved = "" if os.path.exists(found["path"]) else f"{study_paths.moved_hint(con, '--cache-dir')} Or: "
            artifacts.verify_file(found["path"], found["sha256"], what=f"{kind} embedding file", fix=moved + fix)
            existing[kind] = found
        else:
            todo.append(kind)
    return _Plan(
        subset_id=subset_id,
        name=name,
        weights=weights,
        ckpt_path=ckpt_path,
        items=items,
        paths=paths,
        captions=caps["text"].tolist(),
        image_root=image_root,
        identities=identities,
        hashes=hashes,
        existing=existing,
        known=known,
        todo=todo,
        folder=cache_root / _slug(name),
        remember=(sums_file, remember) if remember else None,
    )


@dataclass
class EmbedOptions:
    """How `embed` makes (or finds) a subset's embeddings: every option but the database and the subset,
    travelling as one value through the steps of the stage (see `embed` for what each one does)."""

    model: str = "openai/clip-vit-base-patch32"
    pretrained: str | None = None
    checkpoint: str | Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "fp32"
    cache_dir: str | Path | None = None
    recompute: bool = False
    draft: bool = False
    num_workers: int | None = None
    decode: str = "cpu"
    progress: bool | None = None
    shard_rows: dict | None = None
    on_shard: Callable[[str, int, int], None] | None = None
    on_step: Callable[[str], None] | None = None
    engine: str = "local"
    ray_address: str | None = None
    gpus_per_worker: float | None = None
    workers: int | None = None

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)


def embed(
    database,
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
    decode: str = "cpu",
    progress: bool | None = None,
    shard_rows: dict | None = None,
    on_shard: Callable[[str, int, int], None] | None = None,
    on_step: Callable[[str], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    gpus_per_worker: float | None = None,
    workers: int | None = None,
) -> EmbedResult:
    """Embed a subset's images and captions (or reuse the cached sets); see the module docstring.

    `database` is the path of the DuckDB file: it is opened to read the inputs, closed while the
    model encodes (so `clipfail status` and other readers can open it), and opened again to
    register the results in one transaction. An open connection is accepted too (a notebook's);
    it then stays open, and locked, throughout.

    `on_shard(kind, shard_index, n_shards)` is called after each shard is on disk (tests use it
    to simulate an interruption). `on_step(step)` is called as each step of a computation starts:
    ``model`` (load the model, take the locks, find shards already on disk), ``tokenize`` (every
    caption), ``image`` and ``text`` (encode; ``compute`` for both on Ray), ``finish`` (the final
    files and the registration); benchmarks/embed_pipeline.py times each part with it.

    `engine`: ``local`` (this process) or ``ray`` (a Ray cluster at `ray_address`, `workers` model
    replicas with `gpus_per_worker` GPUs each; see `toolkit.embed.ray_engine`). The engine is the one
    pluggable step, "compute the rows of these shards": planning, shards, manifest, lock, the final
    file and the registration are this function's whatever the engine, and the engine is recorded in
    the set's config but is not part of its identity (sets and shards are shared across engines).

    The options travel on as one `EmbedOptions`; `embed_with(database, subset_name, options)` takes them so.
    """
    options = EmbedOptions(
        model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, batch_size=batch_size,
        precision=precision, cache_dir=cache_dir, recompute=recompute, draft=draft, num_workers=num_workers,
        decode=decode, progress=progress, shard_rows=shard_rows, on_shard=on_shard, on_step=on_step, engine=engine,
        ray_address=ray_address, gpus_per_worker=gpus_per_worker, workers=workers,
    )  # fmt: skip
    return embed_with(database, subset_name, options)


def _check_options(opts: EmbedOptions) -> None:
    """Refuse options that cannot work, before anything is read or written."""
    from toolkit.embed import encode, models

    if opts.pretrained and opts.checkpoint is not None:
        # the identity records a checkpoint by its sha256 alone, while load_model would apply the tag's preprocess
        raise UserError("Give either --pretrained TAG or --checkpoint PATH, not both.")
    if opts.precision not in models.PRECISIONS:
        raise UserError(f"Unknown precision {opts.precision!r}; use one of {', '.join(models.PRECISIONS)}.")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if opts.num_workers is not None and opts.num_workers < 0:
        raise UserError("--num-workers must be 0 or more.")
    if opts.decode not in encode.DECODES:
        raise UserError(f"Unknown --decode {opts.decode!r}; use cpu or gpu.")
    if opts.engine not in ENGINES:
        raise UserError(f"Unknown --engine {opts.engine!r}; use one of {', '.join(ENGINES)}.")
    if opts.engine == "ray":  # the model runs on the cluster's workers: their devices are checked there
        from toolkit.embed import ray_engine

        ray_engine.check_options(
            decode=opts.decode, device=opts.device, gpus_per_worker=opts.gpus_per_worker, workers=opts.workers
        )
    # An unavailable or unknown --device (or --decode gpu without CUDA) is refused before any work.
    # auto and cpu need no check, so a run with nothing to compute does not even import torch.
    elif str(opts.device).strip().lower() not in ("auto", "cpu", "") or opts.decode != "cpu":
        encode.check_decode(opts.decode, resolve_device(opts.device), opts.draft)


def embed_with(database, subset_name: str | None, opts: EmbedOptions) -> EmbedResult:
    """`embed` with its options as one `EmbedOptions`: check them, read the plan in one short connection,
    connect to the Ray cluster if that is the engine, then compute and register what is missing."""
    t0 = time.perf_counter()
    started = db.now()
    _check_options(opts)
    args = (subset_name, opts.model, opts.pretrained, opts.checkpoint, opts.precision, opts.cache_dir,
            opts.recompute, opts.draft, opts.decode)  # fmt: skip
    db_path = str(database) if isinstance(database, str | os.PathLike) else None
    if db_path is not None:
        con = open_study(db_path)
        try:
            plan = _plan(con, *args)
        finally:
            con.close()
        con = None
    else:
        con = database
        plan = _plan(con, *args)
    cluster = None
    if plan.todo and opts.engine == "ray":
        from toolkit.embed import ray_engine

        # Connect (or refuse an unreachable address) before any model, lock or shard folder.
        cluster = ray_engine.RayEngine.connect(
            opts.ray_address, gpus_per_worker=opts.gpus_per_worker, workers=opts.workers, device=opts.device,
            model=opts.model, pretrained=opts.pretrained, checkpoint=opts.checkpoint, precision=opts.precision,
            weights=plan.weights, draft=opts.draft, num_workers=opts.num_workers,
        )  # fmt: skip
    try:
        return _embed_compute(plan, con, db_path, cluster, t0, started, opts)
    finally:
        if cluster is not None:
            cluster.close()


ENGINES = ("local", "ray")


@dataclass
class _Computed:
    """What the computation of one embed() call found and made (read back into its EmbedResult)."""

    notes: list[str] = field(default_factory=list)
    computed: dict[str, dict] = field(default_factory=dict)  # kind -> the final file, its array and config
    reused_shards: int = 0
    n_truncated: int | None = None
    context_length: int | None = None
    fast_text: bool | None = None
    run_id: int | None = None
    registered: list[str] = field(default_factory=list)


def _embed_compute(plan, con, db_path, cluster, t0, started, opts: EmbedOptions) -> EmbedResult:
    """embed() once the plan is read: compute what is missing (with the local engine or `cluster`),
    write the final files and register them."""
    from toolkit.embed import models

    out = _Computed()
    if plan.todo:
        _compute_and_register(plan, con, db_path, cluster, started, opts, out)
    if plan.remember is not None and plan.remember[0].parent.is_dir():
        models.remember_checkpoint_sha256(*plan.remember)
    return _result(plan, opts, out, t0)


def _check_images(plan, con, db_path, cluster) -> None:
    """Refuse a subset whose image files are missing (on the Ray workers' filesystems, with a cluster)."""
    if "image" not in plan.todo:
        return
    if cluster is not None:
        cluster.check_images(plan.paths, plan.name)  # on the workers' filesystems; names what they miss
        return
    missing = [p for p in plan.paths if not os.path.isfile(p)]
    if missing:
        raise UserError(
            f"Image files of subset {plan.name!r} are missing under {plan.image_root}: "
            f"{list_offenders(missing, limit=3)}. Restore them, or ingest again with --skip-bad-images. "
            f"{study_paths.moved_hint(db_path if db_path is not None else con, '--images-root', plan.name)}"
        )


def _load_bundle(plan, opts: EmbedOptions, cluster, out: _Computed):
    """The model, checked to be the weights that the plan's identity records."""
    from toolkit.embed import encode, models

    # With Ray the driver's copy of the model only tokenizes and describes the preprocess: on its CPU.
    bundle = models.load_model(
        opts.model,
        pretrained=opts.pretrained,
        checkpoint=opts.checkpoint,
        device="cpu" if cluster is not None else opts.device,
        precision="fp32" if cluster is not None else opts.precision,
    )
    got = {
        "model": bundle.model_name,
        "pretrained": bundle.pretrained,
        "checkpoint_sha256": bundle.checkpoint_sha256,
    }
    if got != plan.weights:
        raise UserError(
            f"The model's weights changed while this command read them ({got['checkpoint_sha256']} is not "
            f"{plan.weights['checkpoint_sha256']}). Nothing was registered. Run the command again."
        )
    out.notes.extend(bundle.notes)
    if opts.decode == "gpu" and "image" in plan.todo:
        encode.gpu_preprocess_or_refuse(bundle)  # before any lock or shard folder
    return bundle


def _compute_and_register(plan, con, db_path, cluster, started, opts: EmbedOptions, out: _Computed) -> None:
    """Under a lock per kind: compute the missing shards, join them into final files, register those."""
    from toolkit.embed import encode

    _check_images(plan, con, db_path, cluster)
    partial = plan.folder / ".partial"
    opts.step("model")
    bundle = _load_bundle(plan, opts, cluster, out)
    hashes, name = plan.hashes, plan.name
    locks = {
        kind: _PartialLock(partial / f"{kind}-{hashes[kind][:16]}.lock", f"{kind} embeddings of subset {name!r}")
        for kind in plan.todo
    }
    new_dirs = [d for d in (partial, *partial.parents) if not d.exists()]  # removed again if left empty
    try:
        for lock in locks.values():
            lock.acquire()
        on_gpu = cluster.on_gpu if cluster is not None else bundle.device != "cpu"
        batch = {
            "image": opts.batch_size or (256 if on_gpu else encode.DEFAULT_IMAGE_BATCH),
            "text": opts.batch_size or (1024 if on_gpu else encode.DEFAULT_TEXT_BATCH),
        }
        jobs: dict[str, dict] = {}  # kind -> its shards, progress bar, shards done, shards to do, finish
        try:
            _add_shard_jobs(jobs, plan, opts, bundle, partial, out)
            _compute_shards(jobs, plan, opts, bundle, cluster, batch, out)
        finally:
            for job in jobs.values():
                job["bar"].close()
        opts.step("finish")
        for kind, job in jobs.items():
            out.computed[kind] = _final_file(kind, job, plan, opts, bundle, cluster, batch[kind], out)
        _register_run(plan, con, db_path, started, opts, out)
        for c in out.computed.values():
            shutil.rmtree(c["shards"].folder, ignore_errors=True)
    finally:
        for lock in locks.values():
            lock.release()
        for d in (partial, *new_dirs):  # deepest first; a folder another process uses is not empty
            try:
                d.rmdir()
            except OSError:
                pass


def _add_shard_jobs(jobs: dict, plan, opts: EmbedOptions, bundle, partial: Path, out: _Computed) -> None:
    """One job per kind to compute: its shards (those already on disk are loaded and counted as reused),
    its progress bar, and `finish`, which checks and saves a computed shard. Filled in place, so that the
    caller closes the bars opened so far whatever fails."""
    rows_per = dict(SHARD_ROWS, **(opts.shard_rows or {}))
    items, hashes, name, precision = plan.items, plan.hashes, plan.name, opts.precision
    for kind in plan.todo:
        n = len(items[kind])
        shards = _Shards(partial / f"{kind}-{hashes[kind][:16]}", hashes[kind], n, rows_per[kind])
        what = f"{kind} embeddings of subset {name!r} ({bundle.model_name}, {precision})"
        unit = "image" if kind == "image" else "caption"
        bar = _progress(total=n, desc=f"{kind} embeddings", unit=unit, enabled=opts.progress)
        done: dict[int, np.ndarray] = {}
        jobs[kind] = {"shards": shards, "what": what, "bar": bar, "done": done}
        dim = None
        for i in range(shards.n):
            arr = shards.load(i, dim)
            if arr is not None:
                done[i], dim = arr, arr.shape[1]
                out.reused_shards += 1
                bar.update(arr.shape[0])
        jobs[kind]["todo"] = [i for i in range(shards.n) if i not in done]

        def finish(i: int, arr: np.ndarray, kind=kind, shards=shards, what=what, done=done) -> None:
            a, b = shards.span(i)
            if arr.shape[0] != b - a:  # pragma: no cover - encoders return one row per item
                raise RuntimeError("encoder returned the wrong number of rows")
            check_embeddings(arr, kind, precision, items[kind][a:b], what)  # never saved if bad
            shards.save(i, arr)
            done[i] = arr
            if opts.on_shard is not None:
                opts.on_shard(kind, i, shards.n)

        jobs[kind]["finish"] = finish


def _compute_shards(jobs: dict, plan, opts: EmbedOptions, bundle, cluster, batch: dict, out: _Computed) -> None:
    """Compute every job's missing shards: on Ray every kind in one pass, else image then text here."""
    from toolkit.embed import encode

    toks = None
    if "text" in jobs:
        opts.step("tokenize")
        toks = encode.tokenize(bundle, plan.captions)  # every caption once; counts truncation
        out.n_truncated, out.context_length = toks.n_truncated, bundle.context_length
    if cluster is not None:
        # The pluggable step, "compute the rows of these shards": on Ray, every kind in one pass
        # (one actor pool); `finish` saves each shard here, in the driver, as it completes.
        out.fast_text = encode.fast_text_tower(bundle.model) is not None
        opts.step("compute")
        gathers = {k: ShardGather(j["shards"], j["todo"], j["finish"]) for k, j in jobs.items()}
        cluster.compute(
            gathers,
            {k: j["bar"] for k, j in jobs.items()},
            paths=plan.paths,
            tokens=toks.ids if "text" in jobs else None,
            batch_sizes={"image": batch["image"], "text": batch["text"]},
        )
        return
    for kind, job in jobs.items():
        shards, todo_shards, finish, bar = job["shards"], job["todo"], job["finish"], job["bar"]
        opts.step(kind)
        if kind == "image":
            stats: dict = {}
            _stream_images(encode, bundle, plan, shards, todo_shards, finish, batch["image"], opts.num_workers,
                           opts.draft, opts.decode, bar, stats)  # fmt: skip
            if stats.get("cpu_fallbacks"):
                out.notes.append(
                    f"--decode gpu: {stats['cpu_fallbacks']} image(s) were not baseline RGB JPEGs that "
                    "the GPU decodes; they took the exact CPU path."
                )
        else:
            out.fast_text = None
            for i in todo_shards:
                a, b = shards.span(i)
                sub = encode.Tokens(toks.ids[a:b], None, None)
                res = encode.encode_texts_with_info(bundle, plan.captions[a:b], batch["text"], bar, tokens=sub)
                out.fast_text = res.fast_path
                finish(i, res.embeddings)


def _final_file(kind: str, job: dict, plan, opts: EmbedOptions, bundle, cluster, batch_size: int, out: _Computed):
    """Join a kind's shards into one checked array, write its final .npy file and describe the set."""
    shards, done, what = job["shards"], job["done"], job["what"]
    hashes = plan.hashes
    if len(done) != shards.n:  # pragma: no cover - the stream yields every row once
        raise RuntimeError(f"{shards.n - len(done)} {kind} shard(s) were not computed")
    parts = [done[i] for i in range(shards.n)]
    dim = parts[0].shape[1] if parts else 0
    array = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    array = np.ascontiguousarray(array, dtype=np.float32)
    try:
        check_embeddings(array, kind, opts.precision, plan.items[kind], what)
    except UserError:
        shutil.rmtree(shards.folder, ignore_errors=True)  # nothing in it is to be trusted again
        raise
    set_cfg = dict(plan.identities[kind], identity_hash=hashes[kind], spec=opts.model, checkpoint=plan.ckpt_path)
    set_cfg.update(_made_with(bundle, kind, batch_size, opts.num_workers))
    set_cfg.update(cluster.made_with() if cluster is not None else {"engine": "local"})
    if kind == "image":
        set_cfg["decode"] = opts.decode
    else:
        set_cfg.update(n_truncated=out.n_truncated, context_length=out.context_length, fast_text_path=out.fast_text)
    stem = f"{kind}-{_slug(bundle.model_name)}-{hashes[kind][:12]}"
    tmp = plan.folder / f".{stem}.npy.tmp{os.getpid()}"
    sha = artifacts.save_array(tmp, array)
    final = plan.folder / f"{stem}-{sha[:12]}.npy"
    os.replace(tmp, final)
    return {"array": array, "sha": sha, "path": final, "config": set_cfg, "shards": shards}


def _register_run(plan, con, db_path, started, opts: EmbedOptions, out: _Computed) -> None:
    """Register the final files and the run, in one transaction (on a new connection when given a path)."""
    run_config = {
        "stage": "embed",
        "subset_id": plan.subset_id,
        **plan.weights,
        "precision": opts.precision,
        "draft": bool(opts.draft),
        "decode": opts.decode,
        "spec": opts.model,
        "checkpoint": plan.ckpt_path,
        "computed": {k: plan.hashes[k] for k in out.computed},
        "recompute": bool(opts.recompute),
    }
    reg = open_study(db_path) if db_path is not None else con
    try:
        out.run_id, out.registered = _register(reg, plan, out.computed, run_config, started, opts.precision, out.notes)
    finally:
        if db_path is not None:
            reg.close()


def _result(plan, opts: EmbedOptions, out: _Computed, t0: float) -> EmbedResult:
    existing, weights = plan.existing, plan.weights
    n_truncated, context_length = out.n_truncated, out.context_length
    text_cfg = existing["text"]["config"]
    if n_truncated is None:
        n_truncated, context_length = text_cfg.get("n_truncated"), text_cfg.get("context_length")
    return EmbedResult(
        subset=plan.name,
        subset_id=plan.subset_id,
        model=weights["model"],
        pretrained=weights["pretrained"],
        checkpoint_sha256=weights["checkpoint_sha256"],
        precision=opts.precision,
        draft=bool(opts.draft),
        image_set_id=int(existing["image"]["embedding_set_id"]),
        text_set_id=int(existing["text"]["embedding_set_id"]),
        image_path=str(existing["image"]["path"]),
        text_path=str(existing["text"]["path"]),
        n_images=len(plan.items["image"]),
        n_captions=len(plan.items["text"]),
        dim=int(existing["image"]["dim"]),
        n_truncated=n_truncated,
        context_length=context_length,
        computed=[k for k in out.computed if k in out.registered],
        reused_shards=out.reused_shards,
        run_id=out.run_id,
        seconds=time.perf_counter() - t0,
        notes=out.notes,
        decode=opts.decode,
    )


def _stream_images(encode, bundle, plan, shards, todo_shards, finish, batch_size, num_workers, draft, decode, bar,
                   stats=None):  # fmt: skip
    """Encode the rows of every shard still to compute through ONE image loader (its workers start
    once), and hand each shard to `finish` as soon as its last row has arrived, so complete shards
    are on disk, checksummed, while the stream goes on (a kill loses at most the shard in flight)."""
    if not todo_shards:
        return
    gather = ShardGather(shards, todo_shards, finish)
    rows = gather.rows
    encode.encode_images(
        bundle,
        [plan.paths[r] for r in rows],
        batch_size=batch_size,
        num_workers=num_workers,
        draft=draft,
        progress=bar,
        decode=decode,
        on_batch=lambda idx, feats: gather.add(rows[idx], feats),
        stats=stats,
    )


class ShardGather:
    """Cut shards out of embedding rows that arrive in any order and any grouping.

    `rows` are the set's row numbers of every shard in `todo_shards` (in order); `add(rows, feats)`
    files each row into its shard's buffer and calls `finish(i, array)` as soon as shard i is
    complete. A row that arrives twice (a retried task on a distributed engine) is counted once."""

    def __init__(self, shards: _Shards, todo_shards, finish: Callable[[int, np.ndarray], None]):
        self.shards, self.finish = shards, finish
        spans = [shards.span(i) for i in todo_shards]
        self.rows = (
            np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans]) if spans else np.zeros(0, np.int64)
        )
        self.left = {i: b - a for i, (a, b) in zip(todo_shards, spans)}
        self.buffers: dict[int, np.ndarray] = {}
        self.seen: dict[int, np.ndarray] = {}

    def add(self, glob: np.ndarray, feats: np.ndarray) -> None:
        glob = np.asarray(glob, dtype=np.int64)
        owner = glob // self.shards.shard_rows  # shard i holds rows [i * shard_rows, (i + 1) * shard_rows)
        for i in np.unique(owner).tolist():
            if self.left.get(i, 0) == 0:  # complete already (or not asked for): a duplicate
                continue
            sel = owner == i
            a, b = self.shards.span(i)
            if i not in self.buffers:
                self.buffers[i] = np.empty((b - a, feats.shape[1]), dtype=np.float32)
                self.seen[i] = np.zeros(b - a, dtype=bool)
            local = glob[sel] - a
            fresh = ~self.seen[i][local]
            self.buffers[i][local[fresh]] = feats[sel][fresh]
            self.seen[i][local[fresh]] = True
            self.left[i] -= int(fresh.sum())
            if self.left[i] == 0:
                del self.seen[i]
                self.finish(i, self.buffers.pop(i))

    @property
    def complete(self) -> bool:
        return not any(self.left.values())


def _register(con, plan: _Plan, computed: dict, run_config: dict, started, precision: str, notes: list):
    """Register the computed sets (and the run) in one transaction; returns (run id, kinds registered).
    A set that another process registered with the same identity while this one computed is reused,
    not added twice (run id None when that is so for every set).

    The subset is checked again first: rebuilt (``ingest --replace``) while the model ran, the
    computed rows no longer belong to it and nothing is registered."""
    weights, existing = plan.weights, plan.existing
    with db.transaction(con):
        subset = db.get_subset(con, plan.name)
        imgs, caps = subset_items(con, plan.subset_id)
        now_items = {"image": imgs["image_id"].to_numpy(np.int64), "text": caps["caption_id"].to_numpy(np.int64)}
        if (
            int(subset["subset_id"]) != plan.subset_id
            or str(subset["config_hash"]) != plan.identities["image"]["subset_config_hash"]
            or any(_ids_sha(now_items[k]) != _ids_sha(plan.items[k]) for k in KINDS)
        ):
            raise UserError(
                f"Subset {plan.name!r} was rebuilt while its embeddings were computed; nothing was registered. "
                "Run the command again."
            )
        new = {}
        for kind, c in computed.items():
            found = _existing_set(con, plan.subset_id, kind, plan.hashes[kind])
            if found is not None and int(found["embedding_set_id"]) != plan.known.get(kind):
                try:  # registered by another process meanwhile: reuse it rather than add a duplicate
                    artifacts.verify_file(found["path"], found["sha256"], what=f"{kind} embedding file")
                except UserError:
                    pass
                else:
                    existing[kind] = found
                    notes.append(
                        f"Another process registered the same {kind} embeddings (set {found['embedding_set_id']}) "
                        "while this one computed them; that set is used."
                    )
                    continue
            new[kind] = c
        if not new:
            return None, []
        run_id = db.insert_run(
            con, "embed", run_config, started, model=weights["model"], pretrained=weights["pretrained"]
        )
        for kind, c in new.items():
            set_id = artifacts.register_embedding_set(
                con,
                kind=kind,
                subset_id=plan.subset_id,
                model=weights["model"],
                pretrained=weights["pretrained"],
                checkpoint_sha256=weights["checkpoint_sha256"],
                precision=precision,
                config=c["config"],
                path=c["path"],
                array=c["array"],
                item_ids=plan.items[kind],
                sha256=c["sha"],
                run_id=run_id,
            )
            existing[kind] = {
                "embedding_set_id": set_id,
                "path": str(c["path"]),
                "dim": c["array"].shape[1],
                "config": c["config"],
            }
    return run_id, list(new)


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
