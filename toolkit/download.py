"""Download COCO 2017 val captions and images into the layout `ingest --coco-root` reads.

    DEST/annotations/captions_val2017.json     (from annotations_trainval2017.zip)
    DEST/val2017/000000xxxxxx.jpg              (from val2017.zip)
    DEST/zips/*.zip                            (the downloaded archives, kept so a re-run skips them)

Each archive is fetched from `<base_url>/<path>` into `DEST/zips/<name>.part`. An interrupted
download keeps its `.part` file and the next run asks the server for the rest with an HTTP
`Range` request (a server that ignores it sends the whole file again, which replaces the part).
A finished download is checked against the size the server announced (Content-Length or
Content-Range; the official files' known sizes when the server gives none), then every member's
CRC is checked with `zipfile.testzip`, and only then is the `.part` renamed to the `.zip`.

Extraction is safe: before anything is written, every member name is checked, and an archive
with an absolute path, a `..` component, a drive letter, a symlink or any name that would land
outside DEST is refused as a whole. Files are written through a temporary name and renamed, and
a file already there with the member's size is kept, so an interrupted extraction resumes too.
"""

from __future__ import annotations

import http.client
import os
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from toolkit.errors import UserError
from toolkit.progress import progress

DEFAULT_BASE_URL = "http://images.cocodataset.org"
TIMEOUT_S = 30
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteZip:
    name: str  # file name under DEST/zips/
    url_path: str  # path below the base URL
    known_size: int | None  # bytes of the official file, used only when the server announces no size
    extract: tuple[str, ...] | None  # member names to extract (None: every file member)


ANNOTATIONS = RemoteZip(
    "annotations_trainval2017.zip",
    "annotations/annotations_trainval2017.zip",
    252_907_541,
    ("annotations/captions_val2017.json",),
)
IMAGES = RemoteZip("val2017.zip", "zips/val2017.zip", 815_585_330, None)


@dataclass
class FileReport:
    name: str
    url: str
    size: int
    action: str  # 'downloaded' | 'resumed' | 'already there'
    n_extracted: int = 0
    n_kept: int = 0


@dataclass
class DownloadResult:
    dest: Path
    captions_json: Path
    images_dir: Path | None
    n_images: int
    files: list[FileReport] = field(default_factory=list)


def _url(base_url: str, remote: RemoteZip) -> str:
    return base_url.rstrip("/") + "/" + remote.url_path


def _network_error(url: str, exc: BaseException, part: Path, base_url: str) -> UserError:
    reason = getattr(exc, "reason", None) or exc
    kept = ""
    if part.exists() and part.stat().st_size:
        kept = (
            f" The {part.stat().st_size:,} bytes received so far are kept in {part}; the next run resumes from there."
        )
    hint = (
        "Check the network connection (and a proxy, if you use one: $http_proxy), or --base-url."
        if base_url.rstrip("/") != DEFAULT_BASE_URL
        else "Check the network connection (and a proxy, if you use one: $http_proxy)."
    )
    return UserError(
        f"Could not download {url}: {reason}.{kept} {hint} Then run the same command again. Without network "
        f"access here, download the file elsewhere and put it in {part.parent}/ under the name {part.name[:-5]}."
    )


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/1234" or "bytes */1234"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _fetch(url: str, part: Path, base_url: str, known_size: int | None) -> tuple[int, str]:
    """Download url into part, resuming what is there. Returns (total size, 'downloaded'|'resumed')."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "clipfail-download"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == have:  # the part is already complete
                return have, "resumed"
            part.unlink()  # the part is longer than the file: start again
            return _fetch(url, part, base_url, known_size)
        if exc.code == 404:
            raise UserError(
                f"{url} does not exist on the server (HTTP 404). Check --base-url: the file must be at "
                f"<base-url>/{url.split('/', 3)[-1]}."
            ) from None
        raise _network_error(url, exc, part, base_url) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _network_error(url, exc, part, base_url) from None

    with response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range") or ""
            if not content_range.startswith(f"bytes {have}-"):  # not the rest we asked for: start again
                response.close()
                part.unlink(missing_ok=True)
                return _fetch(url, part, base_url, known_size)
            total = _total_from_content_range(content_range)
            mode, start, action = "ab", have, "resumed"
        else:  # 200: the server sends the whole file (it ignored or did not get a Range)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode, start, action = "wb", 0, "downloaded"
        if total is None and base_url.rstrip("/") == DEFAULT_BASE_URL:
            total = known_size
        bar = progress(total=total, desc=part.name[:-5], unit="B")
        bar.unit_scale, bar.unit_divisor = True, 1024
        bar.update(start)
        written = start
        try:
            with open(part, mode) as fh:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:  # socket.timeout and IncompleteRead included
            raise _network_error(url, exc, part, base_url) from None
        finally:
            bar.close()
    if total is not None and written != total:
        if written < total:
            raise _network_error(
                url, ConnectionError(f"the connection closed after {written:,} of {total:,} bytes"), part, base_url
            )
        part.unlink()
        raise UserError(
            f"{url} sent {written:,} bytes but announced {total:,}; the download was discarded. Run the command "
            "again; if it happens again, the server or a proxy is altering the file."
        )
    return written, action


def _check_zip(path: Path, what: str) -> None:
    """Every member's CRC must match; a bad archive is deleted so that the next run downloads it again."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        path.unlink(missing_ok=True)
        raise UserError(f"{what} is not a valid zip archive ({exc}); it was deleted. Run the command again.") from None
    if bad is not None:
        path.unlink(missing_ok=True)
        raise UserError(
            f"{what} is corrupt: member {bad!r} fails its CRC check; it was deleted. Run the command again to "
            "download it afresh."
        )


