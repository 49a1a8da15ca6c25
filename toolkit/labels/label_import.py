"""Import annotators' filled-in label CSVs into `annotations`.

`import_labels(con, files, annotator=None)` reads the CSVs that `sample-failures` exported
(`assign_<annotator>.csv`, `assign_overlap.csv`) after people filled in `category` (and maybe
`notes`), checks every row, and writes the labels in one transaction.

Whose labels (per row, first that applies):
1. `annotator=` (the CLI's `--annotator`), for every row of every file. A file's `annotator`
   column, where filled, must then say the same.
2. The file's `annotator` column, where filled.
3. The file name: `assign_B.csv` -> B. Copies that spreadsheets or people rename, such as
   `assign_B (1).csv` or `assign_B_final.csv`, work too when the part after `assign_` starts with
   an annotator name of the sample. `assign_overlap.csv` names nobody: every annotator labels the
   overlap set, so it needs an `annotator` column or the option.
Names are matched to the sample's annotators ignoring case (`b` -> B).

Reading is lenient about what spreadsheet programs do when they re-save a file: a UTF-8 BOM (or
none), UTF-16 ("Unicode text"), Windows-1252 (only for a file with no UTF-8 in it; a UTF-8 file
with a stray byte is refused with its row and byte offset), CRLF or LF line ends, `,` `;` or tab separators
(the one under which the header has a `sample_id` column, or the one an Excel `sep=` line
names), quoted fields with separators, quotes and newlines, extra, missing optional or
reordered columns, header case and spaces (`Sample ID`), and trailing empty rows. The label
column is `category` (or `label`).

Labels go through the taxonomy (`toolkit.labels.taxonomy.Taxonomy.resolve`): case, spaces, plurals and
aliases; a label naming two categories (`Object; Attribute`, `Object/Attribute`) becomes a
primary and a secondary category, the first named being primary. A blank label is counted as
unlabeled and not imported.

Checks: unknown categories, sample ids that are not in the failure sample, samples not assigned
to the row's annotator (overlap samples are assigned to every annotator of their sample), rows
for the same sample and annotator twice, unreadable sample ids. All problems of all files are
collected and reported together in one UserError, by spreadsheet row number (the header is row
1, the first data row is row 2, a caption with a line break is still one row). Nothing is
imported if any file has a problem.

Writing: a labelled row replaces that annotator's label for that sample. One transaction deletes
the stored labels of every (sample, annotator) that the files label, and inserts the new ones, so
a re-import replaces labels and never duplicates them. A blank row leaves a stored label alone,
so that importing an unfilled copy by mistake destroys nothing; `clear_blank=True` (the CLI's
`--clear-blank`) makes blank rows remove stored labels instead. Importing files whose labels are
already stored exactly as they are is a no-op that records nothing.

The same checks and writing serve the other ways labels arrive: `save_label` stores one label in
its own transaction (the browser workbench, toolkit.labels.workbench), and toolkit.labels.labelstudio imports
Label Studio's JSON export through `_write_labels`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from toolkit.errors import UserError
from toolkit.labels.taxonomy import LabelError, Taxonomy
from toolkit.store import db
from toolkit.userfiles import read_bytes

STAGE = "import-labels"
RESERVED_SETS = ("overlap", "backup")
DELIMITERS = (",", ";", "\t")
# Accepted header spellings (after lower-casing and turning spaces and hyphens into "_").
COLUMN_NAMES = {
    "sample_id": ("sample_id", "sampleid"),
    "category": ("category", "label"),
    "notes": ("notes", "note", "comment", "comments"),
    "annotator": ("annotator",),
}
MAX_LISTED = 30  # problems listed in the error message; the count says how many more


@dataclass
class FileSummary:
    path: str
    annotators: list[str]
    n_rows: int = 0  # data rows with a sample id
    n_labelled: int = 0  # rows with a label (imported)
    n_unlabeled: int = 0  # rows with a blank label (not imported)
    n_secondary: int = 0  # labels that named two categories
    n_replaced: int = 0  # labelled rows whose sample already had a label from that annotator
    n_cleared: int = 0  # stored labels removed because the row is blank now (clear_blank)
    n_kept: int = 0  # blank rows whose stored label was kept (without clear_blank)
    encoding: str = "utf-8"  # what the file was read as (utf-8, utf-16 or cp1252)


@dataclass
class ImportResult:
    run_id: int | None  # the import run that wrote the rows (the earlier one for a no-op)
    is_noop: bool
    files: list[FileSummary] = field(default_factory=list)
    retrieval_run_ids: list[int] = field(default_factory=list)

    @property
    def n_labelled(self) -> int:
        return sum(f.n_labelled for f in self.files)

    @property
    def n_unlabeled(self) -> int:
        return sum(f.n_unlabeled for f in self.files)

    @property
    def n_replaced(self) -> int:
        return sum(f.n_replaced for f in self.files)

    @property
    def n_cleared(self) -> int:
        return sum(f.n_cleared for f in self.files)

    @property
    def n_kept(self) -> int:
        return sum(f.n_kept for f in self.files)


@dataclass
class _Row:
    row_number: int  # as a spreadsheet shows it (header = 1)
    sample_id: int
    annotator: str
    raw_label: str
    category: str | None
    secondary_category: str | None
    notes: str | None


@dataclass
class _ParsedFile:
    path: Path
    sha256: str
    rows: list[_Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "row N: ..." or a whole-file message
    has_label_errors: bool = False
    encoding: str = "utf-8"


@dataclass
class _SampleInfo:
    """What validation needs to know about the failure samples in the database."""

    set_name: dict[int, str]  # sample_id -> set
    run_of: dict[int, int]  # sample_id -> retrieval_run_id
    annotators: dict[int, list[str]]  # retrieval_run_id -> annotator names of its sample

    @classmethod
    def load(cls, con) -> _SampleInfo:
        samples = con.execute("SELECT sample_id, retrieval_run_id, set_name, run_id FROM failure_samples").fetchall()
        if not samples:
            raise UserError(
                "The database has no failure sample to attach labels to. Run clipfail sample-failures first "
                "(and check --db)."
            )
        set_name = {int(s): str(n) for s, _, n, _ in samples}
        run_of = {int(s): int(r) for s, r, _, _ in samples}
        annotators: dict[int, list[str]] = {}
        for _, rrid, name, _ in samples:
            if name not in RESERVED_SETS:
                annotators.setdefault(int(rrid), [])
                if name not in annotators[int(rrid)]:
                    annotators[int(rrid)].append(name)
        # Annotators with no set of their own (per-annotator 0) still label the overlap set:
        # take them from the sample-failures run's config when it lists them.
        sample_runs = {(int(r), int(run)) for _, r, _, run in samples}
        for rrid, run in sorted(sample_runs):
            row = con.execute("SELECT config_json FROM runs WHERE run_id = ?", [run]).fetchone()
            try:
                listed = json.loads(row[0]).get("annotators", []) if row else []
            except (ValueError, AttributeError):
                listed = []
            for name in listed:
                if isinstance(name, str) and name not in annotators.setdefault(rrid, []):
                    annotators[rrid].append(name)
        return cls(set_name, run_of, annotators)

    @property
    def all_annotators(self) -> list[str]:
        out: list[str] = []
        for names in self.annotators.values():
            out += [n for n in names if n not in out]
        return sorted(out)


def assignment_problem(info: _SampleInfo, sample_id: int, annotator: str) -> str | None:
    """Why `annotator` may not label `sample_id` (None if they may): the sample must be in the failure
    sample, and in the annotator's own set or the overlap set of its retrieval run."""
    if sample_id not in info.set_name:
        return f"sample {sample_id} is not in the failure sample"
    set_name = info.set_name[sample_id]
    rrid = info.run_of[sample_id]
    if set_name == "overlap":
        if annotator not in info.annotators.get(rrid, []):
            return (
                f"sample {sample_id} is in the overlap set of retrieval run {rrid}, whose "
                f"annotators are {', '.join(info.annotators.get(rrid, [])) or 'none'}, not {annotator}"
            )
    elif set_name != annotator:
        whose = "the backup set (assigned to nobody)" if set_name == "backup" else f"{set_name}'s set"
        return f"sample {sample_id} is in {whose}, not {annotator}'s"
    return None


