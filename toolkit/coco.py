"""Readers for COCO-format caption files and Karpathy's split file.

Both return two DataFrames:
- images:   image_id, file_name, width, height, rel_path (relative to the image root)
- captions: caption_id, image_id, text

A file that is missing, is not JSON, is not in the expected format, or has captions
pointing at unknown images raises a UserError that names the file and the first offenders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from toolkit.errors import UserError, list_offenders


def _read_json(path: Path, what: str, hint: str):
    if not path.exists():
        raise UserError(f"{what} {path} not found. {hint}".strip())
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a JSON file. {hint}".strip())
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Is the download complete? Fetch the file again."
        ) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 JSON ({exc.reason}).") from None


def load_coco_captions(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a COCO captions file such as annotations/captions_val2017.json."""
    path = Path(path)
    data = _read_json(
        path,
        "Captions file",
        "Give --coco-root DIR (holding annotations/captions_val2017.json) or --captions-json FILE.",
    )
    fmt = "A COCO captions file is an object with 'images' (id, file_name) and 'annotations' (id, image_id, caption)."
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        keys = list(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not in COCO captions format (found {keys}). {fmt}")
    bad_images = [
        i for i, im in enumerate(data["images"]) if not isinstance(im, dict) or "id" not in im or "file_name" not in im
    ]
    if bad_images:
        raise UserError(
            f"{path}: images entries without 'id' or 'file_name' at positions {list_offenders(bad_images)}. {fmt}"
        )
    bad_anns = [
        i
        for i, a in enumerate(data["annotations"])
        if not isinstance(a, dict) or not {"id", "image_id", "caption"} <= a.keys() or not isinstance(a["caption"], str)
    ]
    if bad_anns:
        hint = ""
        if data["annotations"] and isinstance(data["annotations"][0], dict) and "bbox" in data["annotations"][0]:
            hint = " This looks like an instances (detection) file; use captions_val2017.json."
        raise UserError(
            f"{path}: annotations without 'id', 'image_id' or a text 'caption' at positions "
            f"{list_offenders(bad_anns)}.{hint} {fmt}"
        )
    images = pd.DataFrame(
        {
            "image_id": pd.array([im["id"] for im in data["images"]], dtype="int64"),
            "file_name": [str(im["file_name"]) for im in data["images"]],
            "width": pd.array([im.get("width") for im in data["images"]], dtype="Int32"),
            "height": pd.array([im.get("height") for im in data["images"]], dtype="Int32"),
        }
    )
    images["rel_path"] = images["file_name"]
    captions = pd.DataFrame(
        {
            "caption_id": pd.array([a["id"] for a in data["annotations"]], dtype="int64"),
            "image_id": pd.array([a["image_id"] for a in data["annotations"]], dtype="int64"),
            "text": [a["caption"].strip() for a in data["annotations"]],
        }
    )
    _check_keys(path, images, captions)
    return images, captions


def load_karpathy(path: str | Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read Karpathy's dataset_coco.json and keep one split ('test', 'val', 'train', 'restval').

    Image paths are `filepath/filename` (e.g. val2014/COCO_val2014_000000391895.jpg), so the image
    root is the folder that holds val2014/. Caption ids are Karpathy's sentids; captions are 'raw'.
    """
    path = Path(path)
    data = _read_json(path, "Karpathy split file", "Give --karpathy-json pointing at dataset_coco.json.")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} is not a Karpathy split file: expected an object with 'images'.")
    need = {"filename", "cocoid", "split", "sentences"}
    bad = [i for i, im in enumerate(data["images"]) if not isinstance(im, dict) or not need <= im.keys()]
    if bad:
        raise UserError(f"{path}: images entries without {sorted(need)} at positions {list_offenders(bad)}.")
    splits = sorted({im["split"] for im in data["images"]})
    chosen = [im for im in data["images"] if im["split"] == split]
    if not chosen:
        raise UserError(f"{path} has no images in split {split!r}. Its splits are: {', '.join(splits)}.")
    img_rows, cap_rows = [], []
    for im in chosen:
        rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        img_rows.append((int(im["cocoid"]), im["filename"], None, None, rel))
        for s in im["sentences"]:
            if not isinstance(s, dict) or "sentid" not in s or "raw" not in s:
                raise UserError(f"{path}: image {im['cocoid']} has a sentence without 'sentid' and 'raw'.")
            cap_rows.append((int(s["sentid"]), int(im["cocoid"]), str(s["raw"]).strip()))
    images = pd.DataFrame(img_rows, columns=["image_id", "file_name", "width", "height", "rel_path"])
    images["width"] = images["width"].astype("Int32")
    images["height"] = images["height"].astype("Int32")
    captions = pd.DataFrame(cap_rows, columns=["caption_id", "image_id", "text"])
    _check_keys(path, images, captions)
    return images, captions


def _check_keys(path, images: pd.DataFrame, captions: pd.DataFrame) -> None:
    dup_img = images.loc[images["image_id"].duplicated(), "image_id"].tolist()
    if dup_img:
        raise UserError(f"{path}: duplicate image ids, {list_offenders(dup_img)}.")
    dup_cap = captions.loc[captions["caption_id"].duplicated(), "caption_id"].tolist()
    if dup_cap:
        raise UserError(f"{path}: duplicate caption ids, {list_offenders(dup_cap)}.")
    unknown = captions.loc[~captions["image_id"].isin(images["image_id"])]
    if len(unknown):
        offenders = [f"caption {c} -> image {i}" for c, i in zip(unknown["caption_id"], unknown["image_id"])]
        raise UserError(
            f"{path}: captions point at image ids that are not in its 'images' list, {list_offenders(offenders)}. "
            "The file is inconsistent; fetch it again."
        )