def _safe_members(zf: zipfile.ZipFile, dest: Path, what: str) -> list[tuple[zipfile.ZipInfo, Path]]:
    """Map every file member to its path below dest; refuse the archive if any name is unsafe."""
    root = dest.resolve()
    out, bad = [], []
    for info in zf.infolist():
        name = info.filename
        mode = info.external_attr >> 16
        parts = PurePosixPath(name.replace("\\", "/")).parts
        reason = None
        if stat.S_ISLNK(mode):
            reason = "a symbolic link"
        elif name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            reason = "an absolute path"
        elif ".." in parts:
            reason = "a '..' component"
        elif not parts:
            reason = "an empty name"
        else:
            target = (root / Path(*parts)).resolve()
            if target != root and root not in target.parents:
                reason = "a path outside the destination"
        if reason:
            bad.append(f"{name!r} ({reason})")
        elif not info.is_dir():
            out.append((info, root / Path(*parts)))
    if bad:
        raise UserError(
            f"{what} has members that would be written outside {dest}: {', '.join(bad[:5])}"
            f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}. Nothing was extracted. Download the "
            "archive from a trusted source."
        )
    return out


def _extract(zip_path: Path, dest: Path, wanted: tuple[str, ...] | None, what: str) -> tuple[int, int]:
    """Extract (all, or the wanted) members safely. Returns (extracted, kept as they were)."""
    n_new = n_kept = 0
    with zipfile.ZipFile(zip_path) as zf:
        members = _safe_members(zf, dest, what)
        if wanted is not None:
            names = {info.filename for info, _ in members}
            missing = [w for w in wanted if w not in names]
            if missing:
                raise UserError(
                    f"{what} does not contain {', '.join(missing)}. Is it the COCO 2017 annotations archive?"
                )
            members = [(info, target) for info, target in members if info.filename in wanted]
        for info, target in progress(members, desc=f"extract {zip_path.name}", unit="file"):
            if target.is_file() and target.stat().st_size == info.file_size:
                n_kept += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".extracting")
            with zf.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, target)
            n_new += 1
    return n_new, n_kept


def _get(remote: RemoteZip, dest: Path, base_url: str) -> tuple[Path, FileReport]:
    zips = dest / "zips"
    zips.mkdir(parents=True, exist_ok=True)
    final = zips / remote.name
    url = _url(base_url, remote)
    if final.exists():
        _check_zip(final, str(final))
        return final, FileReport(remote.name, url, final.stat().st_size, "already there")
    part = zips / (remote.name + ".part")
    size, action = _fetch(url, part, base_url, remote.known_size)
    _check_zip(part, f"The download of {url}")
    os.replace(part, final)
    return final, FileReport(remote.name, url, size, action)


def download_coco(dest, base_url: str = DEFAULT_BASE_URL, images: bool = True) -> DownloadResult:
    """Download and safely extract COCO 2017 val captions (and, with images=True, the val images)."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the destination folder {dest}: {exc}") from None
    if not base_url.startswith(("http://", "https://")):
        raise UserError(f"--base-url must start with http:// or https:// (got {base_url!r}).")
    reports = []
    for remote in [ANNOTATIONS] + ([IMAGES] if images else []):
        path, report = _get(remote, dest, base_url)
        report.n_extracted, report.n_kept = _extract(path, dest, remote.extract, str(path))
        reports.append(report)
    images_dir = dest / "val2017"
    n_images = sum(1 for p in images_dir.iterdir() if p.is_file()) if images and images_dir.is_dir() else 0
    if images and not n_images:
        raise UserError(f"{IMAGES.name} held no files under val2017/. Is it the COCO 2017 val images archive?")
    return DownloadResult(
        dest=dest,
        captions_json=dest / "annotations" / "captions_val2017.json",
        images_dir=images_dir if images else None,
        n_images=n_images,
        files=reports,
    )
