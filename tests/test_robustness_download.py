"""download-coco against crafted archives (issue 11, findings 10-13), served from 127.0.0.1.

Like tests/test_download.py, a small HTTP server in a daemon thread serves generated COCO zips
(Range requests answered with 206 + Content-Range); it can also be told to answer every request
with a 206 for the wrong range. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

import pytest

from toolkit.errors import UserError
from toolkit.ingest.download import ExtractLimits, copy_limited, download_coco

ANN_ZIP = "annotations_trainval2017.zip"
IMG_ZIP = "val2017.zip"


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if srv.wrong_206:  # a broken server: always a 206, always starting at byte 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 1-{len(data) - 1}/{len(data)}")
            body = data[1:]
        elif rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.requests, httpd.wrong_206 = root, [], False
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _ann_members(coco: Path) -> dict[str, bytes]:
    return {
        "annotations/": b"",
        "annotations/captions_val2017.json": (coco / "annotations" / "captions_val2017.json").read_bytes(),
        "annotations/instances_val2017.json": b'{"instances": true}',
        "annotations/person_keypoints_val2017.json": b"{}",
    }


def _img_members(coco: Path) -> dict[str, bytes]:
    out = {"val2017/": b""}
    for p in sorted((coco / "val2017").iterdir()):
        out[f"val2017/{p.name}"] = p.read_bytes()
    return out


def _serve(server, ann: dict[str, bytes] | None = None, img: dict[str, bytes] | None = None, **kw) -> None:
    if ann is not None:
        _write_zip(server.root / "annotations" / ANN_ZIP, ann, **kw)
    if img is not None:
        _write_zip(server.root / "zips" / IMG_ZIP, img, **kw)


@pytest.fixture
def coco_served(server, synthetic_coco):
    _serve(server, _ann_members(synthetic_coco), _img_members(synthetic_coco))
    return server


def _dl(run_cli, dest, server, *extra, expect=0):
    res = run_cli("download-coco", "--dest", dest, "--base-url", server.base_url, *extra, expect=expect)
    assert "Traceback" not in res.output
    return res


# --- 10: only the members that belong are extracted; a different existing file is never replaced ---


def test_images_zip_cannot_overwrite_the_database_the_captions_or_the_other_zip(
    server, synthetic_coco, tmp_path, run_cli
):
    ann = _ann_members(synthetic_coco)
    img = _img_members(synthetic_coco)
    img.update(
        {
            "study.duckdb": b"crafted database",
            "annotations/captions_val2017.json": b'{"images": [], "annotations": []}',
            "zips/annotations_trainval2017.zip": b"crafted zip",
            "val2017/notes.txt": b"not an image",
            "val2017/sub/000000000001.jpg": b"nested",
        }
    )
    _serve(server, ann, img)
    dest = tmp_path / "coco_dl"
    dest.mkdir()
    (dest / "study.duckdb").write_bytes(b"the real study")
    res = _dl(run_cli, dest, server)
    assert (dest / "study.duckdb").read_bytes() == b"the real study"
    assert (dest / "annotations" / "captions_val2017.json").read_bytes() == ann["annotations/captions_val2017.json"]
    assert (dest / "annotations" / "instances_val2017.json").read_bytes() == b'{"instances": true}'
    assert not (dest / "annotations" / "person_keypoints_val2017.json").exists()
    assert (dest / "zips" / ANN_ZIP).read_bytes() == (server.root / "annotations" / ANN_ZIP).read_bytes()
    assert not (dest / "val2017" / "notes.txt").exists() and not (dest / "val2017" / "sub").exists()
    assert sorted(p.name for p in (dest / "val2017").iterdir()) == sorted(
        p.name for p in (synthetic_coco / "val2017").iterdir()
    )
    assert "val2017.zip: downloaded" in res.output and "skipped 5 members" in res.output
    assert "skipped 1 member" in res.output  # person_keypoints in the annotations zip


@pytest.mark.parametrize("same_size", [False, True])
def test_an_existing_different_file_is_refused_not_replaced(coco_served, synthetic_coco, tmp_path, run_cli, same_size):
    dest = tmp_path / "coco_dl"
    name = sorted(p.name for p in (synthetic_coco / "val2017").iterdir())[3]
    real = (synthetic_coco / "val2017" / name).read_bytes()
    mine = bytes(b ^ 0x01 for b in real) if same_size else b"my own edited image"
    (dest / "val2017").mkdir(parents=True)
    (dest / "val2017" / name).write_bytes(mine)
    res = _dl(run_cli, dest, coco_served, expect=2)
    assert str(dest / "val2017" / name) in res.output and "different content" in res.output
    assert "Nothing was extracted" in res.output
    assert (dest / "val2017" / name).read_bytes() == mine
    assert [p.name for p in (dest / "val2017").iterdir()] == [name]
    assert (dest / "zips" / IMG_ZIP).is_file()  # the archive itself is fine and kept


# --- 11: size and compression-ratio limits ---


def test_zip_bomb_is_refused_before_anything_is_written(server, synthetic_coco, tmp_path, run_cli):
    img = {"val2017/": b"", "val2017/000000000001.jpg": b"\0" * (20 << 20)}  # 20 MiB of zeros: ~20 KB deflated
    _serve(server, _ann_members(synthetic_coco), img, compression=zipfile.ZIP_DEFLATED)
    assert (server.root / "zips" / IMG_ZIP).stat().st_size < 200_000
    dest = tmp_path / "coco_dl"
    res = _dl(run_cli, dest, server, expect=2)
    assert "compression ratio" in res.output and "000000000001.jpg" in res.output
    assert not (dest / "val2017").exists() or not list((dest / "val2017").iterdir())
    rejected = dest / "zips" / (IMG_ZIP + ".rejected")
    assert rejected.is_file() and not (dest / "zips" / IMG_ZIP).exists()
    assert str(rejected) in res.output


def test_an_inflated_compressed_size_does_not_hide_a_zip_bomb(server, synthetic_coco, tmp_path, run_cli):
    img = {"val2017/": b"", "val2017/000000000001.jpg": b"\0" * (20 << 20)}
    _serve(server, _ann_members(synthetic_coco), img, compression=zipfile.ZIP_DEFLATED)
    path = server.root / "zips" / IMG_ZIP
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)  # central directory entry of member 1
    assert data[pos + 46 : pos + 46 + 24] == b"val2017/000000000001.jpg"
    data[pos + 20 : pos + 24] = (10 << 20).to_bytes(4, "little")  # claims 10 MiB compressed: a 2:1 ratio
    path.write_bytes(bytes(data))
    dest = tmp_path / "coco_dl"
    res = _dl(run_cli, dest, server, expect=2)
    assert "compressed bytes, more than the archive's" in res.output
    assert not (dest / "val2017").exists() or not list((dest / "val2017").iterdir())


def test_declared_sizes_over_the_limits_are_refused(coco_served, synthetic_coco, tmp_path):
    sizes = [p.stat().st_size for p in (synthetic_coco / "val2017").iterdir()]
    small_member = ExtractLimits(max_member_bytes=min(sizes) - 1, max_total_bytes=10**9, max_files=100)
    with pytest.raises(UserError, match="declares .* bytes, more than the limit"):
        download_coco(tmp_path / "a", base_url=coco_served.base_url, limits={IMG_ZIP: small_member})
    assert not (tmp_path / "a" / "val2017").exists() or not list((tmp_path / "a" / "val2017").iterdir())

    small_total = ExtractLimits(max_member_bytes=10**9, max_total_bytes=sum(sizes) // 2, max_files=100)
    with pytest.raises(UserError, match="in all, more than the limit"):
        download_coco(tmp_path / "b", base_url=coco_served.base_url, limits={IMG_ZIP: small_total})

    few_files = ExtractLimits(max_member_bytes=10**9, max_total_bytes=10**9, max_files=len(sizes) - 1)
    with pytest.raises(UserError, match="more than the limit of"):
        download_coco(tmp_path / "c", base_url=coco_served.base_url, limits={IMG_ZIP: few_files})

    # within the limits: fine
    ok = ExtractLimits(max_member_bytes=max(sizes), max_total_bytes=sum(sizes), max_files=len(sizes))
    res = download_coco(tmp_path / "d", base_url=coco_served.base_url, limits={IMG_ZIP: ok})
    assert res.n_images == len(sizes)


def test_actual_bytes_beyond_the_declared_size_stop_the_copy():
    out = io.BytesIO()
    with pytest.raises(UserError, match="more bytes than the 1,000 it declares"):
        copy_limited(io.BytesIO(b"x" * 5000), out, declared=1000, limit=10_000, what="m")
    assert len(out.getvalue()) <= 1000 + (1 << 20)  # stopped within one chunk of the declared size
    with pytest.raises(UserError, match="fewer bytes"):
        copy_limited(io.BytesIO(b"x" * 10), io.BytesIO(), declared=1000, limit=10_000, what="m")
    assert copy_limited(io.BytesIO(b"x" * 1000), io.BytesIO(), declared=1000, limit=10_000, what="m") == 1000


def test_a_header_that_understates_the_size_is_refused_cleanly(server, synthetic_coco, tmp_path, run_cli):
    img = _img_members(synthetic_coco)
    _serve(server, _ann_members(synthetic_coco), img)
    path = server.root / "zips" / IMG_ZIP
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[3]
    # the central directory entry of member 3: patch its uncompressed size (offset 24) down to 100 bytes
    pos = data.find(b"PK\x01\x02")
    for _ in range(3):
        pos = data.find(b"PK\x01\x02", pos + 4)
    assert data[pos + 46 : pos + 46 + len(info.filename)] == info.filename.encode()
    data[pos + 24 : pos + 28] = (100).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    dest = tmp_path / "coco_dl"
    res = _dl(run_cli, dest, server, expect=2)
    assert info.filename in res.output and "will be downloaded afresh" in res.output
    assert not (dest / "zips" / IMG_ZIP).exists() and not (dest / "zips" / (IMG_ZIP + ".part")).exists()
    assert not (dest / "val2017").exists() or not list((dest / "val2017").iterdir())


# --- 12: planted symlinks are never followed ---


def test_planted_extracting_symlinks_are_not_followed(coco_served, synthetic_coco, tmp_path, run_cli):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "coco_dl"
    (dest / "val2017").mkdir(parents=True)
    (dest / "annotations").mkdir()
    names = sorted(p.name for p in (synthetic_coco / "val2017").iterdir())
    for name in names:
        (dest / "val2017" / f"{name}.extracting").symlink_to(victim)
    (dest / "annotations" / "captions_val2017.json.extracting").symlink_to(victim)
    res = _dl(run_cli, dest, coco_served)
    assert victim.read_bytes() == b"precious" and "(40 files)" in res.output
    for name in names:
        target = dest / "val2017" / name
        assert not target.is_symlink() and target.read_bytes() == (synthetic_coco / "val2017" / name).read_bytes()
    captions = dest / "annotations" / "captions_val2017.json"
    assert not captions.is_symlink()
    assert captions.read_bytes() == (synthetic_coco / "annotations" / "captions_val2017.json").read_bytes()


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlinked_part_file_is_refused(coco_served, tmp_path, run_cli, dangling):
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_bytes(b"precious")
    dest = tmp_path / "coco_dl"
    (dest / "zips").mkdir(parents=True)
    part = dest / "zips" / (ANN_ZIP + ".part")
    part.symlink_to(victim)
    res = _dl(run_cli, dest, coco_served, "--no-images", expect=2)
    assert "symbolic link" in res.output and str(part) in res.output and "delete it" in res.output
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_bytes() == b"precious"
    assert coco_served.requests == []


# --- 13: damaged members, broken servers, refused archives, a symlinked val2017 ---


def _damage_first_member(path: Path, index: int) -> str:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[index]
    data[info.header_offset + 30 + len(info.filename)] = 0xFF  # deflate block type 11: invalid
    path.write_bytes(bytes(data))
    return info.filename


def test_a_damaged_member_is_a_message_and_the_archive_is_downloaded_again(server, synthetic_coco, tmp_path, run_cli):
    _serve(server, _ann_members(synthetic_coco), _img_members(synthetic_coco), compression=zipfile.ZIP_DEFLATED)
    bad = _damage_first_member(server.root / "zips" / IMG_ZIP, 4)
    dest = tmp_path / "coco_dl"
    res = _dl(run_cli, dest, server, expect=2)
    assert bad in res.output and "damaged" in res.output and "will be downloaded afresh" in res.output
    assert not (dest / "zips" / IMG_ZIP).exists() and not (dest / "zips" / (IMG_ZIP + ".part")).exists()
    n = len(server.requests)
    _dl(run_cli, dest, server, expect=2)  # the server still sends the damaged file: downloaded again, not re-checked
    assert server.requests[n:] == [("/zips/val2017.zip", None)]

    # a damaged archive put in zips/ by hand is also removed, with the same message
    good = dest / "zips" / IMG_ZIP
    good.write_bytes((server.root / "zips" / IMG_ZIP).read_bytes())
    res = download_coco_expect_error(dest, server)
    assert "damaged" in res and str(good) in res and not good.exists()


def download_coco_expect_error(dest, server) -> str:
    with pytest.raises(UserError) as exc:
        download_coco(dest, base_url=server.base_url)
    return str(exc.value)


@pytest.mark.parametrize("with_part", [False, True])
def test_a_server_that_always_answers_the_wrong_range_gives_up_after_a_few_tries(
    coco_served, tmp_path, run_cli, with_part
):
    dest = tmp_path / "coco_dl"
    if with_part:
        (dest / "zips").mkdir(parents=True)
        full = (coco_served.root / "annotations" / ANN_ZIP).read_bytes()
        (dest / "zips" / (ANN_ZIP + ".part")).write_bytes(full[:1000])
    coco_served.wrong_206 = True
    res = _dl(run_cli, dest, coco_served, "--no-images", expect=2)
    assert "wrong byte range" in res.output and "--base-url" in res.output
    assert 2 <= len(coco_served.requests) <= 4
    assert not (dest / "zips" / (ANN_ZIP + ".part")).exists() and not (dest / "zips" / ANN_ZIP).exists()


def test_a_refused_archive_is_set_aside_and_a_good_one_is_fetched_next_time(server, synthetic_coco, tmp_path, run_cli):
    evil = _ann_members(synthetic_coco)
    evil["../evil"] = b"pwned"
    _serve(server, evil)
    dest = tmp_path / "coco_dl"
    res = _dl(run_cli, dest, server, "--no-images", expect=2)
    rejected = dest / "zips" / (ANN_ZIP + ".rejected")
    assert "a '..' component" in res.output and str(rejected) in res.output and "delete it" in res.output
    assert rejected.is_file() and not (dest / "zips" / ANN_ZIP).exists()
    _serve(server, _ann_members(synthetic_coco))  # the mirror is fixed
    res = _dl(run_cli, dest, server, "--no-images")
    assert f"{ANN_ZIP}: downloaded" in res.output
    assert (dest / "annotations" / "captions_val2017.json").is_file()


def test_symlinked_val2017_and_annotations_folders_are_used(coco_served, synthetic_coco, tmp_path, run_cli):
    elsewhere = tmp_path / "big_disk"
    (elsewhere / "val2017").mkdir(parents=True)
    (elsewhere / "annotations").mkdir()
    dest = tmp_path / "coco_dl"
    dest.mkdir()
    (dest / "val2017").symlink_to(elsewhere / "val2017")
    (dest / "annotations").symlink_to(elsewhere / "annotations")
    res = _dl(run_cli, dest, coco_served)
    assert "(40 files)" in res.output
    names = sorted(p.name for p in (synthetic_coco / "val2017").iterdir())
    assert sorted(p.name for p in (elsewhere / "val2017").iterdir()) == names
    assert (elsewhere / "annotations" / "captions_val2017.json").is_file()
    assert (dest / "val2017").is_symlink() and (dest / "annotations").is_symlink()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".extracting")]
    assert os.path.realpath(dest / "val2017" / names[0]) == str((elsewhere / "val2017" / names[0]).resolve())
