"""Embed: CLIP embeddings of a subset's images and captions.

Reads a subset's images and captions from the database and the image files; writes one checksummed,
L2-normalised float32 .npy file per kind into the study's cache and registers it in
`embedding_sets` and `embedding_rows`. `stage` is the `clipfail embed` stage (sharding, resuming,
the local engine), `models` resolves a model spec to an open_clip model (pretrained tags, Hugging
Face names, local checkpoints, the tiny test config), `encode` encodes texts and images (the exact
text fast path, image decoding), `devices` is the one device resolver every stage uses, and
`ray_engine` computes the same rows on a Ray cluster (`--engine ray`).
"""
