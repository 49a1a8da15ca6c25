"""Issue 14: the embed stage at the hardware's speed, through the real CLI on the tiny model.

One image stream per stage call (shards cut from it), each caption tokenized once, `--decode gpu`
(its tensor preprocess checked on CPU tensors; refused without CUDA), a re-run that loads
nothing, half precision, and kill -9 at any point followed by a resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import query_df, require_tool, run_script_forked
from PIL import Image

from toolkit.embed import encode, models
from toolkit.errors import UserError
from toolkit.store import paths as study_paths

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
TINY = ["--model", "tiny-clip", "--num-workers", "0"]
SMALL = {"image": 4, "text": 20}  # 12 images -> 3 image shards; ~60 captions -> 3 text shards


@pytest.fixture
def ingested(ingested12, monkeypatch):
    """conftest's ingested12 (s12: 12 images ingested, copied from a study made once), cut into SMALL shards."""
    from toolkit.embed import stage as embed_mod

    monkeypatch.setattr(embed_mod, "SHARD_ROWS", SMALL)
    return ingested12


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-clip", device="cpu")


def query(db_path, sql, params=()):
    return query_df(db_path, sql, params)


def sets(db_path):
    return query(db_path, "SELECT * FROM embedding_sets ORDER BY embedding_set_id")


def image_paths(db_path):
    df = query(
        db_path,
        "SELECT s.image_root || '/' || i.rel_path AS path FROM subset_images si "
        "JOIN images i USING (image_id) JOIN subsets s USING (subset_id) ORDER BY si.position",
    )
    # stored relative to the database's folder when the images lie under it
    return [str(study_paths.resolve(db_path, p)) for p in df["path"]]


def captions(db_path):
    df = query(
        db_path,
        "SELECT c.text FROM subset_captions sc JOIN captions c USING (caption_id) JOIN subset_images si "
        "ON si.subset_id = sc.subset_id AND si.image_id = sc.image_id ORDER BY si.position, sc.position",
    )
    return df["text"].tolist()


def array_of(db_path, kind, decode=None):
    df = sets(db_path)
    df = df[df.kind == kind]
    if decode:
        df = df[[json.loads(c).get("decode") == decode for c in df.config_json]]
    assert len(df) == 1, df
    return np.load(study_paths.resolve(db_path, df.path.iloc[0]))


# ----------------------------------------------------------------------------- 1. one image stream


def test_one_image_stream_per_stage_cuts_shards_as_results_arrive(ingested, run_cli, monkeypatch):
    from toolkit.embed import stage as embed_mod

    calls, loaders, saved = [], [], []
    inside = []
    real_encode, real_save = encode.encode_images, embed_mod._Shards.save

    def encode_images(*a, **k):
        calls.append(len(a[1]))
        inside.append(True)
        try:
            return real_encode(*a, **k)
        finally:
            inside.pop()

    class Loader(torch.utils.data.DataLoader):
        def __init__(self, *a, **k):
            loaders.append(k.get("num_workers"))
            super().__init__(*a, **k)

    def save(self, i, arr):
        saved.append((self.folder.name.split("-")[0], i, bool(inside)))
        return real_save(self, i, arr)

    monkeypatch.setattr(encode, "encode_images", encode_images)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    monkeypatch.setattr(embed_mod._Shards, "save", save)
    run_cli("--db", ingested, "embed", "--model", "tiny-clip", "--num-workers", "1", "--batch-size", 3)
    assert calls == [12]  # one stream over all 12 images (3 shards), not one per shard
    assert loaders == [1]  # workers started once
    image_saves = [s for s in saved if s[0] == "image"]
    assert [s[1] for s in image_saves] == [0, 1, 2] and all(s[2] for s in image_saves)  # saved mid-stream
    direct = encode.encode_images(models.load_model("tiny-clip", device="cpu"), image_paths(ingested), num_workers=0)
    np.testing.assert_allclose(array_of(ingested, "image"), direct, atol=1e-6)


def test_decode_workers_get_small_loader_batches_and_the_model_full_ones(tiny, ingested):
    paths = image_paths(ingested)
    assert encode.loader_batch_size(5000, 256, 15) == 64  # about 4 loader batches per worker, not 1.3
    assert encode.loader_batch_size(12, 8, 1) == 3 and encode.loader_batch_size(12, 8, 0) == 8
    seen = []
    emb = encode.encode_images(tiny, paths, batch_size=8, num_workers=1, on_batch=lambda r, f: seen.append(r.tolist()))
    assert seen == [list(range(8)), list(range(8, 12))]  # forward batches of exactly 8, in order
    np.testing.assert_allclose(emb, encode.encode_images(tiny, paths, batch_size=5, num_workers=0), atol=1e-6)


