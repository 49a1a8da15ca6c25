"""Stored paths: relative to the database's folder when they lie under it, so a study folder can move.

Every path that a stage writes into the database (``subsets.image_root``, ``subsets.source_file``,
``embedding_sets.path``, the checkpoint recorded in an embedding set's config,
``instance_files.source_file``) goes through
`to_stored`, and every reader goes through `resolve`:

- a path under the folder of the database file is stored relative to that folder, with ``/``
  separators (``demo_cache/embeddings/s30/image-....npy``); a copy or a move of the whole folder
  (database, cache, images) keeps working;
- any other path is stored absolute, exactly as before, and `clipfail relocate` rebinds it after
  the files moved (`relocate_images`, `relocate_cache`), after checking that the files at the new
  place are the ones the database references;
- databases written before this scheme hold absolute paths everywhere: absolute stays absolute.

`missing_files(con)` is the cheap check behind `clipfail status`: image roots and image files
exist, embedding files exist with the header and byte size their rows promise (no sha256 of
every file on every call; `relocate` and the stages that load a file check the sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from toolkit.errors import UserError, list_offenders
from toolkit.store.db import clipfail_command, db_file  # the connection's file and the hint: also reached here


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks (toolkit.store.artifacts uses it for every registered file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_dir(con_or_dbpath) -> Path | None:
    """The folder that relative stored paths are relative to: the database file's folder."""
    f = db_file(con_or_dbpath)
    return None if f is None else f.parent


def _relative(path: Path, base: Path) -> str | None:
    try:
        rel = path.relative_to(base)
    except ValueError:
        return None
    return PurePosixPath(*rel.parts).as_posix() if rel.parts else "."


