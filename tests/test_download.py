"""download-coco against a local HTTP server on 127.0.0.1 serving generated COCO zips.

The server honours Range requests (206 + Content-Range), logs every request, and can be told
to drop the connection after a number of bytes or to ignore Range. It runs in a daemon thread
and is shut down by the fixture; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from toolkit.errors import UserError
from toolkit.ingest.download import ExtractLimits, copy_limited, download_coco


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
        if srv.wrong_206:  # a broken server: always a 206, always starting at byte 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 1-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - 1))
            self.end_headers()
            self.wfile.write(data[1:])
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = 0 if srv.wrong_range else int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drop_after is not None:
            self.wfile.write(body[: srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.requests, httpd.ignore_range, httpd.drop_after = root, [], False, None
    httpd.wrong_range = False  # answer a Range request with 206 for the whole file (a broken server)
    httpd.wrong_206 = False  # answer every request with a 206 for bytes 1- (a broken server)
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


def _zip_dir(zip_path: Path, src_root: Path, subdir: str, extra: dict[str, bytes] | None = None) -> None:
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(subdir + "/", b"")  # a directory entry, as in the real archives
        for p in sorted((src_root / subdir).iterdir()):
            zf.write(p, f"{subdir}/{p.name}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


@pytest.fixture
def served_coco(server, synthetic_coco):
    """The generated dataset packed as COCO's two archives, under the server's root."""
    www = server.root
    # make-synthetic-coco writes instances_val2017.json beside the captions, as in COCO's archive
    _zip_dir(www / "annotations" / "annotations_trainval2017.zip", synthetic_coco, "annotations")
    _zip_dir(www / "zips" / "val2017.zip", synthetic_coco, "val2017")
    return server


def test_download_extract_then_ingest(served_coco, synthetic_coco, tmp_path, run_cli, tmp_db):
    dest = tmp_path / "coco_dl"
    res = run_cli("download-coco", "--dest", dest, "--base-url", served_coco.base_url)
    assert "Next: clipfail ingest" in res.output
    assert (dest / "annotations" / "captions_val2017.json").read_bytes() == (
        synthetic_coco / "annotations" / "captions_val2017.json"
    ).read_bytes()
    assert (dest / "annotations" / "instances_val2017.json").read_bytes() == (
        synthetic_coco / "annotations" / "instances_val2017.json"
    ).read_bytes()  # extracted when present
    src = sorted(p.name for p in (synthetic_coco / "val2017").iterdir())
    assert sorted(p.name for p in (dest / "val2017").iterdir()) == src
    assert not list(dest.rglob("*.part")) and not list(dest.rglob("*.extracting"))

    n_requests = len(served_coco.requests)
    again = download_coco(dest, base_url=served_coco.base_url)
    assert len(served_coco.requests) == n_requests  # nothing fetched again
    assert [f.action for f in again.files] == ["already there", "already there"]
    assert [f.n_extracted for f in again.files] == [0, 0]

    run_cli("--db", tmp_db, "ingest", "--coco-root", dest, "--num-images", 30)
    import duckdb

    con = duckdb.connect(tmp_db, read_only=True)
    assert con.execute("SELECT num_images FROM subsets").fetchone()[0] == 30
    con.close()


def test_resume_from_truncated_part(served_coco, tmp_path):
    dest = tmp_path / "coco_dl"
    full = (served_coco.root / "zips" / "val2017.zip").read_bytes()
    (dest / "zips").mkdir(parents=True)
    (dest / "zips" / "val2017.zip.part").write_bytes(full[: len(full) // 2])
    res = download_coco(dest, base_url=served_coco.base_url)
    assert {f.name: f.action for f in res.files} == {
        "annotations_trainval2017.zip": "downloaded",
        "val2017.zip": "resumed",
    }
    assert ("/zips/val2017.zip", f"bytes={len(full) // 2}-") in served_coco.requests
    assert (dest / "zips" / "val2017.zip").read_bytes() == full
    assert res.n_images == 40


def test_dropped_connection_keeps_part_and_next_run_resumes(served_coco, tmp_path, run_cli):
    dest = tmp_path / "coco_dl"
    served_coco.drop_after = 3000
    res = run_cli("download-coco", "--dest", dest, "--base-url", served_coco.base_url, "--no-images", expect=2)
    assert "Traceback" not in res.output
    assert "the connection closed after 3,000 of" in res.output and "run the same command again" in res.output
    part = dest / "zips" / "annotations_trainval2017.zip.part"
    assert part.stat().st_size == 3000
    served_coco.drop_after = None
    res = download_coco(dest, base_url=served_coco.base_url, images=False)
    assert res.files[0].action == "resumed" and res.images_dir is None
    assert served_coco.requests[-1][1] == "bytes=3000-"
    assert (dest / "annotations" / "captions_val2017.json").is_file()


def test_server_ignoring_range_restarts_cleanly(served_coco, tmp_path):
    dest = tmp_path / "coco_dl"
    (dest / "zips").mkdir(parents=True)
    (dest / "zips" / "annotations_trainval2017.zip.part").write_bytes(b"garbage that is not the file")
    served_coco.ignore_range = True
    res = download_coco(dest, base_url=served_coco.base_url, images=False)
    assert res.files[0].action == "downloaded"
    assert (dest / "zips" / "annotations_trainval2017.zip").read_bytes() == (
        served_coco.root / "annotations" / "annotations_trainval2017.zip"
    ).read_bytes()


def test_a_206_for_the_wrong_range_restarts_instead_of_appending(served_coco, tmp_path):
    dest = tmp_path / "coco_dl"
    full = (served_coco.root / "annotations" / "annotations_trainval2017.zip").read_bytes()
    (dest / "zips").mkdir(parents=True)
    (dest / "zips" / "annotations_trainval2017.zip.part").write_bytes(full[:1000])
    served_coco.wrong_range = True
    res = download_coco(dest, base_url=served_coco.base_url, images=False)
    assert res.files[0].action == "downloaded"
    assert [r[1] for r in served_coco.requests] == ["bytes=1000-", None]
    assert (dest / "zips" / "annotations_trainval2017.zip").read_bytes() == full


def _evil_zip(path: Path, name: str, symlink: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("annotations/captions_val2017.json", json.dumps({"images": [], "annotations": []}))
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, b"pwned")


@pytest.mark.parametrize(
    "name,symlink,reason",
    [
        ("../evil", False, "a '..' component"),
        ("annotations/../../evil", False, "a '..' component"),
        ("/tmp/evil_abs", False, "an absolute path"),
        ("annotations/link", True, "a symbolic link"),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(server, tmp_path, run_cli, name, symlink, reason):
    _evil_zip(server.root / "annotations" / "annotations_trainval2017.zip", name, symlink)
    dest = tmp_path / "d" / "coco_dl"
    res = run_cli("download-coco", "--dest", dest, "--base-url", server.base_url, "--no-images", expect=2)
    assert reason in res.output and "Nothing was extracted" in res.output
    assert "Traceback" not in res.output
    assert not (dest / "annotations").exists()
    assert not (tmp_path / "d" / "evil").exists() and not Path("/tmp/evil_abs").exists()


def test_corrupt_zip_is_refused_and_deleted(served_coco, tmp_path, run_cli):
    zpath = served_coco.root / "zips" / "val2017.zip"
    data = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as zf:
        info = zf.infolist()[5]
    mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2  # inside the member's data
    data[mid] ^= 0xFF
    zpath.write_bytes(bytes(data))
    dest = tmp_path / "coco_dl"
    res = run_cli("download-coco", "--dest", dest, "--base-url", served_coco.base_url, expect=2)
    assert "fails its CRC check" in res.output and info.filename in res.output
    assert not (dest / "zips" / "val2017.zip").exists() and not (dest / "zips" / "val2017.zip.part").exists()
    assert not (dest / "val2017").exists()


def test_not_a_zip_is_refused(server, tmp_path):
    (server.root / "annotations").mkdir()
    (server.root / "annotations" / "annotations_trainval2017.zip").write_bytes(b"<html>captive portal</html>")
    with pytest.raises(UserError, match="not a valid zip archive"):
        download_coco(tmp_path / "d", base_url=server.base_url, images=False)


def test_network_errors_are_user_errors(server, tmp_path, run_cli):
    res = run_cli("download-coco", "--dest", tmp_path / "d", "--base-url", server.base_url, expect=2)
    assert "HTTP 404" in res.output and "--base-url" in res.output
    # a port nobody listens on: refused at once
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = run_cli("download-coco", "--dest", tmp_path / "d", "--base-url", f"http://127.0.0.1:{port}", expect=2)
    assert "Could not download" in res.output and "Connection refused" in res.output
    assert "Traceback" not in res.output
    res = run_cli("download-coco", "--dest", tmp_path / "d", "--base-url", "ftp://x", expect=2)
    assert "must start with http://" in res.output


# ------------------------------------------------------------------ crafted archives (issue 11, findings 10-13)
# The server can also be told to answer every request with a 206 for the wrong range (wrong_206).

ANN_ZIP = "annotations_trainval2017.zip"
IMG_ZIP = "val2017.zip"


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


# ------------------------------------------------------------------ --year 2014: COCO 2014 val, for the 5k test


@pytest.fixture
def coco2014_served(server, tmp_path):
    """COCO 2014's two archives, generated: captions_val2014.json holds the whole 5k test by the eccv_caption
    package's real ids; val2014.zip holds images of a few of them, and members that do not belong."""
    from helpers import eccv_slice, write_coco5k_coco

    src = write_coco5k_coco(tmp_path / "src2014", "2014", with_images=eccv_slice())
    ann = {
        "annotations/": b"",
        "annotations/captions_val2014.json": (src / "annotations" / "captions_val2014.json").read_bytes(),
        "annotations/captions_train2014.json": b'{"images": [], "annotations": []}',  # not needed: skipped
        "annotations/captions_val2017.json": b"{}",  # another year's: skipped
    }
    img = {"val2014/": b""} | {f"val2014/{p.name}": p.read_bytes() for p in sorted((src / "val2014").iterdir())}
    img["val2017/000000000042.jpg"] = b"another year's image"  # skipped
    _write_zip(server.root / "annotations" / "annotations_trainval2014.zip", ann, zipfile.ZIP_DEFLATED)
    _write_zip(server.root / "zips" / "val2014.zip", img)
    server.src = src
    return server