def test_a_corrupt_image_names_the_file_registers_nothing_and_keeps_complete_shards(ingested, run_cli):
    paths = image_paths(ingested)
    bad = Path(paths[9])  # in the third shard
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    res = run_cli("--db", ingested, "embed", *TINY, "--batch-size", 2, expect=2)
    assert bad.name in res.output and "Cannot decode" in res.output and "Traceback" not in res.output
    assert sets(ingested).empty and query(ingested, "SELECT * FROM runs WHERE stage = 'embed'").empty
    bad.write_bytes(good)
    out = run_cli("--db", ingested, "embed", *TINY, "--batch-size", 2).output
    assert "2 shard(s) reused" in out and len(sets(ingested)) == 2


# ----------------------------------------------------------------------------- 2. tokenize once


def test_each_caption_is_tokenized_once_and_truncation_counted_in_that_pass(ingested, run_cli, monkeypatch):
    from open_clip.tokenizer import SimpleTokenizer

    seen = []
    real = SimpleTokenizer.encode
    monkeypatch.setattr(SimpleTokenizer, "encode", lambda self, text: seen.append(text) or real(self, text))
    out = run_cli("--db", ingested, "embed", *TINY).output
    caps = captions(ingested)
    assert sorted(seen) == sorted(caps)  # once each (it was twice: to count truncation, then per shard)
    assert "captions truncated at 77 tokens: 0" in out


def test_parallel_tokenization_equals_open_clip_and_counts_truncation(tiny, monkeypatch):
    monkeypatch.setattr(encode, "TOKENIZE_CHUNK", 7)
    texts = [f"a photo of {i} red cars parked beside a house" for i in range(30)]
    texts[4] = "word " * 100  # truncated
    texts[22] = "another very " * 60
    serial = encode.tokenize(tiny, texts, processes=1)
    parallel = encode.tokenize(tiny, texts, processes=2)
    assert torch.equal(parallel.ids, tiny.tokenizer(texts)) and torch.equal(serial.ids, parallel.ids)
    assert parallel.n_truncated == serial.n_truncated == 2 and parallel.truncated.tolist() == [4, 22]
    assert encode.tokenize_processes(100) == 1  # below the threshold: no pool


# ----------------------------------------------------------------------------- 3. --decode gpu


def _photo(path, seed, size=(640, 480), **save):
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, **({"quality": 90} | save))
    return path


def test_gpu_decode_is_refused_clearly_without_cuda(ingested, run_cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = run_cli("--db", ingested, "embed", *TINY, "--decode", "gpu", expect=2)
    assert "--decode gpu" in res.output and "CUDA is not available" in res.output and "Traceback" not in res.output
    assert sets(ingested).empty and not (Path(ingested).parent / f"{Path(ingested).stem}_cache").exists()


def test_tensor_preprocess_matches_the_models_pil_preprocess(tiny, tmp_path):
    """The code `--decode gpu` runs on the GPU, run here on CPU tensors: torchvision's JPEG decoder,
    then the resize/crop/normalise of `preprocess_tensor`, against open_clip's PIL preprocess."""
    import open_clip
    from torchvision.io import ImageReadMode, decode_jpeg

    spec = encode.tensor_preprocess_spec(tiny.preprocess)
    assert spec == encode.TensorPreprocess(64, (64, 64), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    pre224 = open_clip.image_transform(224, is_train=False)
    spec224 = encode.tensor_preprocess_spec(pre224)
    sizes = [(640, 480), (480, 640), (333, 500), (200, 150), (640, 480)]  # landscape, portrait, odd, < 224
    paths = [_photo(tmp_path / f"p{i}.jpg", i, s) for i, s in enumerate(sizes)]
    for p in paths:
        raw = decode_jpeg(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        for sp, pre in ((spec, tiny.preprocess), (spec224, pre224)):
            mine, ref = encode.preprocess_tensor(raw, sp, "cpu"), pre(Image.open(p).convert("RGB"))
            assert mine.shape == ref.shape
            diff = ((mine - ref) * torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)).abs()
            assert diff.mean() < 0.01 and diff.max() < 0.1  # decoder and rounding noise, not a shifted picture
    one_by_one = torch.stack([encode.preprocess_tensor(encode_jpeg_cpu(p), spec, "cpu") for p in paths])
    gpu_like = encode.preprocess_tensors([encode_jpeg_cpu(p) for p in paths], spec, "cpu")  # 640x480 grouped
    torch.testing.assert_close(gpu_like, one_by_one, rtol=0, atol=1e-5)
    with torch.inference_mode():
        a = torch.nn.functional.normalize(tiny.model.encode_image(gpu_like), dim=-1)
    b = torch.from_numpy(encode.encode_images(tiny, paths, num_workers=0))
    assert (a * b).sum(1).min() > 0.999
    # a preprocess the tensor path cannot reproduce is not silently approximated
    from torchvision import transforms as T

    assert encode.tensor_preprocess_spec(T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR)])) is None