def canonical_annotator(info: _SampleInfo, name: str) -> str | None:
    """The sample's spelling of an annotator name given in any case (None if no annotator has it)."""
    for k in info.all_annotators:
        if k.lower() == str(name).strip().lower():
            return k
    return None


# ---------------------------------------------------------------------------------------------
# Reading one file


ENCODING_NAMES = {"utf-8": "UTF-8", "utf-16": "UTF-16", "cp1252": "Windows-1252"}


def _decode(data: bytes, path: Path) -> tuple[str, str]:
    """The file's text and the encoding it was read in ('utf-8', 'utf-16' or 'cp1252').

    UTF-8 (with or without a BOM) and UTF-16 with a BOM are read as they are. A file that is not
    UTF-8 is read as Windows-1252 (what Excel's "CSV" writes on Windows) only when it holds no valid
    UTF-8 multi-byte character and decodes cleanly in Windows-1252: a UTF-8 file with a stray byte
    would otherwise have every accented letter garbled. Such a file, or one that decodes in neither,
    is refused with the row and byte offset of the first bad byte."""
    if data.startswith(codecs.BOM_UTF16_LE) or data.startswith(codecs.BOM_UTF16_BE):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path} starts as UTF-16 text but has broken bytes at byte offset {exc.start}. Save it again "
                "from the spreadsheet (CSV UTF-8) and import that."
            ) from None
    if data.startswith(b"PK\x03\x04"):
        raise UserError(
            f"{path} is a zip archive, probably a spreadsheet workbook (.xlsx or .ods), not a CSV. "
            "Open it and save it as CSV (File > Save As > CSV), then import the .csv."
        )
    if data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        raise UserError(f"{path} is an old Excel workbook (.xls), not a CSV. Save it as CSV and import that.")
    if b"\x00" in data[:8192]:
        raise UserError(f"{path} is not a text CSV file (it holds binary data). Give the CSV that you filled in.")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8").lstrip("\ufeff"), "utf-8"
    except UnicodeDecodeError as exc:
        bad = bom + exc.start  # an offset in the file, BOM included
    row = data[:bad].count(b"\n") + 1
    where = f"row {row} (byte offset {bad}: 0x{data[bad]:02x})"
    if _utf8_chars(data) > 0:
        raise UserError(
            f"{path} is UTF-8 text with a byte that is not UTF-8 at {where}. Reading the whole file in another "
            "encoding would garble its other accented letters. Fix or retype that cell (or save the file "
            "again as CSV UTF-8) and import it again."
        )
    try:
        # Excel's "CSV (Comma delimited)" on Windows writes the ANSI code page.
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path} is neither UTF-8 nor Windows-1252 text (row {row}, byte offset {exc.start}: "
            f"0x{data[exc.start]:02x}). Save it from the spreadsheet as CSV UTF-8 and import that."
        ) from None


