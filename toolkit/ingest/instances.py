"""COCO object instances (instances_val2017.json) for a subset's images, read without pycocotools.

`ingest` calls `find_file` (``--instances-json FILE``, else ``annotations/instances_val2017.json``
under ``--coco-root`` when it exists, else nothing: the toolkit works without instances), `load`
(validates the whole file before anything is written) and `store` (inside ingest's transaction).

Tables written:
- ``coco_categories``: the file's categories (id, name, supercategory);
- ``image_instances``: one row per annotation of a subset image: category, box x/y/w/h in pixels,
  area, is_crowd;
- ``instance_files``: one row per subset that has instance data, so that a subset image with no
  instance row is known to have no annotated objects (rather than no data).

Refused with a UserError and nothing written: a file that is not JSON or not in COCO detection
format (the first offending positions are named), and a file that does not describe every image of
the subset (the count of missing images is given): such a file belongs to another captions file.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from toolkit.errors import UserError, list_offenders
from toolkit.ingest.coco import read_json_file
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.userfiles import check_regular, refuse_non_regular

DEFAULT_NAME = Path("annotations") / "instances_val2017.json"
FORMAT = (
    "A COCO instances file is an object with 'images' (id), 'categories' (id, name) and 'annotations' "
    "(id, image_id, category_id, bbox [x, y, w, h], optional area and iscrowd), like instances_val2017.json."
)


@dataclass
class Instances:
    path: Path
    sha256: str
    image_ids: set[int]
    categories: pd.DataFrame  # coco_category_id, name, supercategory
    instances: pd.DataFrame  # instance_id, image_id, coco_category_id, category_name, bbox_*, area, is_crowd


def find_file(coco_root=None, instances_json=None) -> Path | None:
    """The instances file to ingest: the explicit one (which must exist), else the default under coco_root."""
    hint = (
        "Give the path of instances_val2017.json, or leave out --instances-json (the toolkit works without it; "
        "triage then has no object evidence)."
    )
    if instances_json:
        return check_regular(instances_json, "Instances file", hint)
    if coco_root:
        path = Path(coco_root) / DEFAULT_NAME
        refuse_non_regular(path, "Instances file", "Move it away, or give --instances-json FILE.")
        if path.is_file():
            return path
    return None


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v  # not NaN


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def load(path: str | Path) -> Instances:
    """Read and validate an instances file; every problem is a UserError naming the file."""
    path = Path(path)
    data, sha256 = read_json_file(path, "Instances file", "Give --instances-json FILE, or leave it out.")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        found = list(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not a COCO instances file (found {found}). {FORMAT}")
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise UserError(f"{path} has no 'categories' list. {FORMAT}")
    bad_cats = [
        i
        for i, c in enumerate(cats)
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str)
    ]
    if bad_cats:
        raise UserError(
            f"{path}: categories without an integer 'id' and a 'name' at positions {list_offenders(bad_cats)}."
        )
    bad_images = [i for i, im in enumerate(data["images"]) if not isinstance(im, dict) or not _is_int(im.get("id"))]
    if bad_images:
        raise UserError(f"{path}: images without an integer 'id' at positions {list_offenders(bad_images)}. {FORMAT}")
    image_ids = {int(im["id"]) for im in data["images"]}
    cat_names = {int(c["id"]): c["name"] for c in cats}
    if len(cat_names) != len(cats):
        raise UserError(f"{path}: duplicate category ids.")

    def bad_annotation(a) -> bool:
        if not isinstance(a, dict) or not all(_is_int(a.get(k)) for k in ("id", "image_id", "category_id")):
            return True
        box = a.get("bbox")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(_is_number(v) for v in box)
            or box[2] < 0
            or box[3] < 0
        ):
            return True
        if "area" in a and a["area"] is not None and not _is_number(a["area"]):
            return True
        return a.get("iscrowd", 0) not in (0, 1, True, False)

    anns = data["annotations"]
    bad = [i for i, a in enumerate(anns) if bad_annotation(a)]
    if bad:
        hint = ""
        if anns and isinstance(anns[bad[0]], dict) and "caption" in anns[bad[0]]:
            hint = " This looks like a captions file; give instances_val2017.json."
        raise UserError(
            f"{path}: annotations without integer 'id', 'image_id', 'category_id' and a bbox of 4 numbers "
            f"(w, h >= 0) at positions {list_offenders(bad)}.{hint} {FORMAT}"
        )
    unknown_cat = [a["id"] for a in anns if a["category_id"] not in cat_names]
    if unknown_cat:
        raise UserError(
            f"{path}: annotations with a category_id not in 'categories', ids {list_offenders(unknown_cat)}."
        )
    unknown_img = [a["id"] for a in anns if a["image_id"] not in image_ids]
    if unknown_img:
        raise UserError(
            f"{path}: annotations point at image ids that are not in its 'images' list, ids "
            f"{list_offenders(unknown_img)}. The file is inconsistent; fetch it again."
        )
    inst = pd.DataFrame(
        {
            "instance_id": pd.array([a["id"] for a in anns], dtype="int64"),
            "image_id": pd.array([a["image_id"] for a in anns], dtype="int64"),
            "coco_category_id": pd.array([a["category_id"] for a in anns], dtype="int64"),
            "category_name": [cat_names[a["category_id"]] for a in anns],
            "bbox_x": [float(a["bbox"][0]) for a in anns],
            "bbox_y": [float(a["bbox"][1]) for a in anns],
            "bbox_w": [float(a["bbox"][2]) for a in anns],
            "bbox_h": [float(a["bbox"][3]) for a in anns],
            "area": pd.array([None if a.get("area") is None else float(a["area"]) for a in anns], dtype="Float64"),
            "is_crowd": [bool(a.get("iscrowd", 0)) for a in anns],
        }
    )
    dup = inst.loc[inst["instance_id"].duplicated(), "instance_id"].tolist()
    if dup:
        raise UserError(f"{path}: duplicate annotation ids, {list_offenders(dup)}.")
    categories = pd.DataFrame(
        {
            "coco_category_id": pd.array([int(c["id"]) for c in cats], dtype="int64"),
            "name": [c["name"] for c in cats],
            "supercategory": [
                c.get("supercategory") if isinstance(c.get("supercategory"), str) else None for c in cats
            ],
        }
    )
    return Instances(path, sha256, image_ids, categories, inst)


def store(con, subset_id: int, run_id: int, data: Instances) -> int:
    """Store the instances of the subset's images; call inside the ingest transaction. Returns their count.

    Refuses (UserError, so the caller's transaction rolls back) a file that does not describe every
    image of the subset, a category id or instance id that the database already holds with other
    values, and a subset that already has instances from a different file.
    """
    subset_ids = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ?", [subset_id]).fetchnumpy()[
        "image_id"
    ]
    missing = sorted(int(i) for i in subset_ids if int(i) not in data.image_ids)
    if missing:
        raise UserError(
            f"Instances file {data.path} does not match the captions: {len(missing)} of the subset's "
            f"{len(subset_ids)} images are not in its 'images' list, {list_offenders(missing)}. Give the instances "
            "file of the same COCO split (instances_val2017.json for captions_val2017.json), or leave out "
            "--instances-json. Nothing was written."
        )
    known = con.execute(
        "SELECT source_sha256, source_file FROM instance_files WHERE subset_id = ?", [subset_id]
    ).fetchone()
    if known and known[0] == data.sha256:
        return 0
    if known:
        raise UserError(
            f"Subset {subset_id} already has instances from {study_paths.resolve(con, known[1])} (a different file "
            f"than {data.path}). "
            "Ingest into a separate --db to use another instances file."
        )
    con.register("_new_cats", data.categories)
    try:
        clash = con.execute(
            "SELECT c.coco_category_id FROM coco_categories c JOIN _new_cats n USING (coco_category_id) "
            "WHERE c.name <> n.name ORDER BY 1"
        ).fetchall()
        if clash:
            raise UserError(
                f"Instances file {data.path} names COCO categories {list_offenders([r[0] for r in clash])} differently "
                "from the database. Use a separate --db for each dataset."
            )
        con.execute(
            "INSERT INTO coco_categories BY NAME SELECT * FROM _new_cats "
            "WHERE coco_category_id NOT IN (SELECT coco_category_id FROM coco_categories)"
        )
    finally:
        con.unregister("_new_cats")
    wanted = set(int(i) for i in subset_ids)
    inst = data.instances.loc[data.instances["image_id"].isin(wanted)]
    con.register("_new_inst", inst)
    try:
        clash = con.execute(
            "SELECT i.instance_id FROM image_instances i JOIN _new_inst n USING (instance_id) "
            "WHERE i.image_id <> n.image_id OR i.coco_category_id <> n.coco_category_id "
            "OR i.bbox_x <> n.bbox_x OR i.bbox_y <> n.bbox_y OR i.bbox_w <> n.bbox_w OR i.bbox_h <> n.bbox_h ORDER BY 1"
        ).fetchall()
        if clash:
            raise UserError(
                f"Instances file {data.path} has annotation ids that the database holds with other values, "
                f"{list_offenders([r[0] for r in clash])}. Use a separate --db for each dataset."
            )
        con.execute(
            "INSERT INTO image_instances BY NAME SELECT * FROM _new_inst "
            "WHERE instance_id NOT IN (SELECT instance_id FROM image_instances)"
        )
    finally:
        con.unregister("_new_inst")
    con.execute(
        "INSERT INTO instance_files (subset_id, source_file, source_sha256, n_instances, created_at, run_id) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [subset_id, study_paths.to_stored(con, data.path), data.sha256, len(inst), db.now(), run_id],
    )
    return len(inst)


def store_for_existing_subset(con, subset_id: int, data: Instances) -> int:
    """Add instances to a subset ingested earlier (an ingest that is otherwise a no-op), in its own run."""
    known = con.execute("SELECT source_sha256 FROM instance_files WHERE subset_id = ?", [subset_id]).fetchone()
    if known and known[0] == data.sha256:
        return 0
    started = db.now()
    with db.transaction(con):
        run_id = db.insert_run(con, "ingest", {"subset_id": subset_id, "instances_sha256": data.sha256}, started)
        return store(con, subset_id, run_id, data)