def encode_jpeg_cpu(path):
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)


def test_gpu_path_falls_back_to_pil_for_what_nvjpeg_should_not_decode(tiny, tmp_path):
    base = _photo(tmp_path / "base.jpg", 1, (160, 120))
    files = {
        "baseline.jpg": base,
        "progressive.jpg": _photo(tmp_path / "progressive.jpg", 2, (160, 120), progressive=True),
        "picture.png": _photo(tmp_path / "picture.png", 3, (160, 120)),
        "grey.jpg": tmp_path / "grey.jpg",
        "cmyk.jpg": tmp_path / "cmyk.jpg",
    }
    Image.open(base).convert("L").save(files["grey.jpg"], quality=90)
    Image.open(base).convert("CMYK").save(files["cmyk.jpg"], quality=90)
    decodable = {name: encode.gpu_decodable(Path(p).read_bytes()) for name, p in files.items()}
    assert decodable == {"baseline.jpg": True, "progressive.jpg": False, "picture.png": False, "grey.jpg": False,
                         "cmyk.jpg": False}  # fmt: skip
    paths = list(files.values())
    ds = encode.GpuJpegImages(paths, tiny.preprocess, tiny.image_size, encode.tensor_preprocess_spec(tiny.preprocess),
                              "cpu")  # fmt: skip
    x, idx, errs = ds.assemble([ds[i] for i in range(len(paths))])
    assert errs == [""] * 5 and idx.tolist() == list(range(5)) and ds.n_cpu == 4
    exact = torch.stack([tiny.preprocess(encode.open_rgb(p)) for p in paths])
    assert torch.equal(x[1:], exact[1:])  # the fallbacks are the exact CPU path
    assert (x[0] - exact[0]).abs().mean() < 0.05
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(base.read_bytes()[:300])  # a complete header, then cut: decoders may fill it in grey
    assert not encode.gpu_decodable(bad.read_bytes())  # so PIL gets it, and names the file
    _, _, errs = ds.assemble([encode.GpuJpegImages([bad], tiny.preprocess, tiny.image_size, ds.spec, "cpu")[0]])
    assert "bad.jpg" in errs[0]


def test_gpu_decoded_sets_have_their_own_identity(ingested, run_cli, monkeypatch):
    """`--decode gpu` end to end with the device check bypassed: the decoder then runs on the CPU."""
    run_cli("--db", ingested, "embed", *TINY)
    monkeypatch.setattr(encode, "check_decode", lambda *a, **k: None)
    out = run_cli("--db", ingested, "embed", *TINY, "--decode", "gpu").output
    assert "GPU decode" in out and "image(s) were not baseline RGB JPEGs" in out  # the generated greyscale ones
    df = sets(ingested)
    assert sorted(df.kind) == ["image", "image", "text"]  # a new image set; the text set is reused
    gpu, cpu = array_of(ingested, "image", "gpu"), array_of(ingested, "image", "cpu")
    assert not np.array_equal(gpu, cpu) and (gpu * cpu).sum(1).min() > 0.999
    assert "Already embedded" in run_cli("--db", ingested, "embed", *TINY, "--decode", "gpu").output
    assert "Already embedded" in run_cli("--db", ingested, "embed", *TINY).output  # never mixed up


def test_gpu_decode_of_a_preprocess_it_cannot_reproduce_is_refused_before_any_shard(ingested, run_cli, monkeypatch):
    monkeypatch.setattr(encode, "check_decode", lambda *a, **k: None)
    monkeypatch.setattr(encode, "tensor_preprocess_spec", lambda pre: None)  # e.g. a squash or bilinear resize
    res = run_cli("--db", ingested, "embed", *TINY, "--decode", "gpu", expect=2)
    assert "--decode gpu cannot reproduce this model's preprocess" in res.output and "--decode cpu" in res.output
    assert sets(ingested).empty
    cache = Path(ingested).parent / f"{Path(ingested).stem}_cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- 4. a re-run loads nothing


