"""download-coco against a local HTTP server on 127.0.0.1 serving generated COCO zips.

The server honours Range requests (206 + Content-Range), logs every request, and can be told
to drop the connection after a number of bytes or to ignore Range. It runs in a daemon thread
and is shut down by the fixture; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from toolkit.errors import UserError
from toolkit.ingest.download import download_coco


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