def _utf8_chars(data: bytes) -> int:
    """How many valid UTF-8 multi-byte characters the bytes hold (a stray byte does not count)."""
    n = 0
    for m in re.finditer(rb"[\xc2-\xf4][\x80-\xbf]{1,3}", data):
        try:
            m.group().decode("utf-8")
            n += 1
        except UnicodeDecodeError:
            pass
    return n


def norm_header(name: str) -> str:
    """A header cell as the column names are matched: lower case, spaces and hyphens as '_'."""
    s = str(name).replace("\ufeff", "").strip().strip('"').strip().lower()
    return re.sub(r"[\s\-]+", "_", s)


def _records(text: str, delimiter: str):
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)


def _pick_delimiter(text: str, path: Path, only: str | None = None) -> tuple[str, list[str]]:
    """The separator under which the header has a sample_id column, and that header."""
    best = None
    for delim in [only] if only else DELIMITERS:
        try:
            header = next(_records(text, delim), [])
        except csv.Error:
            continue
        names = [norm_header(h) for h in header]
        has_id = any(n in COLUMN_NAMES["sample_id"] for n in names)
        key = (has_id, len(names))
        if best is None or key > best[0]:
            best = (key, delim, header)
    if best is None or not best[0][0]:
        shown = ", ".join(repr(h) for h in (best[2] if best else [])[:8]) or "none"
        raise UserError(
            f"{path} has no sample_id column (its first line has: {shown}), so it is not a label file that "
            "clipfail sample-failures exported. Import the assign_<annotator>.csv files, with their header row."
        )
    return best[1], best[2]