def to_stored(con_or_dbpath, path) -> str:
    """The text to store for `path`: relative (posix) to the database folder when under it, else absolute."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    base = base_dir(con_or_dbpath)
    if base is not None:
        # Lexically first (a symlinked folder inside the study stays inside it), then with symlinks resolved.
        for cand, b in ((p, base), (p.resolve(), base.resolve())):
            rel = _relative(cand, b)
            if rel is not None:
                return rel
    return str(p.resolve())


def is_relative(stored) -> bool:
    s = str(stored)
    return not (os.path.isabs(s) or PurePosixPath(s).is_absolute() or (len(s) > 1 and s[1] == ":"))


def resolve(con_or_dbpath, stored) -> Path | None:
    """The file-system path of a stored path (None stays None). Absolute paths are returned as they are."""
    if stored is None or (isinstance(stored, float) and np.isnan(stored)):
        return None
    s = str(stored)
    if not is_relative(s):
        return Path(s)
    base = base_dir(con_or_dbpath)
    if base is None:  # in-memory database: nothing to be relative to
        return Path(s)
    return base.joinpath(*PurePosixPath(s).parts) if s != "." else base


def resolve_keys(con_or_dbpath, config: dict, keys) -> dict:
    """A copy of a stored config with the stored paths under `keys` resolved (an embedding set's checkpoint)."""
    out = dict(config)
    for key in keys:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(resolve(con_or_dbpath, out[key]))
    return out


def cache_root(con_or_dbpath) -> Path:
    """The study's cache folder, `<database folder>/<database stem>_cache` beside the database file
    (`./clipfail_cache` for an in-memory database). It holds two caches kept apart on purpose:
    `embedding_cache_dir` (embed's image and text embeddings) and `prompt_cache_dir` (improve's
    encoded prompts)."""
    dbfile = db_file(con_or_dbpath) or Path("clipfail.duckdb")
    return dbfile.resolve().parent / f"{dbfile.stem}_cache"


def embedding_cache_dir(con_or_dbpath) -> Path:
    """`<db stem>_cache/embeddings`: where embed writes its .npy files unless given --cache-dir."""
    return cache_root(con_or_dbpath) / "embeddings"


def prompt_cache_dir(con_or_dbpath) -> Path:
    """`<db stem>_cache/prompts`: where improve keeps encoded prompt shards unless given a cache_dir."""
    return cache_root(con_or_dbpath) / "prompts"


def moved_hint(con_or_dbpath, option: str, subset: str | None = None) -> str:
    """'If the files moved, rebind them: clipfail --db DB relocate OPTION NEW_FOLDER [--subset NAME].'"""
    import shlex

    where = f" --subset {shlex.quote(subset)}" if subset else ""
    cmd = clipfail_command(db_file(con_or_dbpath))  # the absolute path, however the database was given
    return f"If the files moved, rebind them: {cmd} relocate {option} NEW_FOLDER{where}."


# ------------------------------------------------------------------------------ output paths


def _real(path) -> Path:
    """The absolute path with every symlink and `..` resolved (a path that does not exist yet too)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def _inode(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class _StudyFiles:
    """What belongs to one study's database: the file and its WAL (never written over), the folders that
    DuckDB and clipfail keep beside it (its temporary folder, `<db stem>_cache/`: nothing is written into
    them), and every file registered in it (embedding and prompt-cache .npy files)."""

    def __init__(self, study):
        from toolkit.store import db

        self.files: dict[Path, str] = {}  # resolved path -> what it is
        self.inodes: dict[tuple[int, int], str] = {}
        self.folders: dict[Path, str] = {}
        dbf = db_file(study)
        if dbf is None:
            return
        real = _real(dbf)
        for f in {dbf, real}:
            self.files[_real(f)] = f"the database file of this study ({dbf})"
            wal = f"the write-ahead log of this study's database {dbf} (committed work waits there)"
            self.files[_real(f"{f}.wal")] = wal
            self.folders[_real(f"{f}.tmp")] = f"DuckDB's temporary folder of this study's database {dbf}"
        for parent in {dbf.parent, real.parent}:  # embed and improve name it from the database's path
            for stem in {dbf.stem, real.stem}:
                cache = parent / f"{stem}_cache"
                self.folders[_real(cache)] = f"this study's cache folder {cache}"
        for f, what in list(self.files.items()):
            ino = _inode(f)
            if ino is not None:
                self.inodes[ino] = what
        con, close = study, False
        if isinstance(study, str | os.PathLike):
            if not db.is_duckdb_file(dbf):
                return
            try:  # a short read-only look at the registered files; a caller that has the study open passes con
                import duckdb

                con, close = duckdb.connect(str(dbf), read_only=True), True
            except Exception:  # locked or damaged: the command that opens it next says so
                return
        try:
            if not db.table_exists(con, "embedding_sets"):
                return
            for set_id, kind, stored in con.execute(
                "SELECT embedding_set_id, kind, path FROM embedding_sets ORDER BY embedding_set_id"
            ).fetchall():
                f = resolve(dbf, stored)
                what = f"the {kind} embedding file of set {set_id}, registered in this study"
                self.files.setdefault(_real(f), what)
                ino = _inode(f)
                if ino is not None:
                    self.inodes.setdefault(ino, what)
        finally:
            if close:
                con.close()

    def owner(self, path) -> str | None:
        """What `path` (a file to be written) is, if it belongs to the study or to any database."""
        from toolkit.store import db

        real = _real(path)
        if real in self.files:
            return self.files[real]
        for folder, what in self.folders.items():
            if _inside(real, folder):
                return f"inside {what}"
        ino = _inode(real)
        if ino is not None and ino in self.inodes:
            return f"the same file as {self.inodes[ino]} (a hard link)"
        if ino is not None and db.is_duckdb_file(real):
            return "a DuckDB database file"
        if real.name.endswith(".wal") and db.is_duckdb_file(real.with_name(real.name[: -len(".wal")])):
            return f"the write-ahead log of the DuckDB database {real.with_name(real.name[: -len('.wal')])}"
        return None


def _probe_writable(folder: Path, option: str, target) -> None:
    """Create and remove a file in `folder`: the one sure test that a file can be written there."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".clipfail-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"Cannot write {option} {target}: folder {folder} does not take new files ({exc.strerror or exc}). "
            f"Give {option} in a folder you can write to."
        ) from None


