"""Model resolution and the encoders: the text fast path equals open_clip's encode_text, images
are decoded and converted as documented, and nothing here touches the network."""

from __future__ import annotations

import random
import socket
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from toolkit.embed import encode, models
from toolkit.embed.devices import resolve_device
from toolkit.errors import UserError

WORDS = (
    "a an the man woman child dog cat horse sitting standing riding on in next to with holding large small "
    "two three red blue green white black street car bus train pizza plate of food table kitchen field"
).split()


def captions(n: int, seed: int = 0, lo: int = 2, hi: int = 30) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        out.append(text.capitalize() + rng.choice([".", "", " !", "?"]))
    return out


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    real_connect = socket.socket.connect

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(sock, address)  # Unix sockets (DataLoader workers) are fine

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return models.load_model("tiny-clip", device="cpu")


def reference_text(bundle, texts):
    with torch.inference_mode():
        feats = bundle.model.encode_text(bundle.tokenizer(texts))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


# --------------------------------------------------------------------------- text fast path


def test_fast_path_equals_encode_text_on_tiny_config(tiny):
    texts = captions(40) + ["word " * 90, "", "a"]
    res = encode.encode_texts_with_info(tiny, texts, batch_size=7)  # several batches of different lengths
    assert res.fast_path
    assert res.embeddings.dtype == np.float32 and res.embeddings.shape == (len(texts), 64)
    ref = reference_text(tiny, texts)
    assert np.abs(res.embeddings - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, atol=1e-5)


def test_fast_path_equals_encode_text_on_random_vit_b32_quickgelu():
    torch.manual_seed(1)
    bundle = models.load_model("ViT-B-32-quickgelu", device="cpu")  # random weights: same cost, no download
    assert bundle.model_name == "ViT-B-32-quickgelu" and bundle.pretrained is None
    texts = captions(12, seed=3, lo=8, hi=25)
    res = encode.encode_texts_with_info(bundle, texts, batch_size=4)
    assert res.fast_path and res.embeddings.shape == (12, 512)
    assert np.abs(res.embeddings - reference_text(bundle, texts)).max() < 1e-5


def test_order_is_restored_and_independent_of_batching(tiny):
    texts = captions(30, seed=5)
    base = encode.encode_texts(tiny, texts, batch_size=256)
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = encode.encode_texts(tiny, [texts[i] for i in perm], batch_size=4)
    np.testing.assert_allclose(shuffled, base[perm], atol=1e-6)
    one_by_one = np.stack([encode.encode_texts(tiny, [t])[0] for t in texts[:5]])
    np.testing.assert_allclose(one_by_one, base[:5], atol=1e-6)


def test_truncated_captions_are_counted_and_cut_like_open_clip(tiny):
    long_caption = " ".join(["giraffe"] * 80)  # one token per word: 82 tokens with SOT/EOT
    exact = " ".join(["dog"] * 75)  # 77 tokens: fits exactly, not truncated
    texts = ["a dog", long_caption, exact, long_caption + " and more"]
    toks = encode.tokenize(tiny, texts)
    assert torch.equal(toks.ids, tiny.tokenizer(texts))
    assert toks.n_truncated == 2
    assert toks.truncated.tolist() == [1, 3]
    res = encode.encode_texts_with_info(tiny, texts)
    assert res.n_truncated == 2
    # truncated as open_clip does: both long captions share their first 76 tokens + EOT
    assert np.abs(res.embeddings - reference_text(tiny, texts)).max() < 1e-5
    np.testing.assert_allclose(res.embeddings[1], res.embeddings[3], atol=1e-6)


def test_other_text_towers_fall_back_to_encode_text(tiny, monkeypatch):
    monkeypatch.setattr(tiny.model, "text_pool_type", "first")  # not EOT pooling: slicing would be wrong
    assert encode.fast_text_tower(tiny.model) is None
    texts = captions(6, seed=9)
    res = encode.encode_texts_with_info(tiny, texts)
    assert not res.fast_path
    assert np.abs(res.embeddings - reference_text(tiny, texts)).max() < 1e-6