def _column_index(header: list[str], path: Path, require_category: bool = True) -> dict[str, int]:
    names = [norm_header(h) for h in header]
    index: dict[str, int] = {}
    for key, spellings in COLUMN_NAMES.items():
        hits = [i for i, n in enumerate(names) if n in spellings]
        if len(hits) > 1:
            cols = ", ".join(f"{header[i]!r} (column {i + 1})" for i in hits)
            raise UserError(f"{path} has {len(hits)} {key} columns: {cols}. Keep one and import again.")
        if hits:
            index[key] = hits[0]
    if require_category and "category" not in index:
        shown = ", ".join(repr(h) for h in header[:20])
        raise UserError(
            f"{path} has no category column (columns: {shown}). Put each label in a column named 'category', "
            "as in the exported file."
        )
    return index


def parse_sample_id(text: str) -> int | None:
    s = text.strip().lstrip("'")
    if re.fullmatch(r"[+]?\d+", s):
        return int(s)
    if re.fullmatch(r"[+]?\d+\.0*", s):  # a spreadsheet that turned 12 into 12.0
        return int(s.split(".")[0])
    return None


def _file_annotator(path: Path, known: list[str]) -> tuple[str | None, str | None]:
    """(annotator, None) from the file name, or (None, why not)."""
    m = re.match(r"(?i)assign_(.+)$", path.stem)
    if not m:
        return None, f"its name {path.name!r} is not assign_<annotator>.csv"
    rest = m.group(1).strip()
    if rest.lower().startswith("overlap"):
        return None, "it is the overlap set, which every annotator labels"
    if rest.lower().startswith("backup"):
        return None, "it is the backup set, which is assigned to nobody"
    # Longest known name that the rest starts with, followed by nothing or a non-name character.
    for name in sorted(known, key=len, reverse=True):
        if rest.lower() == name.lower():
            return name, None
    for name in sorted(known, key=len, reverse=True):
        if rest.lower().startswith(name.lower()) and not re.match(r"[A-Za-z0-9]", rest[len(name)]):
            return name, None
    return None, (
        f"{rest!r} (from the file name {path.name!r}) is not an annotator of the sample ({', '.join(known) or 'none'})"
    )


@dataclass
class LabelTable:
    """A label CSV as import-labels reads it: its header, the columns it recognises, its records."""

    path: Path
    sha256: str
    header: list[str]
    columns: dict[str, int]  # key of COLUMN_NAMES -> column index
    records: list[list[str]]  # the data records (after the header), as csv gives them
    encoding: str = "utf-8"  # what the bytes were read as: utf-8, utf-16 or cp1252