def test_year_2014_downloads_val2014_then_the_5k_test_ingests_and_joins_eccv(coco2014_served, tmp_path, run_cli):
    from helpers import eccv_slice

    dest = tmp_path / "coco2014"
    res = _dl(run_cli, dest, coco2014_served, "--year", "2014")
    assert [r[0] for r in coco2014_served.requests] == [
        "/annotations/annotations_trainval2014.zip",
        "/zips/val2014.zip",
    ]
    assert f"Next: clipfail ingest --coco5k-test --coco-root {dest}" in res.output
    assert "skipped 2 members" in res.output and "skipped 1 member " in res.output
    assert sorted(p.name for p in (dest / "annotations").iterdir()) == ["captions_val2014.json"]
    src = coco2014_served.src
    assert (dest / "annotations" / "captions_val2014.json").read_bytes() == (
        src / "annotations" / "captions_val2014.json"
    ).read_bytes()
    assert sorted(p.name for p in (dest / "val2014").iterdir()) == sorted(p.name for p in (src / "val2014").iterdir())
    assert not (dest / "val2017").exists()

    db = tmp_path / "study.duckdb"
    run_cli("--db", db, "ingest", "--coco5k-test", "--coco-root", dest, "--skip-bad-images")
    n = len(eccv_slice())
    res = run_cli("--db", db, "positives", "import", "--source", "eccv")
    assert f"COCO 5k test: {5 * n} of the subset's {5 * n} captions and {n} of its {n} images are in it" in res.output


