"""Ingest: the images and captions a study works on.

Reads a COCO-format captions JSON or a Karpathy split file, its image folder and, when there is one,
COCO's object instances JSON; writes `images`, `captions`, `bad_images`, a seeded sample
(`subsets`, `subset_images`, `subset_captions`) and the instance tables (`coco_categories`,
`image_instances`, `instance_files`). `stage` is the `clipfail ingest` stage, `coco` reads caption
files (COCO and Karpathy's splits of COCO and Flickr30k), `coco5k` the COCO 5k test split by COCO ids
(`--coco5k-test`), `instances` reads object instances, `download` fetches COCO 2017 val (or 2014 val)
into the layout ingest reads (`clipfail download-coco`), and
`synthetic` draws a small COCO-format dataset for the tests and the demo
(`clipfail make-synthetic-coco`).
"""