def read_label_table(path: Path, require_category: bool = True, data: bytes | None = None) -> LabelTable:
    """Read a label CSV the way import-labels does (encodings, separators, `sep=` line, header
    spellings). Anything that import-labels would refuse for the whole file raises UserError.
    `data`: the file's bytes, where the caller read them already (toolkit.userfiles.read_bytes).

    sample-failures uses it too, to tell whether an export holds labels before it writes over it."""
    path = Path(path)
    if data is None:
        if not path.exists():
            raise UserError(f"{path} does not exist. Check the path (give the filled-in assign_<annotator>.csv files).")
        if path.is_dir():
            raise UserError(
                f"{path} is a folder, not a CSV file. Give the CSV files inside it, e.g. {path}/assign_A.csv."
            )
        # a FIFO or a device is refused before it is opened (it would block, or never end)
        data = read_bytes(path, "Label file", "Give the filled-in assign_<annotator>.csv files.")
    text, encoding = _decode(data, path)
    if not text.strip():
        raise UserError(f"{path} is empty. Fill in the exported file and import that.")
    # Excel's "sep=;" hint line: Excel hides it and shows the header as row 1, so do we.
    first, _, after = text.partition("\n")
    hint = re.fullmatch(r'"?sep=(.)"?', first.rstrip("\r"))
    if hint:
        text = after
    delim, header = _pick_delimiter(text, path, only=hint.group(1) if hint else None)
    col = _column_index(header, path, require_category=require_category)
    try:
        records = list(_records(text, delim))
    except csv.Error as exc:
        raise UserError(f"{path} is not a readable CSV ({exc}). Save it again as CSV from the spreadsheet.") from None
    return LabelTable(path, hashlib.sha256(data).hexdigest(), header, col, records[1:], encoding)


def _row_annotator(written: str, option_name, from_name, why_not, canonical, known) -> tuple[str | None, str | None]:
    """Whose label a row is: (annotator, None), or (None, the problem). --annotator wins (a different name in the
    row's annotator column is a problem), then the annotator column, then the name in the file's name."""
    if option_name is not None:
        if written and canonical(written) != option_name:
            return None, f"the annotator column says {written!r} but --annotator says {option_name}"
        return option_name, None
    if written:
        annotator = canonical(written)
        if annotator is None:
            return None, f"annotator {written!r} is not an annotator of the sample ({', '.join(known)})"
        return annotator, None
    if from_name is not None:
        return from_name, None
    return None, f"the annotator column is blank ({why_not})"


def _read_file(path: Path, option: str | None, info: _SampleInfo, tax: Taxonomy, seen: dict) -> _ParsedFile:
    """Parse and check one file. File-level problems raise UserError; row problems are collected."""
    table = read_label_table(path)
    parsed = _ParsedFile(path=path, sha256=table.sha256, encoding=table.encoding)
    col = table.columns
    known = info.all_annotators

    def canonical(name: str) -> str | None:
        for k in known:
            if k.lower() == name.strip().lower():
                return k
        return None

    option_name = None
    if option is not None:
        option_name = canonical(option)
        if option_name is None:
            raise UserError(
                f"--annotator {option!r} is not an annotator of any failure sample (known: {', '.join(known)})."
            )
    from_name, why_not = _file_annotator(path, known)
    if option_name is None and "annotator" not in col and from_name is None:
        raise UserError(
            f"Cannot tell whose labels are in {path}: {why_not}. Give --annotator NAME "
            f"(one of {', '.join(known)}) or add an 'annotator' column."
        )

    n_data = 0
    for index, record in enumerate(table.records):
        row_number = index + 2
        cells = [c.strip() for c in record]
        if not any(cells):
            continue  # an empty row, as spreadsheets leave at the end

        def cell(key: str, cells=cells) -> str:
            i = col.get(key)
            return cells[i] if i is not None and i < len(cells) else ""

        n_data += 1
        raw_id, raw_label = cell("sample_id"), cell("category")
        if not raw_id:
            parsed.problems.append(f"row {row_number}: the sample_id is blank")
            continue
        sample_id = parse_sample_id(raw_id)
        if sample_id is None:
            parsed.problems.append(f"row {row_number}: sample_id {raw_id!r} is not a whole number")
            continue

        annotator, problem = _row_annotator(cell("annotator"), option_name, from_name, why_not, canonical, known)
        if problem:
            parsed.problems.append(f"row {row_number}: {problem}")
            continue

        # Is the sample there, and this annotator's to label?
        problem = assignment_problem(info, sample_id, annotator)
        if problem:
            parsed.problems.append(f"row {row_number}: {problem}")
            continue

        key = (sample_id, annotator)
        if key in seen:
            first_path, first_row = seen[key]
            where = f"row {first_row}" if first_path == path else f"row {first_row} of {first_path}"
            parsed.problems.append(
                f"row {row_number}: sample {sample_id} is labelled by {annotator} twice (also at {where})"
            )
            continue
        seen[key] = (path, row_number)

        try:
            category, secondary = tax.resolve(raw_label)
        except LabelError as exc:
            # The taxonomy's message ends with the list of categories; the summary gives it once.
            parsed.problems.append(f"row {row_number}: {str(exc).split('; known categories')[0]}")
            parsed.has_label_errors = True
            continue
        notes = cell("notes") or None
        parsed.rows.append(_Row(row_number, sample_id, annotator, raw_label, category, secondary, notes))

    if n_data == 0 and not parsed.problems:
        raise UserError(f"{path} has a header but no rows. Import the file that holds the samples and their labels.")
    return parsed