def test_year_2014_resumes_and_refuses_as_2017_does(coco2014_served, server, synthetic_coco, tmp_path, run_cli):
    dest = tmp_path / "coco2014"
    full = (server.root / "zips" / "val2014.zip").read_bytes()
    (dest / "zips").mkdir(parents=True)
    (dest / "zips" / "val2014.zip.part").write_bytes(full[: len(full) // 2])
    res = download_coco(dest, base_url=server.base_url, year="2014")
    assert {f.name: f.action for f in res.files} == {
        "annotations_trainval2014.zip": "downloaded",
        "val2014.zip": "resumed",
    }
    assert (dest / "zips" / "val2014.zip").read_bytes() == full and res.n_images == len(
        list((dest / "val2014").iterdir())
    )

    # the images archive's limits are 2014's own, and can be given by its name
    few = ExtractLimits(max_member_bytes=10**9, max_total_bytes=10**9, max_files=0)
    with pytest.raises(UserError, match="more than the limit of 0"):
        download_coco(tmp_path / "d", base_url=coco2014_served.base_url, year="2014", limits={"val2014.zip": few})
    # 2017's annotations archive under 2014's name: it lacks captions_val2014.json, and is set aside
    _write_zip(server.root / "annotations" / "annotations_trainval2014.zip", _ann_members(synthetic_coco))
    res = _dl(run_cli, tmp_path / "b", server, "--year", "2014", "--no-images", expect=2)
    assert "does not contain annotations/captions_val2014.json. Is it the COCO 2014 annotations archive?" in res.output
    assert (tmp_path / "b" / "zips" / "annotations_trainval2014.zip.rejected").is_file()
    # an unsafe member in val2014.zip: refused whole, nothing extracted
    _write_zip(
        server.root / "annotations" / "annotations_trainval2014.zip", {"annotations/captions_val2014.json": b"{}"}
    )
    _write_zip(server.root / "zips" / "val2014.zip", {"val2014/COCO_val2014_000000000042.jpg": b"x", "../evil": b"x"})
    res = _dl(run_cli, tmp_path / "c", server, "--year", "2014", expect=2)
    assert "a '..' component" in res.output and not list((tmp_path / "c" / "val2014").glob("*"))


def test_the_2014_limits_fit_the_official_archive():
    from toolkit.ingest.download import YEARS

    annotations, images = YEARS["2014"]
    assert images.name == "val2014.zip" and images.folder == "val2014" and images.known_size == 6_645_013_297
    assert images.limits.max_files >= 40_504 and images.limits.max_total_bytes >= images.known_size
    assert annotations.name == "annotations_trainval2014.zip" and annotations.members[0] == (
        "annotations/captions_val2014.json",
        True,
    )
    with pytest.raises(UserError, match="--year must be one of 2014, 2017"):
        download_coco("/nonexistent/never", year="2015")
