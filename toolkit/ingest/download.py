"""Download COCO val captions and images into the layout `ingest --coco-root` reads.

    DEST/annotations/captions_val2017.json     (from annotations_trainval2017.zip)
    DEST/annotations/instances_val2017.json    (same archive; extracted when present)
    DEST/val2017/000000xxxxxx.jpg              (from val2017.zip)
    DEST/zips/*.zip                            (the downloaded archives, kept so a re-run skips them)

year="2014" fetches COCO 2014 val instead, which holds the COCO 5k test split (`ingest --coco5k-test
--coco-root DEST`): annotations_trainval2014.zip gives DEST/annotations/captions_val2014.json (and
instances_val2014.json), val2014.zip gives DEST/val2014/COCO_val2014_000000xxxxxx.jpg (40,504 images,
6.2 GiB). Everything below applies to both years alike, with each archive's own members and limits.

Downloading. Each archive is fetched from `<base_url>/<path>` into `DEST/zips/<name>.part`. An
interrupted download keeps its `.part` file and the next run asks the server for the rest with an
HTTP `Range` request (a server that ignores it sends the whole file again, which replaces the
part). A server that answers with the wrong range is tried again from the start a bounded number
of times (MAX_RESTARTS), then refused with a message. A finished download is checked against the
size the server announced (Content-Length or Content-Range; the official files' known sizes when
the server gives none). The `.part` file is opened with O_NOFOLLOW (a fresh download first removes
it and creates it with O_EXCL), so a planted symbolic link is refused, never written through.

Checking, before anything is extracted:
- Only members that belong are extracted: `val<year>/<name>.jpg` from the images archive, and
  `annotations/captions_val<year>.json` (required) and `annotations/instances_val<year>.json` (optional)
  from the annotations archive. Every other member is skipped and counted in the report.
- An archive with an unsafe member name (absolute, `..`, drive letter, symbolic link), a duplicate,
  an encrypted member or an unusual compression method among the wanted ones is refused whole.
- Size limits (ExtractLimits, per archive; parameters, so tests use small ones): the declared size
  of each wanted member, their total, their number, and the compression ratio (uncompressed /
  compressed) are checked against bounds set generously above the official archives (JPEGs barely
  compress; JSON deflates about 5-10:1; a zip bomb reaches 1000:1).
- Every wanted member is then read through once: its CRC is checked by zipfile, and the bytes that
  actually come out are counted, so a header that understates a member's size cannot get past the
  limits (copy_limited stops as soon as the count passes the declared size).
A damaged archive (bad CRC, broken deflate stream, truncated) is deleted and the message says that
the next run downloads it afresh. A refused archive (unsafe, over the limits, not the COCO archive)
is renamed to `DEST/zips/<name>.rejected`, so that it is not used again, and the message names it.

Extracting. The target folders DEST/annotations and DEST/val<year> are resolved once (either may be
a symbolic link to a real folder elsewhere: members land inside the folder it points to). A file
already there with the member's size and CRC is kept, so an interrupted extraction resumes. A file
already there that differs (other size or content, a symbolic link, not a regular file) is never
replaced: the archive is refused with a message naming those files, and nothing is extracted from
it; the user moves them away and runs the command again. Each member is written to a temporary
file created exclusively (tempfile.mkstemp in the target folder), then renamed into place.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import UserError, list_offenders
from toolkit.progress import progress
from toolkit.userfiles import unsafe_relative_name

DEFAULT_BASE_URL = "http://images.cocodataset.org"
TIMEOUT_S = 30
CHUNK = 1 << 20
MAX_RESTARTS = 2  # a download that the server answers with the wrong range is started again at most this often
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one archive may extract (declared sizes are checked, and actual bytes counted)."""

    max_member_bytes: int  # one extracted member, uncompressed
    max_total_bytes: int  # all extracted members together
    max_files: int  # number of members extracted
    max_ratio: float = 10.0  # uncompressed / compressed size of one member...
    ratio_floor_bytes: int = 64 << 10  # ...checked for members larger than this