def _format_problems(parsed: list[_ParsedFile], file_errors: list[str], tax: Taxonomy) -> str:
    n_problems = len(file_errors) + sum(len(p.problems) for p in parsed)
    n_files = len(file_errors) + sum(1 for p in parsed if p.problems)
    lines = [
        f"Nothing was imported: {n_problems} problem{'s' if n_problems != 1 else ''} in {n_files} "
        f"file{'s' if n_files != 1 else ''}. Row numbers are as a spreadsheet shows them (the header is row 1)."
    ]
    listed = 0
    for msg in file_errors:
        lines.append(f"  {msg}")
        listed += 1
    for p in parsed:
        if not p.problems:
            continue
        lines.append(f"  {p.path}:")
        for msg in p.problems:
            if listed >= MAX_LISTED:
                break
            lines.append(f"    {msg}")
            listed += 1
    if n_problems > listed:
        lines.append(f"  ... and {n_problems - listed} more.")
    if any(p.has_label_errors for p in parsed):
        lines.append(
            f"Known categories: {', '.join(tax.names)}. A label may name two, as 'Primary; Secondary'. "
            "See the aliases with clipfail categories list; add one with clipfail categories add-alias."
        )
    lines.append("Fix these and import again.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Import


def import_labels(
    con, files, annotator: str | None = None, simulated: bool = False, clear_blank: bool = False
) -> ImportResult:
    """Check every file, then write all their labels in one transaction (or nothing).

    A blank row leaves a label stored earlier for that sample and annotator as it is (so that
    importing an unfilled copy by mistake destroys nothing); with clear_blank it removes it.
    """
    started = db.now()
    paths = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not paths:
        raise UserError("Give at least one CSV file to import.")
    annotator = annotator.strip() if isinstance(annotator, str) and annotator.strip() else None
    info = _SampleInfo.load(con)
    tax = Taxonomy.load(con)

    parsed: list[_ParsedFile] = []
    file_errors: list[str] = []
    seen: dict = {}
    resolved_paths = []
    for path in paths:
        full = path.resolve() if path.exists() else path
        if full in resolved_paths:
            file_errors.append(f"{path} is given twice; give each file once.")
            continue
        resolved_paths.append(full)
        try:
            parsed.append(_read_file(path, annotator, info, tax, seen))
        except UserError as exc:
            file_errors.append(str(exc))
    if file_errors or any(p.problems for p in parsed):
        if len(file_errors) == 1 and not any(p.problems for p in parsed):
            first = file_errors[0].rstrip()
            raise UserError(f"{first}{'' if first.endswith(('.', '!', '?')) else '.'} Nothing was imported.")
        raise UserError(_format_problems(parsed, file_errors, tax))

    config = {
        "files": [{"path": str(p.path.resolve()), "sha256": p.sha256} for p in parsed],
        "annotator": annotator,
        "simulated": bool(simulated),
        "clear_blank": bool(clear_blank),
    }
    return _write_labels(con, parsed, info, config, started, simulated=simulated, clear_blank=clear_blank)


def _write_labels(
    con, parsed: list[_ParsedFile], info: _SampleInfo, config: dict, started, *, simulated: bool, clear_blank: bool
) -> ImportResult:
    """Write the checked rows of `parsed` in one transaction (one import run), with import-labels' replace
    rules; a no-op when every label is already stored exactly as it is."""
    # Everything checked: build the rows and compare with what is stored.
    records = []
    for p in parsed:
        source = str(p.path.resolve())
        for r in p.rows:
            records.append(
                {
                    "file_index": parsed.index(p),
                    "sample_id": r.sample_id,
                    "annotator": r.annotator,
                    "raw_label": r.raw_label,
                    "category": r.category,
                    "secondary_category": r.secondary_category,
                    "notes": r.notes,
                    "source_file": source,
                    "is_simulated": bool(simulated),
                }
            )
    cols = ["file_index", "sample_id", "annotator", "raw_label", "category", "secondary_category", "notes"]
    cols += ["source_file", "is_simulated"]
    rows = pd.DataFrame.from_records(records, columns=cols)
    rows["sample_id"] = rows["sample_id"].astype("int64")
    # The (sample, annotator) pairs this import decides: the labelled rows, and with
    # clear_blank also the blank ones (whose stored labels are then removed).
    in_scope = rows if clear_blank else rows[rows["category"].notna()]
    keys = in_scope[["sample_id", "annotator"]].drop_duplicates().reset_index(drop=True)
    all_stored = _stored_labels(con, rows[["sample_id", "annotator"]])
    stored_keys = set(zip(all_stored["sample_id"], all_stored["annotator"]))
    scope_keys = set(zip(keys["sample_id"], keys["annotator"]))
    in_keys = [k in scope_keys for k in zip(all_stored["sample_id"], all_stored["annotator"])]
    stored = all_stored.loc[pd.Series(in_keys, index=all_stored.index, dtype=bool)]

    summaries = []
    for i, p in enumerate(parsed):
        mine = rows[rows["file_index"] == i]
        labelled = mine[mine["category"].notna()]
        blank = mine[mine["category"].isna()]
        blank_stored = sum((s, a) in stored_keys for s, a in zip(blank["sample_id"], blank["annotator"]))
        summaries.append(
            FileSummary(
                path=str(p.path),
                annotators=sorted(set(mine["annotator"])),
                n_rows=len(mine),
                n_labelled=len(labelled),
                n_unlabeled=len(blank),
                n_secondary=int(labelled["secondary_category"].notna().sum()),
                n_replaced=sum((s, a) in stored_keys for s, a in zip(labelled["sample_id"], labelled["annotator"])),
                n_cleared=blank_stored if clear_blank else 0,
                n_kept=0 if clear_blank else blank_stored,
                encoding=p.encoding,
            )
        )
    info_runs = sorted({info.run_of[int(s)] for s in rows["sample_id"]})

    new = rows[rows["category"].notna()].drop(columns=["file_index"]).reset_index(drop=True)
    if _same_as_stored(new, stored):
        run_id = int(stored["run_id"].max()) if len(stored) else None
        for s in summaries:
            s.n_replaced = s.n_cleared = 0
        return ImportResult(run_id=run_id, is_noop=True, files=summaries, retrieval_run_ids=info_runs)

    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, config, started)
        replace_labels(con, keys, new, run_id)
    return ImportResult(run_id=run_id, is_noop=False, files=summaries, retrieval_run_ids=info_runs)


