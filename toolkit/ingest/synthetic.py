"""A generated dataset in COCO captions format, for tests and the offline demo.

`make_synthetic_coco(root, n_images)` writes exactly the layout of the real download:

    root/annotations/captions_val2017.json   (info, licenses, images, annotations)
    root/annotations/instances_val2017.json  (images, categories, one annotation per drawn shape)
    root/val2017/000000xxxxxx.jpg

Each image is a drawn scene: one to three groups of coloured shapes (circles, squares,
triangles) with a count, a size and a left/right placement, on a coloured background;
some images are greyscale JPEGs. Each image gets 5-7 captions that describe its scene.
Annotation ids are shuffled with respect to image order, as in real COCO, so caption
order tests are meaningful. Everything is derived from the seed.

The instances file has the shape of COCO's detection file: categories are the shapes
(``SHAPE_CATEGORY_IDS``: circle 1, square 2, triangle 3, supercategory "shape"), and each drawn shape
is one annotation with its box ``[x, y, w, h]`` (clipped to the image), its area (the drawn shape's
area in pixels: pi r^2, (2r)^2 or 2r^2) and ``iscrowd`` 0. Tests can also pass `scenes` to draw
chosen scenes (e.g. two images that differ only in a count or a placement).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"grey": (128, 128, 128), "beige": (225, 210, 170), "sky blue": (150, 200, 240), "dark": (40, 40, 50)}
SHAPES = ["circle", "square", "triangle"]
SHAPE_CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 3}
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}


@dataclass
class Group:
    count: int
    colour: str
    shape: str
    side: str  # 'left' | 'right'
    size: str  # 'small' | 'large'

    def phrase(self, with_size: bool = False) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        size = f"{self.size} " if with_size else ""
        return f"{NUMBERS[self.count]} {size}{self.colour} {noun}"


@dataclass
class Scene:
    """A chosen scene for `make_synthetic_coco(scenes=...)`; captions default to the generated ones."""

    groups: list[Group]
    background: str = "grey"
    captions: list[str] | None = None


def _draw_scene(
    rng: random.Random, width: int, height: int, groups: list[Group], background: str, shapes: list | None = None
) -> Image.Image:
    """Draw the scene; when `shapes` is a list, append (shape, box x0 y0 x1 y1, radius) for each drawn shape."""
    img = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for g in groups:
        x0 = 0 if g.side == "left" else width // 2
        r = max(4, int(min(width, height) * (0.16 if g.size == "large" else 0.08)))
        for _ in range(g.count):
            cx = rng.randint(x0 + r, max(x0 + r, x0 + width // 2 - r))
            cy = rng.randint(r, max(r, height - r))
            box = (cx - r, cy - r, cx + r, cy + r)
            if shapes is not None:
                shapes.append((g.shape, box, r))
            colour = COLOURS[g.colour]
            if g.shape == "circle":
                draw.ellipse(box, fill=colour)
            elif g.shape == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def _captions(rng: random.Random, groups: list[Group], background: str, grey: bool) -> list[str]:
    main = groups[0]
    caps = [
        f"{main.phrase()} on the {main.side}".capitalize(),
        f"A picture of {' and '.join(g.phrase() for g in groups)}.",
        f"{main.phrase(with_size=True)} on a {background} background".capitalize(),
        f"There {'is' if main.count == 1 else 'are'} {main.phrase()} in this image.",
        f"{sum(g.count for g in groups)} shapes drawn on a {background} background".capitalize(),
    ]
    if len(groups) > 1:
        other = groups[1]
        caps.append(f"{main.phrase()} to the {main.side} of {other.phrase()}".capitalize())
    if grey:
        caps.append(f"A black and white photo of {main.phrase()}.")
    if rng.random() < 0.15:
        caps.append(f'A "{main.colour}" {main.shape}, drawn on a {background} backdrop — café style')
    rng.shuffle(caps)
    return caps[: rng.randint(5, min(7, len(caps)))] if len(caps) > 5 else caps


def make_synthetic_coco(
    root: str | Path,
    n_images: int,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    grey_fraction: float = 0.1,
    first_image_id: int = 1000,
    scenes: list[Scene] | None = None,
) -> Path:
    """Write a COCO-format captions dataset of `n_images` drawn scenes under `root`; returns the JSON path.

    With `scenes`, image i (in ascending image id order) draws scenes[i] (its groups, background and,
    if given, captions) instead of a random scene; `n_images` must then equal len(scenes).
    """
    if scenes is not None and len(scenes) != n_images:
        raise ValueError("scenes must have one entry per image")
    rng = random.Random(seed)
    root = Path(root)
    img_dir = root / "val2017"
    ann_dir = root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, instances = [], [], []
    ids = rng.sample(range(first_image_id, first_image_id + 50 * max(n_images, 1)), n_images)
    for index, image_id in enumerate(sorted(ids)):
        width, height = size if size else (rng.randint(96, 160), rng.randint(72, 120))
        groups = _random_groups(rng)
        background = rng.choice(list(BACKGROUNDS))
        grey = rng.random() < grey_fraction
        scene = scenes[index] if scenes is not None else None
        if scene is not None:
            groups, background, grey = scene.groups, scene.background, False
        shapes: list = []
        img = _draw_scene(rng, width, height, groups, background, shapes)
        _add_instances(instances, shapes, image_id, width, height)
        if grey:
            img = img.convert("L")
        file_name = f"{image_id:012d}.jpg"
        img.save(img_dir / file_name, quality=90)
        images.append(_image_entry(file_name, image_id, width, height))
        texts = _captions(rng, groups, background, grey)
        if scene is not None and scene.captions is not None:
            texts = list(scene.captions)
        for text in texts:
            annotations.append({"image_id": image_id, "id": None, "caption": text})
    # Annotation ids are unique but not in image order, as in the real file.
    ann_ids = rng.sample(range(100_000, 100_000 + 20 * max(len(annotations), 1)), len(annotations))
    for ann, ann_id in zip(annotations, ann_ids):
        ann["id"] = ann_id
    rng.shuffle(annotations)
    return _write_annotations(ann_dir, images, annotations, instances)


def _random_groups(rng: random.Random) -> list[Group]:
    """One to three random groups of shapes, on different sides (drawn from `rng` in a fixed order)."""
    n_groups = rng.randint(1, 3)
    sides = ["left", "right"]
    rng.shuffle(sides)
    return [
        Group(
            count=rng.randint(1, 4),
            colour=rng.choice(list(COLOURS)),
            shape=rng.choice(SHAPES),
            side=sides[i % 2],
            size=rng.choice(["small", "large"]),
        )
        for i in range(n_groups)
    ]


def _add_instances(instances: list, shapes: list, image_id: int, width: int, height: int) -> None:
    """The drawn shapes as COCO object instances (boxes clipped to the image), appended to `instances`."""
    for shape, (x0, y0, x1, y1), r in shapes:
        bx0, by0, bx1, by1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        area = {"circle": math.pi * r * r, "square": 4.0 * r * r, "triangle": 2.0 * r * r}[shape]
        instances.append(
            {
                "id": 900_000 + len(instances),
                "image_id": image_id,
                "category_id": SHAPE_CATEGORY_IDS[shape],
                "bbox": [float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)],
                "area": round(area, 2),
                "iscrowd": 0,
                "segmentation": [],
            }
        )


def _image_entry(file_name: str, image_id: int, width: int, height: int) -> dict:
    return {
        "license": 1,
        "file_name": file_name,
        "coco_url": f"http://images.cocodataset.org/val2017/{file_name}",
        "height": height,
        "width": width,
        "date_captured": "2013-11-14 17:02:52",
        "flickr_url": "",
        "id": image_id,
    }


def _write_annotations(ann_dir: Path, images: list, annotations: list, instances: list) -> Path:
    """captions_val2017.json and instances_val2017.json, in COCO's layout; returns the captions file."""
    data = {
        "info": {
            "description": "clipfail synthetic COCO-format captions",
            "version": "1.0",
            "year": 2026,
            "contributor": "clipfail",
            "date_created": "2026/01/01",
        },
        "licenses": [{"url": "", "id": 1, "name": "generated"}],
        "images": images,
        "annotations": annotations,
    }
    out = ann_dir / "captions_val2017.json"
    out.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    detection = {
        "info": data["info"],
        "licenses": data["licenses"],
        "images": images,
        "annotations": instances,
        "categories": [{"supercategory": "shape", "id": i, "name": n} for n, i in SHAPE_CATEGORY_IDS.items()],
    }
    (ann_dir / "instances_val2017.json").write_text(json.dumps(detection), encoding="utf-8")
    return out