# val2017.zip: 5,000 JPEGs (COCO images are at most 640 pixels on a side), 815,585,330 bytes compressed; JPEGs
# barely compress, so the uncompressed total is about the same. Limits: 50 MiB per JPEG, twice the official
# archive's size in all, 10,000 files, ratio 10:1.
IMAGE_LIMITS = ExtractLimits(50 << 20, 2 * 815_585_330, 10_000, max_ratio=10.0)
# annotations_trainval2017.zip: the val JSONs extracted here are a few MB to a few tens of MB each, JSON
# deflates about 5-10:1. Limits: 256 MiB each, 512 MiB in all, ratio 50:1.
ANNOTATION_LIMITS = ExtractLimits(256 << 20, 512 << 20, 2, max_ratio=50.0)
# val2014.zip: 40,504 JPEGs, 6,645,013,297 bytes compressed. Limits: 50 MiB per JPEG, twice the official
# archive's size in all, 50,000 files, ratio 10:1. annotations_trainval2014.zip: the limits of 2017's (its val
# JSONs cover 40,504 images instead of 5,000 and stay under 256 MiB each).
IMAGE_LIMITS_2014 = ExtractLimits(50 << 20, 2 * 6_645_013_297, 50_000, max_ratio=10.0)


@dataclass(frozen=True)
class RemoteZip:
    name: str  # file name under DEST/zips/
    url_path: str  # path below the base URL
    known_size: int | None  # bytes of the official file, used only when the server announces no size
    folder: str  # the folder under DEST that its members are extracted into
    limits: ExtractLimits
    members: tuple[tuple[str, bool], ...] = ()  # annotations: (member name, required); empty for images
    what: str = ""  # what the archive is, for a message that refuses it


def _annotations(year: str, size: int) -> RemoteZip:
    members = ((f"annotations/captions_val{year}.json", True), (f"annotations/instances_val{year}.json", False))
    name = f"annotations_trainval{year}.zip"
    return RemoteZip(name, f"annotations/{name}", size, "annotations", ANNOTATION_LIMITS, members,
                     f"the COCO {year} annotations archive")  # fmt: skip


def _images(year: str, size: int, limits: ExtractLimits) -> RemoteZip:
    return RemoteZip(f"val{year}.zip", f"zips/val{year}.zip", size, f"val{year}", limits,
                     what=f"the COCO {year} val images archive")  # fmt: skip


# the official files' sizes (bytes), as images.cocodataset.org serves them
ANNOTATIONS = _annotations("2017", 252_907_541)
IMAGES = _images("2017", 815_585_330, IMAGE_LIMITS)
YEARS = {  # --year -> (annotations archive, images archive)
    "2017": (ANNOTATIONS, IMAGES),
    "2014": (_annotations("2014", 252_872_794), _images("2014", 6_645_013_297, IMAGE_LIMITS_2014)),
}

ANNOTATION_MEMBERS = dict(ANNOTATIONS.members)  # 2017's: member name -> required
_IMAGE_NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.jpg"


@dataclass
class FileReport:
    name: str
    url: str
    size: int
    action: str  # 'downloaded' | 'resumed' | 'already there'
    n_extracted: int = 0
    n_kept: int = 0
    n_skipped: int = 0  # members that do not belong here, left in the archive
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class DownloadResult:
    dest: Path
    captions_json: Path
    images_dir: Path | None
    n_images: int
    files: list[FileReport] = field(default_factory=list)


class _Refused(UserError):
    """The archive is not acceptable (unsafe, over the limits, not COCO's): it is set aside as *.rejected."""


class _Damaged(UserError):
    """The archive cannot be read back (CRC, deflate stream, truncation): it is deleted and downloaded again."""


def _url(base_url: str, remote: RemoteZip) -> str:
    return base_url.rstrip("/") + "/" + remote.url_path


# --- downloading ---


def _network_error(url: str, exc: BaseException, part: Path, base_url: str) -> UserError:
    reason = getattr(exc, "reason", None) or exc
    kept = ""
    if part.is_file() and not part.is_symlink() and part.stat().st_size:
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


