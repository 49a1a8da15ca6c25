"""The eccv_caption package's data (the `positives` extra): where it is, and the COCO 5k test split it lists.

Kept apart from `positives` (which ranks, and so imports torch) so that `clipfail ingest --coco5k-test` reads
the split without loading a model library. Only the package's JSON files are read; it is never imported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

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


_PARSED: dict[tuple[str, str], Mapping[int, tuple[int, ...]]] = {}  # (path, sha256 of its bytes) -> its id lists


def read_id_lists(path: Path) -> tuple[bytes, Mapping[int, tuple[int, ...]]]:
    """One of the package's data files: its bytes (for the caller's hash) and its id lists, checked by `id_lists`,
    read-only. The parse (about a quarter of a second for a file of 25,000 captions) is kept for the process under
    the sha256 of the bytes read, so a process that imports several subsets' positives, or ingests and then imports,
    parses each file once; a file whose bytes changed is parsed again."""
    data = userfiles.read_bytes(path, f"{PACKAGE} data file")
    key = (str(path), hashlib.sha256(data).hexdigest())
    lists = _PARSED.get(key)
    if lists is None:
        parsed = id_lists(userfiles.parse_json(data, f"{PACKAGE} data file {path}"), path.name)
        if len(_PARSED) >= 16:  # the package has 6 files; never more than a few versions of them
            _PARSED.clear()
        lists = _PARSED[key] = MappingProxyType({k: tuple(v) for k, v in parsed.items()})
    return data, lists


@dataclass(frozen=True)
class Coco5kSplit:
    """The COCO 5k test split as the package lists it (original_*.json: the pairs its metrics count as COCO's).
    Read-only: one object may serve every caller in the process."""

    image_to_captions: Mapping[int, tuple[int, ...]]  # 5,000 image ids -> their 5 caption ids, in the package's order
    version: str
    sha256: str  # of original_image_to_caption.json and original_caption_to_image.json, in that order

    @cached_property
    def caption_ids(self) -> frozenset[int]:
        return frozenset(c for caps in self.image_to_captions.values() for c in caps)


_SPLITS: dict[tuple[str, str], Coco5kSplit] = {}  # (data folder, sha256 of both files) -> the split, checked


def coco5k_test_split(need: str = "--coco5k-test") -> Coco5kSplit:
    """The COCO 5k test split's caption and image ids from the installed package, its two files checked to list
    the same pairs, each caption on one image (`clipfail ingest --coco5k-test` reads it; import uses it to say
    how much of a subset lies in the split)."""
    folder, version = package_dir(need)
    sha = hashlib.sha256()
    lists = {}
    for key in ("image_to_caption", "caption_to_image"):
        data, lists[key] = read_id_lists(folder / f"original_{key}.json")
        sha.update(data)
    done = _SPLITS.get((str(folder), sha.hexdigest()))
    if done is not None and done.version == version:
        return done
    i2c, c2i = lists["image_to_caption"], lists["caption_to_image"]
    pairs = {(i, c) for i, caps in i2c.items() for c in caps}
    if pairs != {(i, c) for c, imgs in c2i.items() for i in imgs} or len(pairs) != len(c2i):
        raise UserError(
            f"The {PACKAGE} package's original_image_to_caption.json and original_caption_to_image.json do not list "
            f"the same caption-image pairs (one image per caption). Reinstall it: {INSTALL_HINT}"
        )
    split = _SPLITS[(str(folder), sha.hexdigest())] = Coco5kSplit(i2c, version, sha.hexdigest())
    return split
