"""Ingest: a COCO captions file + image folder -> images, captions, and a seeded subset.

Sampling (documented, machine-independent):
1. Candidate images are those with at least one caption (minus bad images with
   --skip-bad-images), sorted by ascending COCO image id.
2. `numpy.random.default_rng(seed).choice(candidates, size=num_images, replace=False)` draws the
   subset; `num_images='all'` takes every candidate. The subset's image order (`position`) is
   ascending image id.
3. Each image keeps its captions in ascending COCO annotation id, the first `captions_per_image`
   of them, as position 0, 1, ...; an image with fewer keeps all it has.

`coco5k_test=True` does not draw: it takes the COCO 5k test split by COCO ids, every image with its own
5 captions of the split (toolkit.ingest.coco5k).
"""

from __future__ import annotations

import collections
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from toolkit.errors import UserError, list_offenders
from toolkit.ingest import coco, coco5k
from toolkit.ingest import instances as instances_mod
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store.artifacts import sha256_file

STAGE = "ingest"


@dataclass
class IngestResult:
    subset_id: int
    name: str
    run_id: int
    num_images: int
    num_captions: int
    captions_histogram: dict[int, int]  # captions kept per image -> number of images
    num_short_images: int  # images with fewer captions than asked
    num_bad_images: int  # excluded by --skip-bad-images
    truncated_from: int  # candidate images before sampling
    is_noop: bool = False
    bad_images: list[tuple[int, str, str]] = field(default_factory=list)
    num_instances: int | None = None  # object instances stored now (None: no instances file)


def resolve_paths(coco_root=None, captions_json=None, images_dir=None, karpathy_json=None):
    """Turn the CLI's path options into (annotations file, image root)."""
    if karpathy_json:
        if not images_dir and not coco_root:
            raise UserError(
                "--karpathy-json needs --images-dir: the folder that holds val2014/ (dataset_coco.json) or "
                "flickr30k-images/ (dataset_flickr30k.json), or --coco-root."
            )
        return Path(karpathy_json), Path(images_dir or coco_root)
    if coco_root:
        root = Path(coco_root)
        if not root.is_dir():
            raise UserError(f"COCO root {root} is not a folder. Download COCO with clipfail download-coco --dest DIR.")
        captions_json = captions_json or root / "annotations" / "captions_val2017.json"
        images_dir = images_dir or root / "val2017"
    if not captions_json or not images_dir:
        raise UserError("Give --coco-root DIR, or both --captions-json FILE and --images-dir DIR.")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UserError(
            f"Image folder {images_dir} not found. Give --images-dir, or a --coco-root that holds val2017/."
        )
    return Path(captions_json), images_dir


