"""Opening a user's file, and checking outside JSON for shape, in one place.

Every command that reads a file a person gave it (a label CSV, a Label Studio export, a
template file, a captions JSON, an existing output file it compares against, the database)
goes through `check_regular` / `read_bytes` / `read_text` / `load_json`:

- a missing path, a folder, a FIFO, a socket or a device is refused by name *before* it is
  opened (opening a FIFO for reading blocks until a writer comes; a device may never end);
- the open itself is non-blocking and re-checked with fstat, so a FIFO swapped in after the
  check still cannot hang the command;
- text must decode in the encoding asked for, and the message says where it does not.

Outside JSON (Label Studio exports, HTTP request bodies, COCO files) is parsed by
`parse_json`, which refuses documents nested deeper than `MAX_JSON_DEPTH`, and is then checked
value by value with the `want_*` helpers. Each helper takes the *path* to the value
(`annotations[0].result[2].value.choices`) and raises a `JsonShapeError` (a `UserError`) that
names it, so a message always says which value is wrong and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from toolkit.errors import UserError

MAX_JSON_DEPTH = 64  # no format the toolkit reads nests deeper than about 8


class JsonShapeError(UserError):
    """A JSON value of the wrong type or out of range; the message names its path."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def regular_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a regular file (missing, a folder, a FIFO, ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    return f"is {_kind(st.st_mode)}, not a regular file"


def check_regular(path: str | Path, what: str, hint: str = "") -> Path:
    """Refuse a path that is not an existing regular file; return it as a Path."""
    path = Path(path)
    problem = regular_problem(path)
    if problem == "not found":
        raise UserError(_join(f"{what} {path} not found.", hint))
    if problem:
        raise UserError(_join(f"{what} {path} {problem}.", hint))
    return path


def refuse_non_regular(path: str | Path, what: str, hint: str = "") -> None:
    """For a path that may not exist yet (an output file): refuse it only if it exists and is not regular."""
    problem = regular_problem(path)
    if problem and problem != "not found":
        raise UserError(_join(f"{what} {path} {problem}.", hint))


