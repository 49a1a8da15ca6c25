"""Output folders that a command rewrites as a whole (`report --out`, `analyze --out`).

A command writes its new files into a fresh staging folder and then swaps them in, so the folder
ends up holding exactly what this run wrote: nothing of an earlier run is left beside it (a figure
of a category that is gone, a table of an old improvement run), and a run that fails half-way
leaves the folder as it was.

What counts as the toolkit's own: each run records the files it wrote, with their sha256, in
`.clipfail-manifest.json` in the folder. A file listed there and still unchanged is replaced or
removed by the next run. Anything else in the folder (a user's notes.txt, a file edited since it
was written, a folder written by an older clipfail without a manifest, a symlink) is "foreign":
the command then refuses, before it writes anything, with a message that lists those files. It
never deletes or moves them, and never copies them around.

The staging folder (`.clipfail-staging-*`) and the folder of the replaced files
(`.clipfail-old-*`) are created inside the output folder itself: on the same filesystem (each
swap is a rename), with no write access needed beyond the output folder, and the output folder
keeps its identity (`--out .`, a mount point or a symlinked folder work). Each is locked while its
run lives (toolkit.staging): leftovers of a run that was killed are removed by the next run before it
writes, and a folder that another live run holds is left alone (never swept up with the old files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolkit import staging as staging_mod
from toolkit.errors import UserError, list_offenders
from toolkit.store.paths import sha256_file
from toolkit.userfiles import read_bytes

MANIFEST = ".clipfail-manifest.json"
STAGING_PREFIX = ".clipfail-staging-"
OLD_PREFIX = ".clipfail-old-"


def _read_manifest(folder: Path, what: str | None) -> tuple[dict[str, str], set[str]]:
    """The files and folders that the manifest vouches for: none if it is missing, unreadable, or
    written by another command (a report never removes an analysis that shares its folder)."""
    try:
        # a FIFO in the manifest's place is not opened (it would block); it is then foreign (foreign_files)
        data = json.loads(read_bytes(folder / MANIFEST, "The manifest").decode("utf-8"))
        if what is not None and data.get("what") != what:
            return {}, set()
        files = {str(k): str(v) for k, v in dict(data.get("files", {})).items()}
        dirs = {str(d) for d in data.get("dirs", [])}
        return files, dirs
    except (UserError, OSError, ValueError, TypeError, AttributeError):
        return {}, set()


def _is_ours_temp(name: str) -> bool:
    return name.startswith((STAGING_PREFIX, OLD_PREFIX, staging_mod.NEW_PREFIX))


def foreign_files(folder: Path, what: str | None = None) -> list[str]:
    """Paths (relative to folder, '/'-separated) that the manifest (of command `what`) does not vouch for."""
    folder = Path(folder)
    if not folder.exists():
        return []
    files, dirs = _read_manifest(folder, what)
    foreign: list[str] = []

    def walk(current: Path, rel: str) -> None:
        with os.scandir(current) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = f"{rel}{entry.name}"
            if not rel and _is_ours_temp(entry.name):
                continue
            if not rel and entry.name == MANIFEST and entry.is_file(follow_symlinks=False):
                continue
            if entry.is_symlink():
                foreign.append(name)
            elif entry.is_dir(follow_symlinks=False):
                before = len(foreign)
                n_inside = sum(1 for _ in os.scandir(entry.path))
                walk(Path(entry.path), name + "/")
                if n_inside == 0 and name not in dirs and len(foreign) == before:
                    foreign.append(name + "/")
            elif entry.is_file(follow_symlinks=False):
                expected = files.get(name)
                if expected is None or sha256_file(Path(entry.path)) != expected:
                    foreign.append(name)
            else:  # a FIFO, socket or device
                foreign.append(name)

    walk(folder, "")
    return foreign


class FreshFolder:
    """Stage a command's output and swap it into `out_dir`.

    with FreshFolder(out_dir, "report") as fresh:
        write files under fresh.staging
        fresh.commit()      # out_dir now holds exactly those files
    Leaving the block without commit() (an error) removes the staging folder; out_dir is untouched.
    """

    def __init__(self, out_dir: str | Path, what: str = "output", option: str = "--out"):
        self.out_dir = Path(out_dir)
        self.what = what
        self.option = option
        self.staging: Path | None = None
        self._stage: staging_mod.Staging | None = None

    def _refuse_foreign(self) -> None:
        try:
            foreign = foreign_files(self.out_dir, self.what)
        except OSError as exc:
            raise UserError(f"Cannot read the {self.what} folder {self.out_dir}: {exc.strerror or exc}.") from None
        if foreign:
            raise UserError(
                f"The {self.what} folder {self.out_dir} holds files that clipfail did not write there, or that "
                f"changed since it wrote them: {list_offenders(foreign)}. A new {self.what} replaces everything in "
                f"the folder, so these would be lost. Move them out of {self.out_dir} (or give another "
                f"{self.option}) and run again."
            )

    def __enter__(self) -> FreshFolder:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"{self.out_dir} is a file, not a folder. Give {self.option} a folder.")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"Cannot create the {self.what} folder {self.out_dir}: {exc.strerror or exc}. "
                f"Give {self.option} a folder that you can write to."
            ) from None
        self._refuse_foreign()
        staging_mod.remove_stale(self.out_dir, (STAGING_PREFIX, OLD_PREFIX))  # a killed run's; never a live run's
        try:
            self._stage = staging_mod.make(self.out_dir, STAGING_PREFIX)
            self.staging = self._stage.path
        except OSError as exc:
            raise UserError(
                f"Cannot write into the {self.what} folder {self.out_dir}: {exc.strerror or exc}. "
                f"Give {self.option} a folder that you can write to."
            ) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._stage is not None:
            self._stage.remove()
            self._stage = None
        self.staging = None

    def final(self, path: str | Path) -> Path:
        """Where a file written under the staging folder will be once committed."""
        return self.out_dir / Path(path).relative_to(self.staging)

    def commit(self) -> None:
        """Record the manifest and swap the staged files in (the folder's earlier contents go)."""
        staging = self.staging
        files, dirs = {}, []
        for root, dirnames, filenames in os.walk(staging):
            rel_root = Path(root).relative_to(staging)
            for d in dirnames:
                dirs.append((rel_root / d).as_posix())
            for f in filenames:
                if rel_root == Path(".") and f == staging_mod.LOCK_NAME:
                    continue
                files[(rel_root / f).as_posix()] = sha256_file(Path(root) / f)
        manifest = {"what": self.what, "files": dict(sorted(files.items())), "dirs": sorted(dirs)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        self._refuse_foreign()  # again: something may have appeared while the files were written

        try:
            old = staging_mod.make(self.out_dir, OLD_PREFIX)
        except OSError as exc:
            raise UserError(f"Cannot write into {self.out_dir}: {exc.strerror or exc}.") from None
        trash = old.path
        moved_old: list[str] = []
        moved_new: list[str] = []
        try:
            for entry in sorted(os.listdir(self.out_dir)):
                if _is_ours_temp(entry):  # this run's folders, and another live run's (stale ones are gone)
                    continue
                os.rename(self.out_dir / entry, trash / entry)
                moved_old.append(entry)
            for entry in sorted(os.listdir(staging)):
                if entry == staging_mod.LOCK_NAME:
                    continue
                os.rename(staging / entry, self.out_dir / entry)
                moved_new.append(entry)
        except OSError as exc:
            for entry in moved_new:  # put the folder back as it was
                os.rename(self.out_dir / entry, staging / entry)
            for entry in moved_old:
                os.rename(trash / entry, self.out_dir / entry)
            old.remove()
            raise UserError(
                f"Could not swap the new {self.what} into {self.out_dir} ({exc.strerror or exc}); the folder is "
                "as it was. Check that nothing else is using it and run again."
            ) from None
        old.remove()
        self._stage.remove()
        self._stage = None
        self.staging = None