def check_image(path: Path) -> tuple[str | None, int | None, int | None]:
    """Open an image's header. Returns (problem or None, width, height).

    Only a regular file is opened (a FIFO or device in its place would block or have side
    effects), and an image with more pixels than Pillow's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS) is a problem, not a crash.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing file", None, None
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc})", None, None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", None, None
    try:
        # O_NONBLOCK: should a FIFO replace the file after the stat, opening it does not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc})", None, None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return "not a regular file", None, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    return None, im.width, im.height
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return f"too many pixels, a possible decompression bomb ({exc})", None, None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            return f"header does not open ({type(exc).__name__}: {exc})", None, None


def _check_images(root: Path, images: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[int, str, str]]]:
    bad, widths, heights = [], [], []
    for image_id, rel in zip(images["image_id"], images["rel_path"]):
        problem, w, h = check_image(root / rel)
        widths.append(w)
        heights.append(h)
        if problem:
            bad.append((int(image_id), rel, problem))
    images = images.copy()
    images["width"] = images["width"].fillna(pd.Series(widths, index=images.index, dtype="Int32"))
    images["height"] = images["height"].fillna(pd.Series(heights, index=images.index, dtype="Int32"))
    return images, bad


def ingest(
    con,
    *,
    coco_root=None,
    captions_json=None,
    images_dir=None,
    karpathy_json=None,
    split: str | None = None,
    num_images: int | str | None = None,
    captions_per_image: int = 5,
    seed: int = 42,
    name: str | None = None,
    skip_bad_images: bool = False,
    replace: bool = False,
    instances_json=None,
    coco5k_test: bool = False,
) -> IngestResult:
    started = db.now()
    if coco5k_test:  # every image of the split, no draw: --num-images and --seed do not apply
        coco5k.check_options(num_images, captions_per_image, karpathy_json, split)
        num_images, seed = "all", None
    src = _read_source(coco_root, captions_json, images_dir, karpathy_json, split, instances_json, coco5k_test)
    num_images, take_all = _image_count(num_images, captions_per_image, src.dataset)
    if karpathy_json:
        default_name = f"{'flickr30k' if src.dataset == 'flickr30k' else 'karpathy'}-{src.split}"
    else:
        default_name = coco5k.SPLIT if coco5k_test else f"{'all' if take_all else num_images}-seed{seed}"
    name = name or default_name
    source_sha = src.sha256 or sha256_file(src.ann_path)
    config = {
        "source_sha256": source_sha,
        "image_root": study_paths.to_stored(con, src.image_root),
        "split": src.split,
        "num_images": "all" if take_all else num_images,
        "captions_per_image": captions_per_image,
        "seed": seed,
        "skip_bad_images": skip_bad_images,
        "sampling": "sorted-ids/numpy-default_rng-choice/v1",
        **src.config,
    }
    chash = db.config_hash(config)
    existing = con.execute("SELECT subset_id, config_hash, run_id FROM subsets WHERE name = ?", [name]).fetchone()
    if existing and existing[1] in (chash, study_paths.rebound_config_hash(con, existing[0], config, src.image_root)):
        result = _summary(con, existing[0], name, existing[2], is_noop=True)
        if src.inst is not None:
            result.num_instances = instances_mod.store_for_existing_subset(con, int(existing[0]), src.inst)
        return result
    _check_replaceable(con, name, existing, replace)
    chosen, bad, n_candidates = _sample(src, num_images, take_all, seed, skip_bad_images)
    chosen = chosen.sort_values("image_id").reset_index(drop=True)
    caps = src.captions.loc[src.captions["image_id"].isin(chosen["image_id"])].sort_values(["image_id", "caption_id"])
    caps = caps.assign(position=caps.groupby("image_id").cumcount())
    kept = caps.loc[caps["position"] < captions_per_image]

    with db.transaction(con):
        _check_conflicts(con, chosen, caps)
        if existing:
            for table in ("subset_captions", "subset_images"):
                con.execute(f"DELETE FROM {table} WHERE subset_id = ?", [existing[0]])
            con.execute("DELETE FROM subsets WHERE subset_id = ?", [existing[0]])
        run_id = db.insert_run(con, STAGE, {**config, "name": name}, started, seed=seed)
        subset_id = _insert_subset(con, src, chosen, caps, kept, bad, run_id, name, seed, captions_per_image,
                                   source_sha, chash)  # fmt: skip
        n_instances = instances_mod.store(con, int(subset_id), run_id, src.inst) if src.inst is not None else None
    result = _summary(con, subset_id, name, run_id, is_noop=False)
    result.num_instances = n_instances
    result.num_bad_images = len(bad)
    result.bad_images = bad
    result.truncated_from = n_candidates
    return result


@dataclass
class _Source:
    """A captions file read for ingest: its images and captions, where the images are, and its instances."""

    ann_path: Path
    image_root: Path
    images: pd.DataFrame
    captions: pd.DataFrame
    dataset: str  # coco, karpathy's coco or flickr30k
    split: str | None
    inst: object  # the instances file, read and checked (None: none)
    sha256: str | None = None  # of the captions file(s) (None: computed from ann_path)
    config: dict = field(default_factory=dict)  # what the ingest run's config adds or overrides
    what: str = ""  # how a message names the source (default: ann_path)


def _single(value, flag: str):
    """An option that click may give as a tuple (--captions-json, --images-dir): one value, or None."""
    values = coco5k.as_list(value)
    if len(values) > 1:
        raise UserError(
            f"{flag} is given {len(values)} times; more than one only with --coco5k-test (captions_train2017.json "
            "and captions_val2017.json, each with its --images-dir)."
        )
    return values[0] if values else None


def _read_source(coco_root, captions_json, images_dir, karpathy_json, split, instances_json, coco5k_test) -> _Source:
    """Read the captions (COCO's file, a Karpathy split, or the COCO 5k test) and the instances file, checked
    before any write."""
    if coco5k_test:
        return _read_coco5k(coco_root, captions_json, images_dir, instances_json)
    captions_json, images_dir = _single(captions_json, "--captions-json"), _single(images_dir, "--images-dir")
    ann_path, image_root = resolve_paths(coco_root, captions_json, images_dir, karpathy_json)
    # found under --coco-root only for COCO's own layout: Karpathy's split holds val2014 images
    inst_path = instances_mod.find_file(None if karpathy_json else coco_root, instances_json)
    inst = instances_mod.load(inst_path) if inst_path else None  # validated before anything is written
    dataset = "coco"
    if karpathy_json:
        split = split or "test"
        images, captions, dataset = coco.load_karpathy_dataset(ann_path, split)
        if dataset == "flickr30k" and not (image_root / coco.FLICKR30K_IMAGE_FOLDER).is_dir():
            # --images-dir is the flickr30k-images folder itself: its files are directly below it
            images = images.assign(rel_path=images["file_name"])
    else:
        if split:
            raise UserError("--split only applies with --karpathy-json.")
        images, captions = coco.load_coco_captions(ann_path)
    return _Source(ann_path, image_root, images, captions, dataset, split, inst)


def _read_coco5k(coco_root, captions_json, images_dir, instances_json) -> _Source:
    """The COCO 5k test: its ids from the eccv_caption package, texts and images from the COCO file(s)."""
    from toolkit.retrieval.eccv_package import coco5k_test_split

    pairs, inst_default = coco5k.resolve_files(coco_root, captions_json, images_dir)
    test = coco5k_test_split("--coco5k-test")  # the package first: without it, nothing else matters
    got = coco5k.load(pairs, test)
    inst_path = instances_mod.find_file(None, instances_json) or inst_default
    inst = instances_mod.load(inst_path) if inst_path else None
    return _Source(
        got.files[0], got.image_root, got.images, got.captions, "coco", coco5k.SPLIT, inst,
        sha256=got.sha256, config=got.config | {"captions_files": [p.name for p in got.files]},
        what=f"The COCO 5k test in {' and '.join(str(p) for p in got.files)}",
    )  # fmt: skip


def _image_count(num_images, captions_per_image: int, dataset: str) -> tuple[int | str, bool]:
    """(--num-images as a number, or as given when 'all'; whether it is 'all'), after checking both counts."""
    if num_images is None:  # the whole split of Flickr30k's file (its test split is the standard 1k)
        num_images = "all" if dataset == "flickr30k" else 5000
    if captions_per_image < 1:
        raise UserError("--captions-per-image must be at least 1.")
    take_all = isinstance(num_images, str) and num_images.lower() == "all"
    if not take_all:
        try:
            num_images = int(num_images)
        except ValueError:
            raise UserError(f"--num-images must be a whole number or 'all', not {num_images!r}.") from None
        if num_images < 1:
            raise UserError("--num-images must be at least 1.")
    return num_images, take_all


def _check_replaceable(con, name: str, existing, replace: bool) -> None:
    """A subset of this name with another configuration is rebuilt only with --replace, and only if nothing
    was built on it yet."""
    if existing and not replace:
        raise UserError(
            f"A subset named {name!r} already exists with a different configuration. "
            "Choose another --name, or give --replace to rebuild it."
        )
    if existing:
        used = con.execute("SELECT count(*) FROM embedding_sets WHERE subset_id = ?", [existing[0]]).fetchone()[0]
        if used:
            raise UserError(
                f"Subset {name!r} cannot be replaced: {used} embedding set(s) and later results were built on it. "
                "Ingest the new configuration under another --name."
            )


def _sample(src: _Source, num_images, take_all: bool, seed: int, skip_bad_images: bool):
    """The seeded draw of the module docstring: (chosen images, bad images skipped, candidates before the draw)."""
    images, image_root, ann_path = src.images, src.image_root, src.ann_path
    has_caption = images["image_id"].isin(src.captions["image_id"])
    candidates = images.loc[has_caption].sort_values("image_id").reset_index(drop=True)
    bad: list[tuple[int, str, str]] = []
    if skip_bad_images:
        candidates, bad = _check_images(image_root, candidates)
        bad_ids = {b[0] for b in bad}
        candidates = candidates.loc[~candidates["image_id"].isin(bad_ids)].reset_index(drop=True)
    n_candidates = len(candidates)
    if n_candidates == 0:
        raise UserError(f"{src.what or ann_path} has no usable images with captions.")
    if take_all:
        chosen = candidates
    else:
        if num_images > n_candidates:
            raise UserError(
                f"--num-images {num_images} is more than the {n_candidates} usable images in {ann_path}. "
                "Ask for fewer, or --num-images all."
            )
        rng = np.random.default_rng(seed)
        idx = rng.choice(n_candidates, size=num_images, replace=False)
        chosen = candidates.iloc[np.sort(idx)].reset_index(drop=True)
    if not skip_bad_images:
        chosen, bad_chosen = _check_images(image_root, chosen)
        if bad_chosen:
            offenders = [f"{rel} ({why})" for _, rel, why in bad_chosen]
            raise UserError(
                f"Sampled images under {image_root} are missing or unreadable, {list_offenders(offenders)}. "
                "Fix the image folder, or give --skip-bad-images to exclude such images before sampling."
            )
    return chosen, bad, n_candidates


def _insert_subset(con, src: _Source, chosen, caps, kept, bad, run_id, name, seed, captions_per_image, source_sha,
                   chash) -> int:  # fmt: skip
    """Inside ingest's transaction: the new images and captions, the subset row, its members and bad images."""
    new_images = chosen[["image_id", "file_name", "width", "height", "rel_path"]]
    con.register("_new_images", new_images)
    con.execute(
        "INSERT INTO images BY NAME SELECT * FROM _new_images WHERE image_id NOT IN (SELECT image_id FROM images)"
    )
    con.unregister("_new_images")
    con.register("_new_caps", caps[["caption_id", "image_id", "text"]])
    con.execute(
        "INSERT INTO captions BY NAME SELECT * FROM _new_caps WHERE caption_id NOT IN (SELECT caption_id FROM captions)"
    )
    con.unregister("_new_caps")
    subset_id = con.execute(
        """
        INSERT INTO subsets (name, seed, num_images, captions_per_image, source_file, source_sha256,
                             image_root, split, config_hash, created_at, run_id)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING subset_id
        """,
        [
            name,
            seed,
            len(chosen),
            captions_per_image,
            study_paths.to_stored(con, src.ann_path),
            source_sha,
            study_paths.to_stored(con, src.image_root),
            src.split,
            chash,
            db.now(),
            run_id,
        ],
    ).fetchone()[0]
    db.insert_df(
        con,
        "subset_images",
        pd.DataFrame({"subset_id": subset_id, "image_id": chosen["image_id"], "position": np.arange(len(chosen))}),
    )
    db.insert_df(
        con,
        "subset_captions",
        pd.DataFrame(
            {
                "subset_id": subset_id,
                "caption_id": kept["caption_id"].to_numpy(),
                "image_id": kept["image_id"].to_numpy(),
                "position": kept["position"].to_numpy(),
            }
        ),
    )
    if bad:
        db.insert_df(
            con, "bad_images", pd.DataFrame(bad, columns=["image_id", "file_name", "reason"]).assign(run_id=run_id)
        )
    return subset_id


def _check_conflicts(con, images: pd.DataFrame, captions: pd.DataFrame) -> None:
    """Refuse to mix a different dataset whose ids collide with what the database holds."""
    con.register("_img_check", images[["image_id", "rel_path"]])
    clash = con.execute(
        "SELECT i.image_id, i.rel_path, n.rel_path FROM images i JOIN _img_check n USING (image_id) "
        "WHERE i.rel_path <> n.rel_path ORDER BY 1"
    ).fetchall()
    con.unregister("_img_check")
    con.register("_cap_check", captions[["caption_id", "image_id", "text"]])
    clash_c = con.execute(
        "SELECT c.caption_id FROM captions c JOIN _cap_check n USING (caption_id) "
        "WHERE c.text <> n.text OR c.image_id <> n.image_id ORDER BY 1"
    ).fetchall()
    con.unregister("_cap_check")
    if clash or clash_c:
        what = [f"image {a}: {b} vs {c}" for a, b, c in clash] + [f"caption {r[0]}" for r in clash_c]
        raise UserError(
            "This database already holds a different dataset with the same ids, "
            f"{list_offenders(what)}. Use a separate --db for each dataset."
        )


def _summary(con, subset_id: int, name: str, run_id: int, is_noop: bool) -> IngestResult:
    hist_rows = con.execute(
        """
        SELECT n, count(*) FROM (
            SELECT si.image_id, count(sc.caption_id) AS n
            FROM subset_images si LEFT JOIN subset_captions sc USING (subset_id, image_id)
            WHERE si.subset_id = ? GROUP BY si.image_id)
        GROUP BY n ORDER BY n
        """,
        [subset_id],
    ).fetchall()
    hist = collections.OrderedDict((int(n), int(c)) for n, c in hist_rows)
    per = con.execute("SELECT captions_per_image FROM subsets WHERE subset_id = ?", [subset_id]).fetchone()[0]
    bad = con.execute("SELECT count(*) FROM bad_images WHERE run_id = ?", [run_id]).fetchone()[0]
    return IngestResult(
        subset_id=int(subset_id),
        name=name,
        run_id=int(run_id),
        num_images=sum(hist.values()),
        num_captions=sum(n * c for n, c in hist.items()),
        captions_histogram=dict(hist),
        num_short_images=sum(c for n, c in hist.items() if n < per),
        num_bad_images=int(bad),
        truncated_from=0,
        is_noop=is_noop,
    )