def _part_size(part: Path) -> int:
    """Bytes already in the .part file (0 if none); a symbolic link or a non-file there is refused."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return 0
    if stat.S_ISLNK(st.st_mode):
        raise UserError(
            f"{part} is a symbolic link (to {os.readlink(part)}); a download is never written through a link. "
            "Check what it points to, delete it, and run the same command again."
        )
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{part} is not a regular file; delete it and run the same command again.")
    return st.st_size


def _open_part(part: Path, append: bool):
    """Open the .part file for writing without following a link; a fresh download creates it exclusively."""
    if append:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | _O_NOFOLLOW
    else:
        part.unlink(missing_ok=True)  # never truncate through a link, or a hard link, planted there
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW
    try:
        fd = os.open(part, flags, 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EEXIST):
            raise UserError(
                f"{part} appeared as a symbolic link or another file while downloading; a download is never "
                "written through a link. Delete it and run the same command again."
            ) from None
        raise UserError(
            f"Cannot write {part}: {exc.strerror}. Check the folder's permissions and free space."
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise UserError(
            f"{part} is not a plain file of its own (it has {st.st_nlink} hard links); appending to it would change "
            "another file. Delete it and run the same command again."
        )
    return os.fdopen(fd, "ab" if append else "wb")


def _fetch_once(url: str, part: Path, base_url: str, known_size: int | None) -> tuple[int, str] | str:
    """One request. Returns (total size, 'downloaded'|'resumed'), or why the download must start again."""
    have = _part_size(part)
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
            return f"HTTP 416 for bytes={have}- (Content-Range: {exc.headers.get('Content-Range')})"
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
                return f"asked for bytes {have}- and got a 206 with Content-Range: {content_range or '(none)'}"
            total = _total_from_content_range(content_range)
            append, start, action = True, have, ("resumed" if have else "downloaded")
        else:  # 200: the server sends the whole file (it ignored or did not get a Range)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            append, start, action = False, 0, "downloaded"
        if total is None and base_url.rstrip("/") == DEFAULT_BASE_URL:
            total = known_size
        bar = progress(total=total, desc=part.name[:-5], unit="B")
        bar.unit_scale, bar.unit_divisor = True, 1024
        bar.update(start)
        written = start
        try:
            with _open_part(part, append) as fh:
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


def _fetch(url: str, part: Path, base_url: str, known_size: int | None) -> tuple[int, str]:
    """Download url into part, resuming what is there; a wrong range restarts it, a bounded number of times."""
    why = ""
    for _ in range(1 + MAX_RESTARTS):
        result = _fetch_once(url, part, base_url, known_size)
        if isinstance(result, tuple):
            return result
        why = result
    raise UserError(
        f"The server answered {1 + MAX_RESTARTS} requests in a row for {url} with the wrong byte range (last: "
        f"{why}), so the download was given up and its partial file deleted. Use another --base-url (a mirror "
        f"that serves the file correctly), or download the file by hand and put it in {part.parent}/ under the "
        f"name {part.name[:-5]}."
    )


# --- checking an archive ---


def copy_limited(src, out, declared: int, limit: int, what: str) -> int:
    """Copy src to out (None: only read) counting the bytes; stop as soon as they pass declared or limit.

    Returns the number of bytes, which equals `declared`. More bytes than declared (a header that lies)
    or than `limit` is refused; fewer means a damaged member.
    """
    n = 0
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        n += len(chunk)
        if n > declared:
            raise _Refused(f"{what} holds more bytes than the {declared:,} it declares; its header is forged.")
        if n > limit:
            raise _Refused(f"{what} holds more than the limit of {limit:,} bytes for one member.")
        if out is not None:
            out.write(chunk)
    if n < declared:
        raise _Damaged(f"{what} holds fewer bytes ({n:,}) than the {declared:,} it declares.")
    return n


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return unsafe_relative_name(info.filename)


def _member_file(remote: RemoteZip, name: str) -> str | None:
    """The file name a member is extracted to inside remote.folder, or None when it does not belong."""
    if not remote.members:  # the images archive: <folder>/<name>.jpg
        m = re.fullmatch(f"{re.escape(remote.folder)}/({_IMAGE_NAME})", name, re.IGNORECASE)
        return m.group(1) if m else None
    return name.split("/", 1)[1] if name in dict(remote.members) else None


@dataclass
class _Plan:
    members: list[tuple[zipfile.ZipInfo, str]]  # (member, file name inside the target folder)
    skipped: list[str]


def _plan(zf: zipfile.ZipFile, remote: RemoteZip, limits: ExtractLimits, what: str, archive_size: int) -> _Plan:
    """Choose the members to extract, and refuse the archive if anything about them is unsafe or too big."""
    members, skipped, bad, seen = [], [], [], set()
    for info in zf.infolist():
        reason = _unsafe_reason(info)
        if reason:
            bad.append(f"{info.filename!r} ({reason})")
            continue
        if info.is_dir():
            continue
        target = _member_file(remote, info.filename)
        if target is None:
            skipped.append(info.filename)
        elif target.lower() in seen:
            bad.append(f"{info.filename!r} (given twice)")
        else:
            seen.add(target.lower())
            members.append((info, target))
    if bad:
        raise _Refused(f"{what} has unsafe members, refused: {list_offenders(bad)}.")
    if remote.members:
        missing = [m for m, required in remote.members if required and m not in {i.filename for i, _ in members}]
        if missing:
            raise _Refused(f"{what} does not contain {', '.join(missing)}. Is it {remote.what}?")
    elif not members:
        raise _Refused(f"{what} holds no {remote.folder}/*.jpg files. Is it {remote.what}?")

    if len(members) > limits.max_files:
        raise _Refused(f"{what} holds {len(members):,} files to extract, more than the limit of {limits.max_files:,}.")
    for info, _ in members:
        if info.flag_bits & 0x1:
            raise _Refused(f"{what}: member {info.filename!r} is encrypted; the COCO archives are not.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refused(
                f"{what}: member {info.filename!r} uses compression method {info.compress_type}; the COCO "
                "archives use deflate."
            )
        if info.file_size > limits.max_member_bytes:
            raise _Refused(
                f"{what}: member {info.filename!r} declares {info.file_size:,} bytes, more than the limit of "
                f"{limits.max_member_bytes:,} for one member."
            )
        if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise _Refused(
                f"{what}: member {info.filename!r} has a compression ratio of "
                f"{info.file_size / max(info.compress_size, 1):,.0f}:1 ({info.compress_size:,} bytes that unpack to "
                f"{info.file_size:,}), more than the limit of {limits.max_ratio:g}:1 for these files (a zip bomb?)."
            )
    packed = sum(info.compress_size for info, _ in members)
    if packed > archive_size:  # an inflated compressed size would hide a member's real compression ratio
        raise _Refused(
            f"{what}: its members declare {packed:,} compressed bytes, more than the archive's {archive_size:,}."
        )
    total = sum(info.file_size for info, _ in members)
    if total > limits.max_total_bytes:
        raise _Refused(
            f"{what}: its {len(members):,} files to extract declare {total:,} bytes in all, more than the limit "
            f"of {limits.max_total_bytes:,}."
        )
    return _Plan(members, skipped)


def _read_error(what: str, info: zipfile.ZipInfo, exc: BaseException) -> _Damaged:
    text = str(exc)
    reason = "fails its CRC check" if "CRC" in text else f"cannot be read ({type(exc).__name__}: {text})"
    return _Damaged(f"{what} is damaged: member {info.filename!r} {reason}.")


def _verify(zf: zipfile.ZipFile, plan: _Plan, limits: ExtractLimits, what: str, label: str) -> None:
    """Read every wanted member through: CRC checked by zipfile, actual bytes counted against the limits."""
    for info, _ in progress(plan.members, desc=f"check {label}", unit="file"):
        try:
            with zf.open(info) as src:
                copy_limited(src, None, info.file_size, limits.max_member_bytes, f"{what}: member {info.filename!r}")
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise _read_error(what, info, exc) from None


# --- extracting ---


def _target_folder(dest_root: Path, name: str) -> Path:
    """DEST/<name>, created if needed and resolved once (it may be a link to a folder elsewhere)."""
    folder = dest_root / name
    try:
        folder.mkdir(exist_ok=True)
        resolved = folder.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"Cannot use {folder} as the folder to extract into: {exc}.") from None
    if not resolved.is_dir():
        raise UserError(f"{folder} is not a folder; move it away and run the same command again.")
    return resolved


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _existing(target: Path, info: zipfile.ZipInfo) -> str | None:
    """None if target is absent, 'same' if it holds the member's bytes, else why it differs."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != info.file_size:
        return f"has different content ({st.st_size:,} bytes; the archive's has {info.file_size:,})"
    if _file_crc(target) != info.CRC:
        return "has different content (same size, other bytes)"
    return "same"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _extract(zf, plan: _Plan, folder: Path, limits: ExtractLimits, what: str, label: str) -> tuple[int, int]:
    """Extract the planned members into folder. Returns (extracted, kept as they were)."""
    todo, n_kept, differ = [], 0, []
    for info, name in plan.members:
        state = _existing(folder / name, info)
        if state is None:
            todo.append((info, name))
        elif state == "same":
            n_kept += 1
        else:
            differ.append(f"{folder / name}: {state}")
    if differ:
        raise UserError(
            f"Files already in {folder} differ from the ones in {what}: {list_offenders(differ)}. Nothing was "
            "extracted: a file that differs is never replaced. Move those files away (or delete them if nothing in "
            "them needs keeping) and run the same command again."
        )
    for stale in folder.glob(".*.extracting"):  # our own temporary files, left by a killed run
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)
    mode = 0o666 & ~_umask()
    for info, name in progress(todo, desc=f"extract {label}", unit="file"):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".extracting")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                try:
                    with zf.open(info) as src:
                        copy_limited(
                            src, out, info.file_size, limits.max_member_bytes, f"{what}: member {info.filename!r}"
                        )
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise _read_error(what, info, exc) from None
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return len(todo), n_kept