def _open_checked(path: Path, what: str, hint: str) -> int:
    """A non-blocking read descriptor of a path that `check_regular` accepted."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise UserError(_join(f"{what} {path} cannot be read ({exc.strerror or exc}).", hint)) from None


def _read_fd(fd: int, label: str, hint: str = "", limit: int | None = None, head: int | None = None) -> bytes:
    """Read an open descriptor (closed afterwards) if fstat says it is a regular file: all of it, at most `limit`
    bytes (more is refused), or its first `head` bytes. `label` names the file in messages."""
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped for something else after the check
            raise UserError(_join(f"{label} is {_kind(st.st_mode)}, not a regular file.", hint))
        if limit is not None and st.st_size > limit:
            raise UserError(_join(f"{label} is {st.st_size:,} bytes, more than the {limit:,} this reads.", hint))
        try:
            data = f.read(head if head is not None else -1 if limit is None else limit + 1)
        except OSError as exc:
            raise UserError(_join(f"{label} cannot be read ({exc.strerror or exc}).", hint)) from None
        if limit is not None and len(data) > limit:
            raise UserError(_join(f"{label} is more than the {limit:,} bytes this reads.", hint))
        return data


def read_bytes(path: str | Path, what: str, hint: str = "", limit: int | None = None) -> bytes:
    """The bytes of a regular file, opened without blocking; `limit` caps the size read."""
    path = check_regular(path, what, hint)
    return _read_fd(_open_checked(path, what, hint), f"{what} {path}", hint, limit=limit)


def unsafe_relative_name(name: str) -> str | None:
    """Why a file name that a data file gives (a COCO file_name, an archive member) cannot stand for a file inside
    the folder it is relative to, or None: an absolute path (/x, \\x, C:x), a '..' component (with / or \\ as the
    separator: a name written on Windows), a NUL character, or no name at all."""
    if "\0" in name:
        return "a NUL character"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        return "a '..' component"
    if not parts:
        return "an empty name"
    return None


def read_under(root: str | Path, rel: str | Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file `rel` (relative to `root`, or a path under it), resolved and checked *now*, for
    a server that serves files long after it started. `root` is a real path, resolved when it was trusted (at the
    start): if it leads elsewhere now (a link swapped in for it), it is refused. The file's real path must lie
    inside `root`, and each part of it is opened without following a link, relative to the folder opened before
    it, so a link or a folder swapped in after the check is refused, never followed. FIFOs, devices and sockets
    are refused before they are opened, and again by fstat after the non-blocking open. UserError on any of these.
    """
    root_real = os.path.abspath(root)
    if os.path.realpath(root_real) != root_real:
        raise UserError(f"{what} {rel}: the folder {root_real} is not a real path now (a link leads elsewhere).")
    real = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, real]) != root_real or real == root_real:
        raise UserError(f"{what} {rel} is not a file inside {root_real}.")
    parts = os.path.relpath(real, root_real).split(os.sep)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    folder = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow | getattr(os, "O_CLOEXEC", 0)
    flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        if os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd:
            dir_fd = os.open(root_real, folder)
            try:
                for part in parts[:-1]:
                    inner = os.open(part, folder, dir_fd=dir_fd)
                    os.close(dir_fd)
                    dir_fd = inner
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise UserError(f"{what} {rel} is {_kind(st.st_mode)}, not a regular file.")
                fd = os.open(parts[-1], flags, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        else:  # no openat (Windows): the real path checked above, then opened without following a final link
            problem = regular_problem(real)
            if problem:
                raise UserError(f"{what} {rel} {problem}.")
            fd = os.open(real, flags)
    except OSError as exc:
        raise UserError(f"{what} {rel} cannot be read ({exc.strerror or exc}).") from None
    return _read_fd(fd, f"{what} {rel}", limit=limit)


def decode_text(data: bytes, what: str, encoding: str = "utf-8-sig", hint: str = "") -> str:
    """Decode bytes, with a message that gives the byte offset where they do not decode."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        name = "UTF-8" if encoding.replace("-", "").lower().startswith("utf8") else encoding
        raise UserError(
            _join(f"{what} is not {name} text (byte {exc.start}: {exc.reason}). Save it as {name}.", hint)
        ) from None


def read_text(path: str | Path, what: str, hint: str = "", encoding: str = "utf-8-sig") -> str:
    """The text of a regular file (UTF-8, a BOM allowed, by default)."""
    return decode_text(read_bytes(path, what, hint), f"{what} {path}", encoding, hint)


def read_head(path: str | Path, n: int, what: str, hint: str = "") -> bytes:
    """The first `n` bytes (fewer if the file is shorter) of a regular file, opened without blocking:
    enough to tell a file's format by its magic bytes without reading all of it."""
    path = check_regular(path, what, hint)
    return _read_fd(_open_checked(path, what, hint), f"{what} {path}", hint, head=n)


def _depth_exceeds(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return True
            items = v.values() if isinstance(v, dict) else v
            stack.extend((x, d + 1) for x in items if isinstance(x, dict | list))
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes | str, what: str, hint: str = ""):
    """Parse JSON text; refuse NaN/Infinity literals, invalid UTF-8 and nesting deeper than MAX_JSON_DEPTH."""
    if isinstance(data, bytes | bytearray):
        data = decode_text(bytes(data), what, "utf-8-sig", hint)
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UserError(
            _join(f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).", hint)
        ) from None
    except RecursionError:
        raise UserError(_join(f"{what} is nested too deeply to be JSON this reads.", hint)) from None
    except ValueError as exc:  # NaN/Infinity literals, an integer with too many digits
        raise UserError(_join(f"{what} holds a value that cannot be read ({exc}).", hint)) from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise UserError(_join(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; no file this reads is.", hint))
    return value


def load_json(path: str | Path, what: str, hint: str = ""):
    """Read and parse a JSON file that a user gave (see `read_bytes` and `parse_json`)."""
    return parse_json(read_bytes(path, what, hint), f"{what} {path}", hint)


# ---- shape checks for parsed JSON ----------------------------------------------------------


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if math.isfinite(value) else "not a finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _fail(where: str, expected: str, value) -> JsonShapeError:
    return JsonShapeError(f"{where} must be {expected}; it is {_type_name(value)} ({_show(value)}).")


def want_int(value, where: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """A JSON integer (never a boolean, never 31.7 or 1e400) within [lo, hi]."""
    if isinstance(value, int) and not isinstance(value, bool):
        if lo <= value <= hi:
            return value
        raise JsonShapeError(f"{where} must be a whole number from {lo} to {hi}; it is {_show(value)}.")
    raise _fail(where, f"a whole number from {lo} to {hi}", value)


def want_bool(value, where: str) -> bool:
    """A JSON true or false (never the string "false", never 0 or 1)."""
    if isinstance(value, bool):
        return value
    raise _fail(where, "true or false", value)


def want_str(value, where: str, max_len: int | None = None, allow_empty: bool = True) -> str:
    """A JSON string that UTF-8 can encode (no lone surrogate), at most `max_len` characters."""
    if not isinstance(value, str):
        raise _fail(where, "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JsonShapeError(
            f"{where} holds a lone surrogate at character {exc.start} (not valid Unicode, cannot be stored)."
        ) from None
    if max_len is not None and len(value) > max_len:
        raise JsonShapeError(f"{where} is {len(value):,} characters long; at most {max_len:,} are allowed.")
    if not allow_empty and not value.strip():
        raise JsonShapeError(f"{where} must not be empty.")
    return value


def want_list(value, where: str, max_len: int | None = None) -> list:
    if not isinstance(value, list):
        raise _fail(where, "a list", value)
    if max_len is not None and len(value) > max_len:
        raise JsonShapeError(f"{where} has {len(value):,} items; at most {max_len:,} are allowed.")
    return value


def want_dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    return value


def want_str_list(value, where: str, max_len: int | None = None, max_item_len: int | None = None) -> list[str]:
    """A list of strings (a bare string is refused, never split into characters)."""
    items = want_list(value, where, max_len)
    return [want_str(v, f"{where}[{i}]", max_item_len) for i, v in enumerate(items)]


def shape_error(where: str, expected: str, value) -> JsonShapeError:
    """The error for a value that none of the want_* helpers checks alone (say 'a user id or an object')."""
    return _fail(where, expected, value)
