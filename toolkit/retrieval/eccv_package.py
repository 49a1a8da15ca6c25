"""The eccv_caption package's data (the `positives` extra): where it is, and the COCO 5k test split it lists.

Kept apart from `positives` (which ranks, and so imports torch) so that `clipfail ingest --coco5k-test` reads
the split without loading a model library. Only the package's JSON files are read; it is never imported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from toolkit import userfiles
from toolkit.errors import UserError

PACKAGE = "eccv_caption"
INSTALL_HINT = "Install it: pip install 'clipfail[positives]' (or: pip install eccv_caption==0.1.0)."


def package_dir(need: str = "--source eccv|cxc") -> tuple[Path, str]:
    """The package's data folder and version, found without importing it (only its JSON files are read)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec(PACKAGE)
    try:
        if spec is None or not spec.submodule_search_locations:
            raise PackageNotFoundError(PACKAGE)
        return Path(list(spec.submodule_search_locations)[0]) / "data", version(PACKAGE)
    except PackageNotFoundError:
        raise UserError(f"{need} reads the {PACKAGE} package, which is not installed. {INSTALL_HINT}") from None


def id_lists(obj, where: str) -> dict[int, list[int]]:
    """{"<id>": [ids]} with every key a decimal whole number and every value a list of whole numbers."""
    obj = userfiles.want_dict(obj, where)
    out: dict[int, list[int]] = {}
    for key, values in obj.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18 and key == str(int(key))):
            # "007" beside "7" would name one id twice, one list silently replacing the other
            raise userfiles.shape_error(f"{where} key {key!r}", "a whole number (an id) without leading zeros", key)
        ids = userfiles.want_list(values, f"{where}[{key!r}]")
        out[int(key)] = [userfiles.want_int(v, f"{where}[{key!r}][{i}]") for i, v in enumerate(ids)]
    return out


@dataclass
class Coco5kSplit:
    """The COCO 5k test split as the package lists it (original_*.json: the pairs its metrics count as COCO's)."""

    image_to_captions: dict[int, list[int]]  # 5,000 image ids -> their 5 caption annotation ids, in the package's order
    version: str
    sha256: str  # of original_image_to_caption.json and original_caption_to_image.json, in that order

    @property
    def caption_ids(self) -> set[int]:
        return {c for caps in self.image_to_captions.values() for c in caps}


def coco5k_test_split(need: str = "--coco5k-test") -> Coco5kSplit:
    """The COCO 5k test split's caption and image ids from the installed package, its two files checked to list
    the same pairs, each caption on one image (`clipfail ingest --coco5k-test` reads it; import uses it to say
    how much of a subset lies in the split)."""
    folder, version = package_dir(need)
    sha = hashlib.sha256()
    lists = {}
    for key in ("image_to_caption", "caption_to_image"):
        path = folder / f"original_{key}.json"
        data = userfiles.read_bytes(path, f"{PACKAGE} data file")
        sha.update(data)
        lists[key] = id_lists(userfiles.parse_json(data, f"{PACKAGE} data file {path}"), path.name)
    i2c, c2i = lists["image_to_caption"], lists["caption_to_image"]
    pairs = {(i, c) for i, caps in i2c.items() for c in caps}
    if pairs != {(i, c) for c, imgs in c2i.items() for i in imgs} or len(pairs) != len(c2i):
        raise UserError(
            f"The {PACKAGE} package's original_image_to_caption.json and original_caption_to_image.json do not list "
            f"the same caption-image pairs (one image per caption). Reinstall it: {INSTALL_HINT}"
        )
    return Coco5kSplit(i2c, version, sha.hexdigest())