def check_output_path(
    target, option: str, study=None, *, writes: tuple[str, ...] | None = None, probe: bool = True
) -> Path:
    """Refuse, before a command does any work, an output path it must not write. The one such check
    (`sql --csv`, `benchmark --csv`, `templates export --out`, `analyze --out`, `report --out`,
    `sample-failures --out`, `export-labelstudio`, `run --out`).

    `study` is the study's open connection or its database path (None: no study). With `writes`
    None, `target` is a file: it must not exist as anything but a regular file (a FIFO or a device is
    refused), its folder must exist and take new files, and it must not be the study's database, its
    write-ahead log (`.wal`), a file inside the study's cache folder (`<db stem>_cache/`) or DuckDB's
    temporary folder, a file registered in the study (embedding and prompt .npy files), any other
    DuckDB database file or the `.wal` beside one. Every spelling counts: paths are compared after
    resolving symlinks and `..`, and existing files also by (st_dev, st_ino), so a hard link is caught.

    With `writes` (name patterns, `**` for everything at any depth), `target` is a folder the command
    writes those files into: it must be a folder (or not exist yet, under a folder that takes new
    files), must not lie in the study's cache or temporary folder, and no file in it that the command
    could write over may be one of the above. `probe=False` leaves the test that the folder can be made and
    written to a command that makes it itself before its work (analyze, report, sample-failures,
    export-labelstudio); `run` probes here, before ingest and embed."""
    from toolkit import userfiles

    target_path = Path(os.path.expanduser(os.fspath(target)))
    if not os.fspath(target).strip():
        raise UserError(f"{option} is empty. Give a {'folder' if writes is not None else 'file'} name.")
    owned = _StudyFiles(study)

    def refuse(path, what: str) -> None:
        where = f"{option} {target} is" if Path(path) == target_path else f"{option} {target}: {path} is"
        raise UserError(
            f"{where} {what}. clipfail never writes over a database, its write-ahead log or a study's own files; "
            f"nothing was written. Give another {option}."
        )

    if writes is None:
        userfiles.refuse_non_regular(target_path, option, "Give a file name for the output.")
        folder = target_path.parent
        if not folder.is_dir():
            raise UserError(
                f"Folder {folder} for {option} {target} does not exist (or is not a folder). Create it first."
            )
        what = owned.owner(target_path)
        if what:
            refuse(target_path, what)
        _probe_writable(folder, option, target)
        return target_path

    if probe and target_path.exists() and not target_path.is_dir():
        raise UserError(f"{option} {target} is a file, not a folder. Give {option} a folder.")
    real = _real(target_path)
    for folder, what in owned.folders.items():
        if _inside(real, folder):
            refuse(target_path, f"inside {what}")
    if target_path.is_dir():
        import fnmatch

        walk = "**" in writes
        entries = (
            (Path(root) / name for root, _dirs, names in os.walk(target_path) for name in names)
            if walk
            else (
                target_path / e.name for e in os.scandir(target_path) if any(fnmatch.fnmatch(e.name, w) for w in writes)
            )
        )
        for entry in entries:
            what = owned.owner(entry)
            if what:
                refuse(entry, what)
        if probe:
            _probe_writable(target_path, option, target)
    elif probe:
        existing = next((p for p in target_path.absolute().parents if p.exists()), None)
        if existing is None or not existing.is_dir():
            raise UserError(f"{option} {target} cannot be created: {existing} is not a folder.")
        _probe_writable(existing, option, target)
    return target_path


# ------------------------------------------------------------------------------ checks