def _get(remote: RemoteZip, dest_root: Path, base_url: str, limits: ExtractLimits) -> FileReport:
    zips = dest_root / "zips"
    try:
        zips.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create {zips}: {exc}") from None
    final = zips / remote.name
    part = zips / (remote.name + ".part")
    url = _url(base_url, remote)
    if final.exists():
        source, action, what = final, "already there", str(final)
    else:
        _part_size(part)  # refuse a planted link before asking the server for anything
        _, action = _fetch(url, part, base_url, remote.known_size)
        source, what = part, f"The download of {url} ({part})"
    report = FileReport(remote.name, url, source.stat().st_size, action)
    try:
        try:
            zf = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise _Damaged(f"{what} is not a valid zip archive ({exc}).") from None
        with zf:
            plan = _plan(zf, remote, limits, what, report.size)
            _verify(zf, plan, limits, what, remote.name)
            if source == part:
                os.replace(part, final)
                source, what = final, str(final)
            folder = _target_folder(dest_root, remote.folder)
            report.n_extracted, report.n_kept = _extract(zf, plan, folder, limits, what, remote.name)
    except _Damaged as exc:
        source.unlink(missing_ok=True)
        raise UserError(
            f"{exc} {source} was deleted; it will be downloaded afresh when you run the same command again."
        ) from None
    except _Refused as exc:
        rejected = zips / (remote.name + ".rejected")
        os.replace(source, rejected)
        raise UserError(
            f"{exc} Nothing was extracted. The archive was renamed to {rejected} so that it is not used again: "
            f"inspect it if you like, then delete it. The next run downloads {remote.name} afresh from --base-url; "
            "if the server sends the same archive again, use another mirror or a trusted copy."
        ) from None
    except OSError as exc:
        raise UserError(f"Could not read {source} or write into {dest_root}: {exc}.") from None
    report.n_skipped = len(plan.skipped)
    report.skipped_examples = plan.skipped[:3]
    return report


