"""Readers for COCO-format caption files and Karpathy's split files (COCO and Flickr30k).

Both return two DataFrames (`load_karpathy_dataset` also the dataset name, coco or flickr30k):
- images:   image_id, file_name, width, height, rel_path (relative to the image root)
- captions: caption_id, image_id, text

A file that is missing, is not JSON, is not in the expected format, or has captions
pointing at unknown images raises a UserError that names the file and the first offenders.
So does a record with a value the database cannot hold exactly: an id that is not a JSON
whole number from 0 to 2^63-1 (a fractional id such as 1.5 is refused, never truncated), a
width or height that is not a whole number from 1 to 2^31-1, a text that is not a string or
holds a lone surrogate (not encodable as UTF-8), or a caption that is empty or only
whitespace (COCO's own files have none; an empty query would only add noise to the recall).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from toolkit.errors import UserError, list_offenders
from toolkit.userfiles import parse_json, read_bytes, unsafe_relative_name

MAX_ID = 2**63 - 1  # BIGINT ids
MAX_INT32 = 2**31 - 1  # INTEGER width / height


def read_json_file(path: Path, what: str, hint: str, *, sha=None) -> tuple[object, str]:
    """(the parsed JSON, the sha256 of its bytes) of a JSON file that a user gave: read once, through
    toolkit.userfiles (a missing file, a folder, a FIFO or a device is refused before it is opened; invalid
    UTF-8, NaN literals and nesting deeper than any COCO file are refused). `sha`, a hashlib object, is also
    fed those bytes (a hash over several files, each read once)."""
    data = read_bytes(path, what, hint)
    if sha is not None:
        sha.update(data)
    value = parse_json(data, f"{what} {path}", "Is the download complete? Fetch the file again.")
    return value, hashlib.sha256(data).hexdigest()


def _read_json(path: Path, what: str, hint: str, sha=None):
    return read_json_file(path, what, hint, sha=sha)[0]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Problems:
    """Bad values found in a file's records, grouped by what is wrong, for one UserError."""

    def __init__(self, path: Path):
        self.path = path
        self.by_kind: dict[str, list[str]] = {}

    def add(self, kind: str, record: str) -> None:
        self.by_kind.setdefault(kind, []).append(record)

    def whole(self, value, lo: int, hi: int, record: str, what: str) -> bool:
        """A JSON integer (not bool, not float) within [lo, hi]; otherwise record the problem."""
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return True
        hi_text = "2^63-1" if hi == MAX_ID else "2^31-1" if hi == MAX_INT32 else str(hi)
        self.add(f"{what} is not a whole number from {lo} to {hi_text}", f"{record} ({what} {_short(value)})")
        return False

    def text(self, value, record: str, what: str, *, non_empty: bool = False) -> bool:
        """A string that UTF-8 can encode (and, if asked, not blank); otherwise record the problem."""
        if not isinstance(value, str):
            self.add(f"{what} is not a string", f"{record} ({what} {_short(value)})")
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            self.add(
                f"{what} holds a lone surrogate (not valid Unicode, cannot be stored)",
                f"{record} (at character {exc.start}: {value[exc.start]!r})",
            )
            return False
        if non_empty and not value.strip():
            self.add(f"{what} is empty or only whitespace", record)
            return False
        return True

    def relative_name(self, value: str, record: str) -> bool:
        """A file name inside the image folder it is relative to (no absolute path, no '..'); else record why."""
        reason = unsafe_relative_name(value)
        if reason is None:
            return True
        self.add(f"file_name is {reason}, not a file inside the image folder", f"{record} (file_name {_short(value)})")
        return False

    def raise_if_any(self) -> None:
        if not self.by_kind:
            return
        parts = [f"{kind}: {list_offenders(records)}" for kind, records in self.by_kind.items()]
        hint = "Fix or remove these records in the file (a downloaded COCO file has none: fetch it again)."
        if any("empty" in kind for kind in self.by_kind):
            hint += " An empty caption cannot be a retrieval query, so such annotations are refused, not skipped."
        raise UserError(f"{self.path} has records that cannot be ingested. {'; '.join(parts)}. {hint}")