NOOP = """
import sys
from click.testing import CliRunner
from cli import cli
r = CliRunner().invoke(cli, sys.argv[1:])
print(r.output)
print("LOADED", sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules))
sys.exit(r.exit_code)
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_a_rerun_with_nothing_to_compute_loads_no_model_and_no_torch(ingested, run_cli, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.pt"
    models.save_random_checkpoint(ckpt)
    args = ["--db", ingested, "embed", *TINY, "--checkpoint", ckpt]
    run_cli(*args)
    hashed = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was built"))
    assert "Already embedded" in run_cli(*args).output
    assert hashed == []  # the checkpoint's sum came from the cache folder's checkpoint-sha256.json
    os.utime(ckpt)  # touched: its sum is computed again (still the same weights, so still a no-op)
    assert "Already embedded" in run_cli(*args).output and hashed == ["tiny.pt"]
    proc = subprocess.run([sys.executable, "-c", NOOP, *map(str, args)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and "Already embedded" in proc.stdout, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout  # neither torch nor open_clip imported


# ----------------------------------------------------------------------------- 5. half precision


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_means_half_weights_throughout(precision):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    try:
        b = models.load_model("tiny-clip", device="cpu", precision=precision)
    except UserError as exc:  # pragma: no cover - a torch without CPU half kernels
        require_tool(f"{precision} kernels for the CPU", str(exc))
    matrices = {n: p.dtype for n, p in b.model.named_parameters() if p.ndim >= 2 and "embedding" not in n}
    assert set(matrices.values()) == {dtype}, matrices  # convolution, attention, MLP and projections
    assert b.input_dtype == dtype and b.model.transformer.get_cast_dtype() == dtype


# ----------------------------------------------------------------------------- faults: kill -9 and resume


KILLER = """
import os, signal, sys
import numpy as np
from toolkit.embed import stage as E, encode
E.SHARD_ROWS = {"image": 4, "text": 20}
point = sys.argv[1]
count = [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if point == "between-shards":
    real_save = E._Shards.save
    def save(self, i, arr):
        real_save(self, i, arr)
        if self.folder.name.startswith("image") and i == 1:
            die()
    E._Shards.save = save
elif point == "mid-shard-write":
    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(str(dst)) == "shard-000001.npy":
            die()
        return real_replace(src, dst)
    E.os.replace = replace
elif point == "image-stream":
    real_norm = encode._normalise
    def norm(x):
        count[0] += 1
        if count[0] == 5:  # the 5th image batch of 2: shards 0 and 1 are on disk, shard 2 is in flight
            die()
        return real_norm(x)
    encode._normalise = norm
elif point == "text":
    real_text = encode.encode_texts_with_info
    def text(*a, **k):
        count[0] += 1
        if count[0] == 2:
            die()
        return real_text(*a, **k)
    encode.encode_texts_with_info = text
from cli import cli
cli.main(sys.argv[2:], standalone_mode=True)
"""


@pytest.mark.parametrize(
    "point, reused",
    [("image-stream", 2), ("between-shards", 2), ("mid-shard-write", 1), ("text", 4)],
)
def test_kill_9_at_any_point_then_rerun_resumes_with_nothing_lost_or_duplicated(ingested, run_cli, point, reused):
    args = ["--db", ingested, "embed", *TINY, "--batch-size", 2]
    returncode, output = run_script_forked(KILLER, [point, *args])  # no fresh interpreter to import torch
    assert returncode == -signal.SIGKILL, output
    assert sets(ingested).empty and query(ingested, "SELECT * FROM runs WHERE stage = 'embed'").empty
    out = run_cli(*args).output
    assert f"{reused} shard(s) reused" in out
    df = sets(ingested)
    assert sorted(df.kind) == ["image", "text"]
    assert len(query(ingested, "SELECT * FROM runs WHERE stage = 'embed'")) == 1
    tiny = models.load_model("tiny-clip", device="cpu")
    np.testing.assert_allclose(array_of(ingested, "image"), encode.encode_images(tiny, image_paths(ingested),
                               num_workers=0), atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(array_of(ingested, "text"), encode.encode_texts(tiny, captions(ingested)), atol=1e-6)
    cache = Path(ingested).parent / f"{Path(ingested).stem}_cache" / "embeddings" / "s12"
    assert not list(cache.glob(".partial/*")) and len(list(cache.glob("*.npy"))) == 2  # no leftovers, no duplicates