def test_half_precision_outputs_float32(tiny):
    torch.manual_seed(0)
    bf16 = models.load_model("tiny-clip", device="cpu", precision="bf16")
    bf16.model.load_state_dict(tiny.model.state_dict())  # the same weights, rounded to bf16
    texts = captions(8, seed=2)
    low = encode.encode_texts(bf16, texts)
    assert low.dtype == np.float32
    cos = (low * encode.encode_texts(tiny, texts)).sum(1)
    assert cos.min() > 0.95


# --------------------------------------------------------------------------- model resolution


@pytest.mark.parametrize(
    "name, arch",
    [
        ("openai/clip-vit-base-patch32", "ViT-B-32-quickgelu"),
        ("openai/clip-vit-base-patch16", "ViT-B-16-quickgelu"),
        ("openai/clip-vit-large-patch14", "ViT-L-14-quickgelu"),
    ],
)
def test_hf_style_names_map_to_quickgelu_openai(name, arch):
    spec = models.resolve_spec(name)
    assert (spec.model_name, spec.pretrained, spec.kind) == (arch, "openai", "hf-name")
    assert open_clip.get_model_config(arch)["quick_gelu"] is True
    assert open_clip.get_pretrained_cfg(arch, "openai")["quick_gelu"] is True


def test_plain_name_with_openai_tag_uses_quickgelu_and_bad_combinations_are_refused():
    assert models.resolve_spec("ViT-B-32", "openai").model_name == "ViT-B-32-quickgelu"
    assert models.resolve_spec("ViT-B-32", "laion2b_s34b_b79k").model_name == "ViT-B-32"
    with pytest.raises(UserError, match="cannot take --pretrained"):
        models.resolve_spec("openai/clip-vit-base-patch32", "laion2b_s34b_b79k")
    with pytest.raises(UserError, match="no pretrained tag"):
        models.resolve_spec("ViT-B-32", "no-such-tag")
    with pytest.raises(UserError, match="Unknown model"):
        models.resolve_spec("not-a-model")


@pytest.mark.parametrize("offline_env", ["1", "0"])
def test_missing_weights_fail_fast_and_suggest_checkpoint(tmp_path, monkeypatch, offline_env):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_env == "1")
    if offline_env == "0":  # "online", but the network is down: the probe must fail fast, not retry
        monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    start = time.monotonic()
    with pytest.raises(UserError, match="--checkpoint"):
        models.load_model("openai/clip-vit-base-patch32", cache_dir=str(tmp_path / "empty-cache"), device="cpu")
    with pytest.raises(UserError, match="--checkpoint"):
        models.load_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", cache_dir=str(tmp_path), device="cpu")
    assert time.monotonic() - start < 10


def test_config_json_path_and_bad_config(tmp_path):
    cfg = tmp_path / "my-tiny-arch.json"
    cfg.write_text(models.tiny_config_path().read_text())
    bundle = models.load_model(str(cfg), device="cpu")
    assert bundle.model_name == "my-tiny-arch" and bundle.image_size == (64, 64)
    bad = tmp_path / "broken.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(UserError, match="not an open_clip model config"):
        models.load_model(str(bad))


@pytest.mark.parametrize(
    "cuda,mps,auto_mps,expected",
    [(True, True, True, "cuda"), (False, True, True, "mps"), (False, True, False, "cpu"), (False, False, True, "cpu")],
)
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, auto_mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    for spec in ("auto", None, " AUTO ", ""):
        assert resolve_device(spec, auto_mps=auto_mps) == expected, spec
    assert resolve_device("cpu", auto_mps=auto_mps) == "cpu"