def make_synthetic_flickr30k(root: str | Path, n_images: int, seed: int = 0, n_test: int | None = None) -> Path:
    """Write a dataset in the layout of Flickr30k with Karpathy's split file, from generated scenes.

        root/dataset_flickr30k.json      {"images": [{filename, imgid, split, sentences, sentids}], "dataset": ...}
        root/flickr30k-images/<id>.jpg

    As in the real file, records have no `cocoid` and no `filepath`; `imgid` counts from 0 in file order,
    `sentid` counts on over all sentences (each with raw, tokens, imgid, sentid), and file names are
    Flickr photo ids. `n_test` images (default: a third), drawn with `seed`, are in split 'test', a few in
    'val', the rest in 'train'. Returns the JSON path.
    """
    import shutil
    import tempfile

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_test = n_images // 3 if n_test is None else n_test
    if not 0 <= n_test <= n_images:
        raise ValueError("n_test must be between 0 and n_images")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        coco_json = make_synthetic_coco(tmp, n_images, seed=seed)
        coco = json.loads(coco_json.read_text(encoding="utf-8"))
        (root / "flickr30k-images").mkdir(exist_ok=True)
        caps: dict[int, list[dict]] = {}
        for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
            caps.setdefault(ann["image_id"], []).append(ann)
        order = sorted(coco["images"], key=lambda im: im["id"])
        rng.shuffle(order)  # Karpathy's file is not in photo id order
        test = set(rng.sample(range(n_images), n_test))
        rest = [i for i in range(n_images) if i not in test]
        val = set(rest[: max(0, min(len(rest) // 5, 2))])
        photo_ids = rng.sample(range(1_000_000_000, 1_000_000_000 + 100 * n_images), n_images)
        images, sentid = [], 0
        for imgid, im in enumerate(order):
            filename = f"{photo_ids[imgid]}.jpg"
            shutil.copyfile(Path(tmp) / "val2017" / im["file_name"], root / "flickr30k-images" / filename)
            sentences = []
            for ann in caps.get(im["id"], []):
                raw = ann["caption"]
                tokens = [t for t in "".join(c if c.isalnum() or c == " " else " " for c in raw.lower()).split()]
                sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            split = "test" if imgid in test else "val" if imgid in val else "train"
            images.append(
                {
                    "sentids": [s["sentid"] for s in sentences],
                    "imgid": imgid,
                    "sentences": sentences,
                    "split": split,
                    "filename": filename,
                }
            )
    out = root / "dataset_flickr30k.json"
    out.write_text(json.dumps({"images": images, "dataset": "flickr30k"}), encoding="utf-8")
    return out