def download_coco(
    dest,
    base_url: str = DEFAULT_BASE_URL,
    images: bool = True,
    limits: dict[str, ExtractLimits] | None = None,
    year: str = "2017",
) -> DownloadResult:
    """Download and safely extract COCO val captions of `year` (2017 or 2014; with images=True, the val images).

    limits: per archive name (e.g. {"val2017.zip": ExtractLimits(...)}), replacing its default limits.
    """
    dest = Path(dest)
    if str(year) not in YEARS:
        raise UserError(f"--year must be one of {', '.join(sorted(YEARS))}, not {year!r}.")
    annotations, image_zip = YEARS[str(year)]
    if not base_url.startswith(("http://", "https://")):
        raise UserError(f"--base-url must start with http:// or https:// (got {base_url!r}).")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        dest_root = dest.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"Cannot create the destination folder {dest}: {exc}") from None
    reports = []
    for remote in [annotations] + ([image_zip] if images else []):
        reports.append(_get(remote, dest_root, base_url, (limits or {}).get(remote.name, remote.limits)))
    images_dir = dest / image_zip.folder
    n_images = 0
    if images and images_dir.is_dir():  # the JPEGs only: not a leftover or planted *.extracting file
        n_images = sum(1 for p in images_dir.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
    return DownloadResult(
        dest=dest,
        captions_json=dest / annotations.members[0][0],
        images_dir=images_dir if images else None,
        n_images=n_images,
        files=reports,
    )