def test_an_unavailable_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(spec)
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(UserError, match="Unknown --device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("CUDA:1") == "cuda:1"
    with pytest.raises(UserError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_checkpoint_gives_the_same_embeddings_as_the_in_memory_model(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = models.load_model("tiny-clip", checkpoint=path, device="cpu")
    assert loaded.checkpoint_sha256 == models.sha256_file(path) and loaded.pretrained is None
    texts = captions(10, seed=4)
    np.testing.assert_array_equal(encode.encode_texts(loaded, texts), encode.encode_texts(tiny, texts))
    img = tmp_path / "x.jpg"
    Image.new("RGB", (90, 70), (200, 30, 40)).save(img)
    np.testing.assert_array_equal(
        encode.encode_images(loaded, [img], num_workers=0), encode.encode_images(tiny, [img], num_workers=0)
    )
    # save_random_checkpoint is seeded; a checkpoint of another architecture is refused
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert models.save_random_checkpoint(a, seed=7) == models.save_random_checkpoint(b, seed=7)
    assert models.save_random_checkpoint(b, seed=8) != models.sha256_file(a)
    pt = tmp_path / "c.pt"
    models.save_random_checkpoint(pt, seed=7)
    from_pt = models.load_model("tiny-clip", checkpoint=pt).model.state_dict()
    from_st = models.load_model("tiny-clip", checkpoint=a).model.state_dict()
    assert all(torch.equal(from_pt[k], from_st[k]) for k in from_st)
    cfg = tmp_path / "other-arch.json"
    cfg.write_text(models.tiny_config_path().read_text().replace('"embed_dim": 64', '"embed_dim": 32'))
    with pytest.raises(UserError, match="does not fit"):
        models.load_model(str(cfg), checkpoint=a)


# --------------------------------------------------------------------------- images


def _write_modes(folder):
    """One file per awkward mode; returns paths."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    files = {}
    files["cmyk.jpg"] = rgb.convert("CMYK")
    files["grey.jpg"] = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (60, 80), dtype=np.uint8)))
    files["alpha.png"] = rgba
    files["la.png"] = rgb.convert("LA")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    files["palette.png"] = pal
    files["grey16.png"] = rgb.convert("L").convert("I;16")
    paths = []
    for name, im in files.items():
        p = folder / name
        im.save(p, transparency=0) if name == "palette.png" else im.save(p)
        paths.append(p)
    return paths


def test_image_modes_are_converted_to_rgb(tiny, tmp_path):
    paths = _write_modes(tmp_path)
    ds = encode.ImageFiles(paths, tiny.preprocess, tiny.image_size)
    for i, p in enumerate(paths):
        assert encode.open_rgb(p).mode == "RGB"
        x, idx, err = ds[i]
        assert err == "" and idx == i and tuple(x.shape) == (3, 64, 64)
        torch.testing.assert_close(x, tiny.preprocess(Image.open(p).convert("RGB")), rtol=0, atol=0)
    emb = encode.encode_images(tiny, paths, batch_size=4, num_workers=0)
    assert emb.shape == (len(paths), 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(tiny, tmp_path, workers):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    notimage = tmp_path / "notes.jpg"
    notimage.write_text("not a jpeg")
    with pytest.raises(UserError) as err:
        encode.encode_images(tiny, [good, truncated, notimage], batch_size=2, num_workers=workers)
    assert "truncated.jpg" in str(err.value)
    assert "Traceback" not in str(err.value)


def _natural_jpeg(path, seed):
    """A 640x480 photo-like JPEG: smooth structure plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    arr = np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0, 12, (480, 640, 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)


def test_draft_decoding_differs_only_by_resize_interpolation_noise(tiny, tmp_path):
    """Draft decoding is a DCT-domain 2x/4x/8x reduction before the bicubic resize. Its effect is
    measured against PIL's own two-step resize (Image.reduce, then the same preprocess), which is
    pure resize-interpolation noise with no decoding involved; both stay within ~2 grey levels."""
    pre224 = open_clip.image_transform(224, is_train=False)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    paths = []
    for seed in range(3):
        p = tmp_path / f"photo{seed}.jpg"
        _natural_jpeg(p, seed)
        paths.append(p)
    for p in paths:
        drafted = Image.open(p)
        drafted.draft("RGB", (224, 224))
        assert drafted.size == (320, 240)  # decoded at half size; still >= the 224 resize target
        full = pre224(encode.open_rgb(p))
        draft = pre224(encode.open_rgb(p, (224, 224)))
        two_step = pre224(encode.open_rgb(p).reduce(2))
        d_draft = ((full - draft) * std).abs().mean().item()  # in units of the 0..1 pixel range
        d_resize = ((full - two_step) * std).abs().mean().item()
        assert 0 < d_draft < 0.01  # < 2.6 grey levels on average
        assert d_draft < 1.5 * d_resize
    # End to end on the tiny model: draft is opt-in and changes embeddings only slightly.
    full = encode.encode_images(tiny, paths, num_workers=0)
    draft = encode.encode_images(tiny, paths, num_workers=0, draft=True)
    assert not np.array_equal(full, draft)
    assert (full * draft).sum(1).min() > 0.999
