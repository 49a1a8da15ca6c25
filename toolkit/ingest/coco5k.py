"""The COCO 5k test split by COCO ids (`clipfail ingest --coco5k-test`).

Karpathy's dataset_coco.json names its captions by its own sentence ids, so a study ingested from it cannot
join ECCV Caption or CxC, which are keyed by COCO caption annotation ids and COCO image ids. The eccv_caption
package (the `positives` extra) lists the split by those ids: original_image_to_caption.json maps each of
the 5,000 test images to its 5 caption annotation ids (25,000 in all), and original_caption_to_image.json
holds the same pairs the other way (checked to agree; `toolkit.retrieval.positives.coco5k_test_split`).

Which captions: the split's own, as the package lists them. An image with 6 or 7 COCO captions keeps
exactly its 5 captions of the split, not the first 5 by annotation id (the package's lists are not in id
order: 37 of its 5,000 are ascending). Within the subset, an image's captions take positions 0-4 in
ascending annotation id, as in every subset. Every image of the split is in the subset (no draw, no seed);
--skip-bad-images leaves out the images that are missing or unreadable on disk, and says how many.

The texts, file names and sizes come from COCO captions JSON that holds the split: captions_val2014.json
(the 5k test is part of COCO 2014 val), or captions_train2017.json and captions_val2017.json together (2017
re-split 2014 train+val, so the split's images are divided between them). Each --captions-json comes with
its own --images-dir, the folder its file_names are relative to (with --coco-root, the standard layout:
annotations/captions_val2014.json and val2014/, or the two 2017 files and train2017/, val2017/). With two
folders, the subset's image root is their common parent and each image's path runs through its folder.

Refused, with one message and nothing written: a file that lacks some of the split's images or captions
(how many, and which file to give), a caption that a file puts on another image than the split does, an
image or caption id in both files (the same file given twice included).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from toolkit.errors import UserError, list_offenders
from toolkit.ingest import coco

SPLIT = "coco5k-test"  # the subset's split and default name
WHICH_FILES = (
    "The 5k test is in COCO 2014 val: give captions_val2014.json, or both captions_train2017.json and "
    "captions_val2017.json (each with its --images-dir), or a --coco-root that holds them "
    "(clipfail download-coco --year 2014 --dest DIR fetches the 2014 ones)."
)


@dataclass
class Split:
    """The split read from the files: what `ingest` stores, and what identifies its inputs."""

    images: pd.DataFrame  # image_id, file_name, width, height, rel_path (below image_root)
    captions: pd.DataFrame  # caption_id, image_id, text
    image_root: Path
    files: list[Path]  # the captions JSONs, in a fixed order (by path)
    sha256: str  # of their bytes, in that order
    config: dict  # what the ingest run's config adds: the package's version and the sha256 of its split files


def check_options(num_images, captions_per_image: int, karpathy_json, split) -> None:
    """The options that make no sense with --coco5k-test, refused before any file is read."""
    if karpathy_json or split:
        raise UserError(
            "--coco5k-test takes the split's ids from the eccv_caption package and reads COCO captions JSON; it does "
            "not use --karpathy-json or --split (Karpathy's file names captions by sentence ids, not COCO's)."
        )
    if num_images is not None and str(num_images).lower() != "all":
        raise UserError("--coco5k-test takes every image of the split (5,000): leave out --num-images.")
    if captions_per_image != 5:
        raise UserError("--coco5k-test takes the split's own 5 captions per image: leave out --captions-per-image.")


def as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def resolve_files(coco_root, captions_json, images_dir) -> tuple[list[tuple[Path, Path]], Path | None]:
    """(captions JSON, its images folder) pairs, and the instances file that the standard 2014 layout under
    --coco-root offers (None: none)."""
    jsons, dirs = [Path(p) for p in as_list(captions_json)], [Path(p) for p in as_list(images_dir)]
    if coco_root and not jsons:
        if dirs:
            raise UserError(
                "With --coco-root, --coco5k-test finds the images in COCO's layout (val2014/, or train2017/ and "
                "val2017/); for other folders give each --captions-json with its --images-dir instead."
            )
        root = Path(coco_root)
        if not root.is_dir():
            raise UserError(f"COCO root {root} is not a folder. {WHICH_FILES}")
        ann = root / "annotations"
        if (ann / "captions_val2014.json").is_file():
            inst = ann / "instances_val2014.json"
            return [(ann / "captions_val2014.json", root / "val2014")], (inst if inst.is_file() else None)
        found = [n for n in ("train2017", "val2017") if (ann / f"captions_{n}.json").is_file()]
        if not found:
            raise UserError(f"{ann} holds neither captions_val2014.json nor captions_*2017.json. {WHICH_FILES}")
        return [(ann / f"captions_{n}.json", root / n) for n in found], None
    if not jsons or len(dirs) != len(jsons):
        raise UserError(
            f"--coco5k-test needs each --captions-json with its own --images-dir (the folder its file_names are "
            f"relative to), in the same order; got {len(jsons)} --captions-json and {len(dirs)} --images-dir. "
            "Or give --coco-root DIR."
        )
    if len(jsons) > 2:
        raise UserError(f"--captions-json is given {len(jsons)} times; the 5k test needs one or two. {WHICH_FILES}")
    return list(zip(jsons, dirs)), None


def _image_root(dirs: list[Path]) -> tuple[Path, list[str]]:
    """The subset's image root, and each folder's path below it ('' for the root itself)."""
    absolute = [Path(os.path.abspath(os.path.expanduser(os.fspath(d)))) for d in dirs]
    for d, a in zip(dirs, absolute):
        if not a.is_dir():
            raise UserError(f"Image folder {d} not found. Give the folder that its captions JSON's file_names are in.")
    root = absolute[0] if len(absolute) == 1 else Path(os.path.commonpath(absolute))
    return root, [PurePosixPath(*a.relative_to(root).parts).as_posix() if a != root else "" for a in absolute]


def _read(pairs: list[tuple[Path, Path]]) -> tuple[list, Path, str]:
    """Each file's (path, images, captions) with rel_path below the common root; the root; the files' sha256."""
    pairs = sorted(pairs, key=lambda p: str(p[0]))
    root, prefixes = _image_root([d for _, d in pairs])
    read, sha = [], hashlib.sha256()
    for (path, _), prefix in zip(pairs, prefixes):
        images, captions = coco.load_coco_captions(path, sha=sha)  # checked whole; the bytes parsed are hashed
        if prefix:
            images = images.assign(rel_path=prefix + "/" + images["file_name"])
        read.append((path, images, captions))
    if len(read) == 2:
        _check_disjoint(read)
    return read, root, sha.hexdigest()


def _check_disjoint(read: list) -> None:
    (a, img_a, cap_a), (b, img_b, cap_b) = read
    if os.path.samefile(a, b):
        raise UserError(f"--captions-json {a} is given twice. {WHICH_FILES}")
    both_img = sorted(set(img_a["image_id"]) & set(img_b["image_id"]))
    both_cap = sorted(set(cap_a["caption_id"]) & set(cap_b["caption_id"]))
    if both_img or both_cap:
        what = [f"image {i}" for i in both_img] + [f"caption {c}" for c in both_cap]
        raise UserError(
            f"{a.name} and {b.name} share the ids of {_count(both_img, 'image')} and {_count(both_cap, 'caption')}, "
            f"{list_offenders(what)}: the 2017 train and val files share none, so these are not that pair. "
            f"{WHICH_FILES}"
        )


def _count(items, noun: str) -> str:
    return f"{len(items):,} {noun}{'' if len(items) == 1 else 's'}"


def _missing_message(read: list, n_img: int, n_cap: int, wrong: pd.DataFrame, total: tuple[int, int]) -> str:
    names = " and ".join(p.name for p, _, _ in read)
    parts = []
    if n_img or n_cap:
        parts.append(
            f"{n_img:,} of the {total[0]:,} images and {n_cap:,} of the {total[1]:,} captions of the COCO 5k test "
            f"are not in {names}. {WHICH_FILES}"
        )
    if len(wrong):
        offenders = [f"caption {c} is on image {f} there, on {t} in the split" for c, f, t in wrong.to_numpy()]
        parts.append(
            f"{names} put{'s' if len(read) == 1 else ''} {len(wrong):,} of the split's captions on other images "
            f"than the split does, {list_offenders(offenders)}: not COCO's own captions file, or an altered one."
        )
    return " ".join(parts)


def load(pairs: list[tuple[Path, Path]], split) -> Split:
    """The split's images and captions from the files; `split` is `positives.coco5k_test_split()`."""
    read, root, sha = _read(pairs)
    images = pd.concat([im for _, im, _ in read], ignore_index=True)
    captions = pd.concat([c for _, _, c in read], ignore_index=True)
    want = pd.DataFrame(
        [(c, i) for i, caps in split.image_to_captions.items() for c in caps], columns=["caption_id", "image_id"]
    ).astype("int64")
    want_images = sorted(split.image_to_captions)
    n_img = len(set(want_images) - set(images["image_id"]))
    have = want.merge(captions, on="caption_id", how="left", suffixes=("", "_file"))
    n_cap = int(have["text"].isna().sum())
    found = have.loc[have["text"].notna()].astype({"image_id_file": "int64"})
    wrong = found.loc[found["image_id"] != found["image_id_file"], ["caption_id", "image_id_file", "image_id"]]
    if n_img or n_cap or len(wrong):
        raise UserError(_missing_message(read, n_img, n_cap, wrong, (len(want_images), len(want))))
    return Split(
        images=images.loc[images["image_id"].isin(want_images)].reset_index(drop=True),
        captions=found[["caption_id", "image_id", "text"]].reset_index(drop=True),
        image_root=root,
        files=[p for p, _, _ in read],
        sha256=sha,
        config={
            "sampling": "coco5k-test/eccv_caption-original/v1",
            "test_split_package": f"eccv_caption {split.version}",
            "test_split_sha256": split.sha256,
        },
    )