def npy_problem(path: Path, rows: int, dim: int, dtype: str) -> str | None:
    """A cheap check of one .npy file against its embedding_sets row: header and byte size, no checksum."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dt = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _fortran, dt = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"not a readable .npy file ({exc})"
    if tuple(shape) != (int(rows), int(dim)) or str(dt) != str(dtype):
        return f"holds {tuple(shape)} {dt}, expected ({rows}, {dim}) {dtype}"
    expected = offset + int(rows) * int(dim) * np.dtype(dt).itemsize
    if size != expected:
        return f"is {size} bytes, expected {expected}"
    return None


@dataclass
class MissingFiles:
    """What `missing_files` found; empty lists mean every referenced file is in place."""

    images: dict[str, list[str]] = field(default_factory=dict)  # subset name -> problems (first few)
    image_counts: dict[str, int] = field(default_factory=dict)  # subset name -> number of missing images
    image_roots: dict[str, str] = field(default_factory=dict)  # subset name -> resolved image root
    captions: dict[str, str] = field(default_factory=dict)  # subset name -> missing captions JSON
    embeddings: list[str] = field(default_factory=list)  # "set N (kind): path problem"

    def __bool__(self) -> bool:
        return bool(self.images or self.captions or self.embeddings)

    def lines(self) -> list[str]:
        out = []
        for name, problems in self.images.items():
            n = self.image_counts.get(name, len(problems))
            out.append(
                f"subset {name!r}: image files missing under {self.image_roots[name]}, "
                f"{list_offenders(problems, total=n, limit=3)}"
            )
        for name, path in self.captions.items():
            out.append(f"subset {name!r}: the captions JSON {path} is missing (only the report's provenance names it)")
        if self.embeddings:
            out.append(f"embedding files missing or damaged, {list_offenders(self.embeddings, limit=3)}")
        return out


def _subset_images(con, subset_id: int) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT i.rel_path FROM subset_images si JOIN images i USING (image_id) WHERE si.subset_id = ? "
            "ORDER BY si.position",
            [int(subset_id)],
        ).fetchall()
    ]


def _missing_under(root: Path, rel_paths: list[str]) -> list[str]:
    if not root.is_dir():
        return list(rel_paths)
    return [rel for rel in rel_paths if not os.path.isfile(root / rel)]


def missing_files(con) -> MissingFiles:
    """Every file the database references that is not where it says (cheap: existence, .npy header, size)."""
    found = MissingFiles()
    for subset_id, name, image_root, source_file in con.execute(
        "SELECT subset_id, name, image_root, source_file FROM subsets ORDER BY subset_id"
    ).fetchall():
        root = resolve(con, image_root)
        gone = _missing_under(root, _subset_images(con, subset_id))
        if gone:
            found.images[name] = [str(g) for g in gone[:3]]
            found.image_counts[name] = len(gone)
            found.image_roots[name] = str(root)
        src = resolve(con, source_file)
        if src is not None and not src.is_file():
            found.captions[name] = str(src)
    for set_id, kind, path, rows, dim, dtype in con.execute(
        "SELECT embedding_set_id, kind, path, rows, dim, dtype FROM embedding_sets ORDER BY embedding_set_id"
    ).fetchall():
        p = resolve(con, path)
        problem = npy_problem(p, rows, dim, dtype)
        if problem:
            found.embeddings.append(f"set {set_id} ({kind}) {p}: {problem}")
    return found


def relocate_hints(con, missing: MissingFiles) -> list[str]:
    """The `clipfail relocate` commands that would rebind what `missing_files` found (without --db)."""
    hints = []
    for name in missing.images:
        hints.append(f"Images moved? Rebind them:  clipfail relocate --images-root NEW_FOLDER --subset {name}")
    for name in missing.captions:
        hints.append(f"Captions JSON moved?  clipfail relocate --captions-json NEW_FILE --subset {name}")
    if missing.embeddings:
        hints.append("Embedding cache moved? Rebind it:  clipfail relocate --cache-dir NEW_FOLDER")
    return hints


# ------------------------------------------------------------------------------ relocate


@dataclass
class RelocateResult:
    images: list[tuple[str, str, str]] = field(default_factory=list)  # (subset, old stored, new stored)
    captions: list[tuple[str, str, str]] = field(default_factory=list)
    embeddings: list[tuple[int, str, str]] = field(default_factory=list)  # (set id, old stored, new stored)
    unchanged: list[str] = field(default_factory=list)  # notes: what stayed where it was
    checked_images: int = 0
    checked_sizes: int = 0
    updates: list[tuple[str, list]] = field(default_factory=list)  # (UPDATE statement, parameters), not yet run


def _subsets(con, subset_name: str | None) -> list[tuple]:
    rows = con.execute(
        "SELECT subset_id, name, image_root, source_file, source_sha256 FROM subsets ORDER BY subset_id"
    ).fetchall()
    if subset_name is None:
        if not rows:
            raise UserError("The database has no subset to relocate.")
        return rows
    picked = [r for r in rows if r[1] == subset_name]
    if not picked:
        known = ", ".join(r[1] for r in rows) or "none"
        raise UserError(f"No subset named {subset_name!r} (known subsets: {known}).")
    return picked


def _check_image_sizes(con, subset_id: int, root: Path, limit: int = 200) -> tuple[list[str], int]:
    """Compare the recorded width x height of up to `limit` evenly spread images with their files' headers."""
    from PIL import Image

    rows = con.execute(
        "SELECT i.rel_path, i.width, i.height FROM subset_images si JOIN images i USING (image_id) "
        "WHERE si.subset_id = ? AND i.width IS NOT NULL AND i.height IS NOT NULL ORDER BY si.position",
        [int(subset_id)],
    ).fetchall()
    if len(rows) > limit:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    wrong = []
    for rel, w, h in rows:
        try:
            with Image.open(root / rel) as im:
                size = im.size
        except Exception as exc:  # unreadable here: the wrong file, or damaged
            wrong.append(f"{rel} (unreadable: {type(exc).__name__})")
            continue
        if size != (int(w), int(h)):
            wrong.append(f"{rel} ({size[0]}x{size[1]}, recorded {w}x{h})")
    return wrong, len(rows)