def replace_labels(con, keys: pd.DataFrame, new: pd.DataFrame, run_id: int) -> None:
    """Inside the caller's transaction: delete the stored labels of `keys` (sample_id, annotator) and insert
    `new` (annotation columns without imported_at / run_id) as written by run `run_id`."""
    con.register("_clipfail_label_keys", keys)
    try:
        con.execute(
            "DELETE FROM annotations USING _clipfail_label_keys k "
            "WHERE annotations.sample_id = k.sample_id AND annotations.annotator = k.annotator"
        )
    finally:
        con.unregister("_clipfail_label_keys")
    new = new.copy()
    new["imported_at"] = db.now()
    new["run_id"] = run_id
    db.insert_df(con, "annotations", new)


def _stored_labels(con, keys: pd.DataFrame) -> pd.DataFrame:
    con.register("_clipfail_label_keys", keys.drop_duplicates().reset_index(drop=True))
    try:
        return con.execute(
            """
            SELECT a.sample_id, a.annotator, a.raw_label, a.category, a.secondary_category, a.notes,
                   a.source_file, a.is_simulated, a.run_id
            FROM annotations a
            JOIN _clipfail_label_keys k ON k.sample_id = a.sample_id AND k.annotator = a.annotator
            """
        ).df()
    finally:
        con.unregister("_clipfail_label_keys")