def load_coco_captions(path: str | Path, *, sha=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a COCO captions file such as annotations/captions_val2017.json (`sha`: a hashlib object fed the
    bytes that were parsed)."""
    path = Path(path)
    data = _read_json(
        path,
        "Captions file",
        "Give --coco-root DIR (holding annotations/captions_val2017.json) or --captions-json FILE.",
        sha,
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
    problems = _Problems(path)
    for i, im in enumerate(data["images"]):
        record = f"images[{i}]" + (f" (id {im['id']})" if isinstance(im["id"], int) else "")
        problems.whole(im["id"], 0, MAX_ID, f"images[{i}]", "id")
        if problems.text(im["file_name"], record, "file_name", non_empty=True):
            problems.relative_name(im["file_name"], record)
        for key in ("width", "height"):
            if im.get(key) is not None:
                problems.whole(im[key], 1, MAX_INT32, record, key)
    for i, a in enumerate(data["annotations"]):
        record = f"annotations[{i}]" + (f" (id {a['id']})" if isinstance(a["id"], int) else "")
        problems.whole(a["id"], 0, MAX_ID, f"annotations[{i}]", "id")
        problems.whole(a["image_id"], 0, MAX_ID, record, "image_id")
        problems.text(a["caption"], record, "caption", non_empty=True)
    problems.raise_if_any()
    images = pd.DataFrame(
        {
            "image_id": pd.array([im["id"] for im in data["images"]], dtype="int64"),
            "file_name": [im["file_name"] for im in data["images"]],
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


KARPATHY_DATASETS = ("coco", "flickr30k")
FLICKR30K_IMAGE_FOLDER = "flickr30k-images"


def load_karpathy_dataset(path: str | Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Read one of Karpathy's split files and keep one split ('test', 'val', 'train', 'restval').

    Returns (images, captions, dataset), dataset being 'coco' or 'flickr30k': the file's own
    "dataset" key, or, without one, 'coco' when its records carry a `cocoid`.

    - dataset_coco.json: image ids are `cocoid`; image paths are `filepath/filename` (e.g.
      val2014/COCO_val2014_000000391895.jpg), so the image root is the folder that holds val2014/.
    - dataset_flickr30k.json (the same format, without `cocoid` and `filepath`): image ids are
      Karpathy's `imgid`; image paths are `flickr30k-images/<filename>`, the folder of the Flickr30k
      download, so the image root is the folder that holds flickr30k-images/ (ingest also accepts
      that folder itself).

    Caption ids are Karpathy's sentids; captions are 'raw'.
    """
    path = Path(path)
    data = _read_json(
        path,
        "Karpathy split file",
        "Give --karpathy-json pointing at dataset_coco.json or dataset_flickr30k.json.",
    )
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} is not a Karpathy split file: expected an object with 'images'.")
    dataset = data.get("dataset")
    if dataset is None:
        first = data["images"][0] if data["images"] else None
        dataset = "flickr30k" if isinstance(first, dict) and "cocoid" not in first and "imgid" in first else "coco"
    if dataset not in KARPATHY_DATASETS:
        raise UserError(
            f"{path} is Karpathy's split file of dataset {_short(dataset)}; clipfail reads "
            f"{' and '.join(KARPATHY_DATASETS)} (dataset_coco.json, dataset_flickr30k.json)."
        )
    id_key = "cocoid" if dataset == "coco" else "imgid"
    need = {"filename", id_key, "split", "sentences"}
    bad = [i for i, im in enumerate(data["images"]) if not isinstance(im, dict) or not need <= im.keys()]
    if bad:
        raise UserError(f"{path}: images entries without {sorted(need)} at positions {list_offenders(bad)}.")
    problems = _Problems(path)
    for i, im in enumerate(data["images"]):
        problems.text(im["split"], f"images[{i}]", "split")
    problems.raise_if_any()
    splits = sorted({im["split"] for im in data["images"]})
    chosen = [(i, im) for i, im in enumerate(data["images"]) if im["split"] == split]
    if not chosen:
        raise UserError(f"{path} has no images in split {split!r}. Its splits are: {', '.join(splits)}.")
    for i, im in chosen:
        record = f"images[{i}]" + (f" ({id_key} {im[id_key]})" if isinstance(im[id_key], int) else "")
        problems.whole(im[id_key], 0, MAX_ID, f"images[{i}]", id_key)
        problems.text(im["filename"], record, "filename", non_empty=True)
        if im.get("filepath") is not None:
            problems.text(im["filepath"], record, "filepath")
        if not isinstance(im["sentences"], list):
            problems.add("sentences is not a list", record)
            continue
        for j, s in enumerate(im["sentences"]):
            where = f"{record} sentences[{j}]"
            if not isinstance(s, dict) or "sentid" not in s or "raw" not in s:
                problems.add("sentence without 'sentid' and 'raw'", where)
                continue
            problems.whole(s["sentid"], 0, MAX_ID, where, "sentid")
            problems.text(s["raw"], where, "raw", non_empty=True)
    problems.raise_if_any()
    img_rows, cap_rows = [], []
    for _, im in chosen:
        if dataset == "flickr30k":
            rel = f"{FLICKR30K_IMAGE_FOLDER}/{im['filename']}"
        else:
            rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        img_rows.append((im[id_key], im["filename"], None, None, rel))
        for s in im["sentences"]:
            cap_rows.append((s["sentid"], im[id_key], s["raw"].strip()))
    images = pd.DataFrame(img_rows, columns=["image_id", "file_name", "width", "height", "rel_path"])
    images["width"] = images["width"].astype("Int32")
    images["height"] = images["height"].astype("Int32")
    captions = pd.DataFrame(cap_rows, columns=["caption_id", "image_id", "text"])
    _check_keys(path, images, captions)
    return images, captions, dataset


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