def relocate(con, *, images_root=None, subset_name: str | None = None, captions_json=None, cache_dir=None):
    """`clipfail relocate`: check everything first, then change every row in one transaction (or none)."""
    from toolkit.store import db

    if not (images_root or captions_json or cache_dir):
        raise UserError("Give what moved: --images-root DIR, --captions-json FILE and/or --cache-dir DIR.")
    result = RelocateResult()
    for given, plan in (
        (images_root, lambda: plan_images(con, images_root, subset_name)),
        (captions_json, lambda: plan_captions(con, captions_json, subset_name)),
        (cache_dir, lambda: plan_cache(con, cache_dir)),
    ):
        if given:
            part = plan()
            for name in ("images", "captions", "embeddings", "unchanged", "updates"):
                getattr(result, name).extend(getattr(part, name))
            result.checked_images += part.checked_images
            result.checked_sizes += part.checked_sizes
    if result.updates:
        with db.transaction(con):
            for sql, params in result.updates:
                con.execute(sql, params)
    return result


def plan_images(con, new_root, subset_name: str | None = None) -> RelocateResult:
    """The rows that point subsets' image roots at `new_root`, after checking every image (and a sample's size)."""
    new_root = Path(os.path.abspath(os.path.expanduser(os.fspath(new_root))))
    if not new_root.is_dir():
        raise UserError(f"--images-root {new_root} is not a folder. Give the folder that holds the images.")
    result, problems = RelocateResult(), []
    for subset_id, name, image_root, _src, _sha in _subsets(con, subset_name):
        rels = _subset_images(con, subset_id)
        gone = _missing_under(new_root, rels)
        if gone:
            problems.append(f"subset {name!r}: images missing under {new_root}, {list_offenders(gone, limit=3)}")
            continue
        wrong, n = _check_image_sizes(con, subset_id, new_root)
        result.checked_images += len(rels)
        result.checked_sizes += n
        if wrong:
            problems.append(
                f"subset {name!r}: images under {new_root} are not the ingested ones (width x height differ), "
                f"{list_offenders(wrong, limit=3)}"
            )
            continue
        new = to_stored(con, new_root)
        if new == image_root:
            result.unchanged.append(f"subset {name!r} already uses {new_root}")
        else:
            result.updates.append(("UPDATE subsets SET image_root = ? WHERE subset_id = ?", [new, subset_id]))
            result.images.append((name, image_root, new))
    if problems:
        hint = "" if subset_name else " Give --subset NAME to relocate one subset at a time."
        raise UserError(f"Nothing was changed: {'; '.join(problems)}.{hint}")
    return result