def _same_as_stored(new: pd.DataFrame, stored: pd.DataFrame) -> bool:
    """True if the stored labels for these keys are exactly the new ones (nothing to add or remove)."""
    if len(new) != len(stored):
        return False
    cols = ["sample_id", "annotator", "raw_label", "category", "secondary_category", "notes", "source_file"]

    def canon(df):
        recs = []
        for rec in df[cols + ["is_simulated"]].itertuples(index=False):
            texts = tuple(None if v is None or pd.isna(v) else str(v) for v in rec[1:-1])
            recs.append((int(rec[0]),) + texts + (bool(rec[-1]),))
        return sorted(recs, key=repr)

    return canon(new) == canon(stored)


# ---------------------------------------------------------------------------------------------
# One label at a time (the browser workbench, `clipfail annotate`)


@dataclass
class SavedLabel:
    sample_id: int
    annotator: str
    action: str  # 'saved' (new), 'replaced', 'unchanged', 'cleared', 'absent' (clear of nothing)
    category: str | None = None
    secondary_category: str | None = None
    notes: str | None = None


def save_label(
    con,
    sample_id: int,
    annotator: str,
    label: str | None,
    notes: str | None,
    *,
    run_id: int,
    source_file: str,
    info: _SampleInfo | None = None,
    tax: Taxonomy | None = None,
) -> SavedLabel:
    """Validate one label as import-labels does and store it in its own transaction.

    The annotator must be one of the sample's (any case), the sample theirs or the overlap set's,
    and the label resolve through the taxonomy ('Object' or 'Object; Attribute' for a secondary
    category). Like an import, it replaces that annotator's stored label for the sample; storing
    the same label again writes nothing. A blank label removes the stored one (as --clear-blank).
    Raises UserError (LabelError for an unknown category) and writes nothing on a problem.
    """
    info = info or _SampleInfo.load(con)
    tax = tax or Taxonomy.load(con)
    name = canonical_annotator(info, annotator)
    if name is None:
        raise UserError(
            f"{annotator!r} is not an annotator of any failure sample (known: {', '.join(info.all_annotators)})."
        )
    sample_id = int(sample_id)
    problem = assignment_problem(info, sample_id, name)
    if problem:
        raise UserError(problem[0].upper() + problem[1:] + ".")
    raw = (label or "").strip()
    category, secondary = tax.resolve(raw)
    notes = notes.strip() if isinstance(notes, str) and notes.strip() else None
    key = pd.DataFrame({"sample_id": pd.Series([sample_id], dtype="int64"), "annotator": [name]})
    with db.transaction(con):
        stored = _stored_labels(con, key)
        if category is None:
            if stored.empty:
                return SavedLabel(sample_id, name, "absent")
            con.execute("DELETE FROM annotations WHERE sample_id = ? AND annotator = ?", [sample_id, name])
            return SavedLabel(sample_id, name, "cleared")
        new = pd.DataFrame.from_records(
            [
                {
                    "sample_id": sample_id,
                    "annotator": name,
                    "raw_label": raw,
                    "category": category,
                    "secondary_category": secondary,
                    "notes": notes,
                    "source_file": source_file,
                    "is_simulated": False,
                }
            ]
        )
        new["sample_id"] = new["sample_id"].astype("int64")
        action = "unchanged" if _same_as_stored(new, stored) else ("replaced" if len(stored) else "saved")
        if action != "unchanged":
            replace_labels(con, key, new, run_id)
    return SavedLabel(sample_id, name, action, category, secondary, notes)