def plan_captions(con, new_file, subset_name: str | None = None) -> RelocateResult:
    """The rows that point subsets' captions JSON at `new_file`, after checking its sha256 against the ingested one."""
    new_file = Path(os.path.abspath(os.path.expanduser(os.fspath(new_file))))
    if not new_file.is_file():
        raise UserError(f"--captions-json {new_file} is not a file.")
    sha = sha256_file(new_file)
    result, problems = RelocateResult(), []
    for subset_id, name, _root, src, want in _subsets(con, subset_name):
        if sha != want:
            problems.append(f"subset {name!r} was ingested from a file with sha256 {want[:12]}…, not {sha[:12]}…")
            continue
        new = to_stored(con, new_file)
        if new != src:
            result.updates.append(("UPDATE subsets SET source_file = ? WHERE subset_id = ?", [new, subset_id]))
            result.captions.append((name, src, new))
    if problems:
        raise UserError(f"Nothing was changed: {new_file} is not the captions JSON of {'; '.join(problems)}.")
    return result


def plan_cache(con, new_dir) -> RelocateResult:
    """The rows that point embedding sets at the files of the same name under `new_dir` (searched recursively).

    Each candidate must have the sha256 the database recorded. Sets whose file is found under
    `new_dir` move there; a set whose file exists where it is and not under `new_dir` stays; a set
    whose file is in neither place refuses the whole relocation (nothing is changed).
    """
    new_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(new_dir))))
    if not new_dir.is_dir():
        raise UserError(f"--cache-dir {new_dir} is not a folder. Give the folder that holds the .npy files.")
    by_name: dict[str, list[Path]] = {}
    for p in new_dir.rglob("*.npy"):
        if ".partial" not in p.relative_to(new_dir).parts:
            by_name.setdefault(p.name, []).append(p)
    result, missing, damaged = RelocateResult(), [], []
    sha_cache: dict[Path, str] = {}
    for set_id, kind, stored, sha in con.execute(
        "SELECT embedding_set_id, kind, path, sha256 FROM embedding_sets ORDER BY embedding_set_id"
    ).fetchall():
        here = resolve(con, stored)
        name = PurePosixPath(str(stored).replace("\\", "/")).name
        match = None
        for cand in by_name.get(name, []):
            if cand not in sha_cache:
                sha_cache[cand] = sha256_file(cand)
            if sha_cache[cand] == sha:
                match = cand
                break
        if match is None:
            if by_name.get(name):
                damaged.append(f"set {set_id} ({kind}): {by_name[name][0]} has another sha256 than recorded")
            elif not here.is_file():
                missing.append(f"set {set_id} ({kind}): {name}")
            else:
                result.unchanged.append(f"set {set_id} ({kind}) stays at {here}")
            continue
        result.checked_sizes += 1
        new = to_stored(con, match)
        if new != stored:
            result.updates.append(("UPDATE embedding_sets SET path = ? WHERE embedding_set_id = ?", [new, set_id]))
            result.embeddings.append((int(set_id), str(stored), new))
    if missing or damaged:
        parts = []
        if missing:
            parts.append(
                f"embedding files neither under {new_dir} nor at their stored path, {list_offenders(missing, limit=3)}"
            )
        if damaged:
            parts.append(f"files under {new_dir} that differ from what was written, {list_offenders(damaged, limit=3)}")
        raise UserError(
            f"Nothing was changed: {'; '.join(parts)}. Copy the whole cache folder (or rebuild with "
            "clipfail embed ... --recompute), then run relocate again."
        )
    return result


def rebound_config_hash(con, subset_id: int, config: dict, image_root) -> str | None:
    """For ingest's no-op check: the config hash the subset was created with, when it now points at `image_root`.

    A subset's config hash includes its image root as written when it was ingested (absolute in
    older databases, relative to the database folder now). After a move or a `relocate`, the same
    ingest command names the same images under another path; this gives the hash to compare with.
    """
    from toolkit.store import db

    row = con.execute(
        "SELECT s.image_root, r.config_json FROM subsets s LEFT JOIN runs r USING (run_id) WHERE s.subset_id = ?",
        [int(subset_id)],
    ).fetchone()
    if row is None or row[1] is None:
        return None
    here = resolve(con, row[0])
    if here is None or here.resolve() != Path(image_root).resolve():
        return None
    try:
        then = json.loads(row[1]).get("image_root")
    except (ValueError, AttributeError):
        return None
    if then is None:
        return None
    return db.config_hash({**config, "image_root": then})
