"""Sample R@1 failures for annotation: a seeded sample split into overlap / annotator / backup sets,
with CSVs and one picture per sample that annotators work from.

Method (documented, machine-independent):
1. The failures of a text-to-image retrieval run are its `retrieval_ranks` rows with
   `gt_rank > 1` (rank under the run's tie policy), sorted by caption id (`query_id`).
2. `numpy.random.default_rng(seed).choice(n_failures, size=n, replace=False)` draws n of them;
   the draw order is kept as `draw_order` 0..n-1.
3. The first `overlap` drawn form the overlap set (every annotator labels them, to measure
   agreement), the next `per_annotator` go to the first annotator, the next `per_annotator` to
   the second, and so on in the order the annotators are given; the rest are the backup set.

`failure_samples` holds one row per drawn caption. Re-running with the same configuration on the
same retrieval run changes nothing (missing export files are written again). A different
configuration needs `replace=True`, which is refused once any label was imported for the old
sample, so that no label is orphaned.

Exports (in `out_dir`): failure_samples.csv (every sample, with its set), assign_overlap.csv,
assign_<annotator>.csv, assign_backup.csv and README.txt for annotators. The CSVs are UTF-8 with
a BOM and CRLF line ends, quoted by Python's csv module (fields with commas, quotes or newlines
are quoted), so Excel and LibreOffice open them as they are. A cell that starts with `=`,
`+`, `-` or `@` (a caption, an image file name) is written with a leading `'` so that a spreadsheet
shows it as text instead of running it as a formula (toolkit.sheets; the exact text is in the
database).

An existing export that holds anything that writing over it would lose is never overwritten: a
re-run with the same sample keeps it, and a new sample is refused until the file is imported or
moved away. "Anything" is a non-blank cell in a column that import-labels reads (category/label,
notes/comment, annotator, in any of the header spellings it accepts: the same matching, from
toolkit.labels.label_import) or in a column that the export does not write. A file that cannot be read as
a CSV at all is refused rather than guessed about.

The files are written into a staging folder inside `out_dir` (`.clipfail-staging-*`) and renamed
into place only once all of them, pictures included, were written. A new sample's database rows are
committed only after that: if the folder cannot be written, or writing fails half-way, the database
keeps its earlier sample and the folder its earlier files. A run that is killed cannot remove its
staging folder; the next run removes every staging folder that no live run holds (toolkit.staging).

Pictures: `vis_<sample_id>.png`, 1500x600 px (see `PictureRenderer`).
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import csv
import importlib.util
import io
import os
import re
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from toolkit import staging
from toolkit.errors import UserError, list_offenders
from toolkit.labels.label_import import COLUMN_NAMES, norm_header, parse_sample_id, read_label_table
from toolkit.sheets import sheet_text
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store.runs import resolve_retrieval_run
from toolkit.userfiles import read_bytes

STAGE = "sample-failures"
METHOD = "v1: failures sorted by caption id; numpy default_rng(seed).choice(n_failures, n, replace=False)"
TOPN = 5  # retrieved images shown per sample (columns top1..top5)
RESERVED_SETS = ("overlap", "backup")
# What import-labels reads from a row besides its sample id (keys of annotations.COLUMN_NAMES, whose
# spellings it accepts: 'Category', 'label', 'Notes', 'comment', ...). A non-blank cell in one of these
# is a label, or part of one, and is never written over.
LABEL_KEYS = tuple(k for k in COLUMN_NAMES if k != "sample_id")
STAGING_PREFIX = ".clipfail-staging-"

PICTURE_SIZE = (1500, 600)  # width, height in pixels


@dataclass
class SampleResult:
    retrieval_run_id: int
    run_id: int
    is_noop: bool
    n_failures: int
    n: int
    seed: int
    set_sizes: dict[str, int]
    out_dir: Path
    written: list[str] = field(default_factory=list)  # files written this time
    kept: list[str] = field(default_factory=list)  # labelled CSVs left as they were
    n_pictures: int = 0  # pictures written this time
    missing_images: list[str] = field(default_factory=list)  # drawn as placeholders
    replaced_samples: int = 0  # rows of an earlier sample removed by replace=True
    removed_explain_runs: int = 0  # explain runs of that earlier sample, removed with it (they explained it)


def parse_annotators(value) -> list[str]:
    """'A,B,C' or ['A', 'B', 'C'] -> ['A', 'B', 'C'], validated as file-name-safe set names."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(x).strip() for x in items if str(x).strip()]
    if not names:
        raise UserError("Give at least one annotator, e.g. --annotators A,B,C.")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", n)]
    if bad:
        raise UserError(
            f"Annotator names become file names (assign_<name>.csv); use letters, digits, _ and -: {bad[0]!r}."
        )
    reserved = [n for n in names if n.lower() in RESERVED_SETS]
    if reserved:
        raise UserError(f"{reserved[0]!r} is a set name of its own; choose another annotator name.")
    lowered = [n.lower() for n in names]
    dups = sorted({n for n in names if lowered.count(n.lower()) > 1})
    if dups:
        raise UserError(f"Annotator names must differ (ignoring case): {', '.join(dups)}.")
    return names


def plan_sets(n: int, overlap: int, per_annotator: int, annotators: list[str]) -> list[str]:
    """The set name of each draw position 0..n-1."""
    for name, value, low in (("--n", n, 1), ("--overlap", overlap, 0), ("--per-annotator", per_annotator, 0)):
        if value < low:
            raise UserError(f"{name} must be at least {low} (got {value}).")
    needed = overlap + len(annotators) * per_annotator
    if needed > n:
        raise UserError(
            f"The sets do not fit in the sample: overlap {overlap} + {len(annotators)} annotators x "
            f"{per_annotator} = {needed} > n = {n}. Raise --n or lower --overlap / --per-annotator."
        )
    sets = ["overlap"] * overlap
    for name in annotators:
        sets += [name] * per_annotator
    sets += ["backup"] * (n - needed)
    return sets


def draw(n_failures: int, n: int, seed: int) -> np.ndarray:
    """Indices into the caption-id-sorted failures, in draw order."""
    return np.random.default_rng(seed).choice(n_failures, size=n, replace=False)


def _failure_ids(con, rrid: int, exclude_verified_positives: bool) -> list[int]:
    """The run's R@1 failures by caption id; known false negatives (the top-1 image is a verified positive of the
    caption) left out when asked, so that they stay away from annotators."""
    verified = (
        "AND query_id NOT IN (SELECT query_id FROM failure_false_negatives "
        "WHERE retrieval_run_id = $run AND is_top1_extended_positive) "
    )
    return [
        int(r[0])
        for r in con.execute(
            "SELECT query_id FROM retrieval_ranks WHERE retrieval_run_id = $run AND gt_rank > 1 "
            f"{verified if exclude_verified_positives else ''}ORDER BY query_id",
            {"run": rrid},
        ).fetchall()
    ]


def sample_failures(
    con,
    retrieval_run_id: int | None = None,
    n: int = 200,
    seed: int = 42,
    overlap: int = 30,
    per_annotator: int = 50,
    annotators=("A", "B", "C"),
    out_dir: str | Path = "failure_analysis",
    pictures: bool = True,
    replace: bool = False,
    show_suggestions_on_overlap: bool = False,
    exclude_verified_positives: bool = False,
) -> SampleResult:
    """Draw (or reuse) the failure sample of a text-to-image retrieval run and export its files.

    `retrieval_run_id`: None takes the most recent text-to-image run (`toolkit.store.runs`, need "ranks").
    """
    started = db.now()
    annotators = parse_annotators(annotators)
    n, seed, overlap, per_annotator = int(n), int(seed), int(overlap), int(per_annotator)
    if seed < 0:
        raise UserError(f"--seed must be 0 or more (got {seed}).")
    sets = plan_sets(n, overlap, per_annotator, annotators)
    rr = resolve_retrieval_run(con, retrieval_run_id, need="ranks", purpose="failure sampling")
    rrid = int(rr["retrieval_run_id"])
    config = {
        "retrieval_run_id": rrid,
        "n": n,
        "seed": seed,
        "overlap": overlap,
        "per_annotator": per_annotator,
        "annotators": annotators,
        "method": METHOD,
    }
    if exclude_verified_positives:  # only then in the config: the hash of every other sample stays as it was
        config["exclude_verified_positives"] = _positive_sets(con, rrid)
    chash = db.config_hash(config)
    out_dir = Path(out_dir)

    failures = _failure_ids(con, rrid, exclude_verified_positives)
    existing = con.execute(
        "SELECT config_hash, min(run_id), count(*) FROM failure_samples WHERE retrieval_run_id = ? GROUP BY 1",
        [rrid],
    ).fetchall()
    if len(existing) == 1 and existing[0][0] == chash:
        sample_run = int(existing[0][1])
        result = SampleResult(rrid, sample_run, True, len(failures), n, seed, _sizes(sets), out_dir)
        export(
            con, rrid, out_dir, pictures=pictures, result=result, only_missing_pictures=True,
            show_suggestions_on_overlap=show_suggestions_on_overlap,
        )  # fmt: skip
        return result

    old_ids = _replaceable_sample(con, rrid, existing, replace)

    if not failures:
        raise UserError(f"Retrieval run {rrid} has no R@1 failures (every caption's image is ranked first).")
    if n > len(failures):
        raise UserError(
            f"--n {n} is more than the {len(failures)} R@1 failures of retrieval run {rrid}. "
            f"Give --n {len(failures)} or less (and sets that fit in it)."
        )
    _refuse_labelled_exports(out_dir, annotators, keep_ids=None)
    prepare_out_dir(out_dir)  # before the transaction: an unwritable --out changes nothing

    picks = draw(len(failures), n, seed)
    rows = pd.DataFrame(
        {
            "retrieval_run_id": np.full(n, rrid, dtype="int64"),
            "caption_id": np.asarray(failures, dtype="int64")[picks],
            "draw_order": np.arange(n, dtype="int32"),
            "set_name": sets,
            "config_hash": chash,
        }
    )
    # The files are written inside the transaction (they need the new sample ids) and renamed into
    # place just before it commits: a failure on the way rolls the sample back and leaves the folder as it was.
    with db.transaction(con):
        if old_ids:
            con.execute("DELETE FROM failure_samples WHERE retrieval_run_id = ?", [rrid])
            gone = _remove_sample_explain_runs(con, rrid)
        new_run = db.insert_run(con, STAGE, config, started, seed=seed, model=rr.get("model"))
        rows["run_id"] = new_run
        db.insert_df(con, "failure_samples", rows)
        result = SampleResult(rrid, new_run, False, len(failures), n, seed, _sizes(sets), out_dir)
        result.replaced_samples = len(old_ids)
        result.removed_explain_runs = gone if old_ids else 0
        # pictures of the replaced sample would only mislead: removed once the new files are in place
        stale = [f"vis_{sid}.png" for sid in old_ids]
        export(
            con, rrid, out_dir, pictures=pictures, result=result, only_missing_pictures=False, remove=stale,
            show_suggestions_on_overlap=show_suggestions_on_overlap,
        )  # fmt: skip
    return result


def _remove_sample_explain_runs(con, rrid: int) -> int:
    """Inside the replacing transaction: the results of `clipfail explain` runs of scope 'sample' on run `rrid`
    (explain_runs, failure_ablations). They explained the sample being replaced; kept, the blame views would
    read them against the new sample (its new failures as 'no phrase'). The prompt cache stays, so explaining the
    new sample encodes only texts it has not seen. Returns how many runs were removed."""
    ids = [
        int(r[0])
        for r in con.execute(
            "SELECT explain_run_id FROM explain_runs WHERE retrieval_run_id = ? AND scope = 'sample'", [rrid]
        ).fetchall()
    ]
    if ids:
        con.execute("DELETE FROM failure_ablations WHERE list_contains(?, explain_run_id)", [ids])
        con.execute("DELETE FROM explain_runs WHERE list_contains(?, explain_run_id)", [ids])
    return len(ids)


def _positive_sets(con, rrid: int) -> list[int]:
    """The positive sets (newest of each source) that --exclude-verified-positives uses for run `rrid`: refused
    where none was imported for its subset, since nothing could then be excluded."""
    ids = [
        int(r[0])
        for r in con.execute(
            "SELECT max(p.positive_set_id) FROM positive_sets p JOIN retrieval_runs r USING (subset_id) "
            "WHERE r.retrieval_run_id = ? GROUP BY p.source ORDER BY 1",
            [rrid],
        ).fetchall()
    ]
    if not ids:
        raise UserError(
            f"--exclude-verified-positives needs extended positives for the subset of retrieval run {rrid}, and none "
            "were imported. Run first: clipfail positives import --source eccv (or cxc, or --file F)."
        )
    return ids


def _replaceable_sample(con, rrid: int, existing, replace: bool) -> list[int]:
    """The sample ids of the run's existing sample (another configuration), which --replace draws anew: refused
    without --replace, and once labels were imported for it. [] when the run has no sample yet."""
    if not existing:
        return []
    old_cfg = con.execute(
        "SELECT config_json FROM runs WHERE run_id = ?", [int(min(r[1] for r in existing))]
    ).fetchone()
    if not replace:
        raise UserError(
            f"Retrieval run {rrid} already has a failure sample with another configuration "
            f"({old_cfg[0] if old_cfg else 'unknown'}). Re-run with the same options to keep it, or give "
            "--replace to draw a new one (refused once labels were imported for it)."
        )
    old_ids = [
        int(r[0])
        for r in con.execute(
            "SELECT sample_id FROM failure_samples WHERE retrieval_run_id = ? ORDER BY 1", [rrid]
        ).fetchall()
    ]
    labelled = con.execute(
        "SELECT count(*), count(DISTINCT a.sample_id) FROM annotations a "
        "JOIN failure_samples f USING (sample_id) WHERE f.retrieval_run_id = ?",
        [rrid],
    ).fetchone()
    if labelled[0]:
        raise UserError(
            f"--replace refused: {labelled[0]} labels were imported for {labelled[1]} samples of the existing "
            f"sample of retrieval run {rrid}; replacing it would orphan them. Keep the sample (re-run with its "
            "options), or sample another retrieval run."
        )
    return old_ids


def _sizes(sets: list[str]) -> dict[str, int]:
    sizes = collections.Counter(sets)
    order = ["overlap"] + [s for s in dict.fromkeys(sets) if s not in RESERVED_SETS] + ["backup"]
    return {s: sizes.get(s, 0) for s in order}


# ---------------------------------------------------------------------------------------------
# Exports


def sample_table(con, retrieval_run_id: int) -> pd.DataFrame:
    """One row per sample of the retrieval run, in draw order, with everything the exports show."""
    df = con.execute(
        """
        WITH samples AS (
            SELECT sample_id, set_name, draw_order, caption_id, retrieval_run_id
            FROM failure_samples WHERE retrieval_run_id = ?
        ),
        ranks AS (
            SELECT retrieval_run_id, query_id, gt_id, gt_rank, gt_score, topk_ids, topk_scores
            FROM retrieval_ranks WHERE retrieval_run_id = ?
        )
        SELECT s.sample_id, s.set_name, s.draw_order, s.caption_id, c.text AS caption,
               r.gt_id, r.gt_rank, r.gt_score, r.topk_ids, r.topk_scores
        FROM samples s
        JOIN ranks r ON r.query_id = s.caption_id
        LEFT JOIN captions c ON c.caption_id = s.caption_id
        ORDER BY s.draw_order
        """,
        [retrieval_run_id, retrieval_run_id],
    ).df()
    return df


def _image_lookup(con, image_ids) -> dict[int, tuple[str, str]]:
    ids = pd.DataFrame({"image_id": pd.Series(sorted(set(image_ids)), dtype="int64")})
    con.register("_clipfail_ids", ids)
    try:
        rows = con.execute(
            "SELECT i.image_id, i.file_name, i.rel_path FROM images i JOIN _clipfail_ids USING (image_id)"
        ).fetchall()
    finally:
        con.unregister("_clipfail_ids")
    return {int(i): (f, r) for i, f, r in rows}


def _fmt_score(value) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.6f}"


def export_rows(df: pd.DataFrame, images: dict[int, tuple[str, str]], pictures: bool) -> list[dict]:
    """The CSV rows (as ordered dicts of strings) for a sample table."""
    out = []
    for row in df.itertuples(index=False):
        ids = list(row.topk_ids)[:TOPN]
        scores = list(row.topk_scores)[:TOPN]
        rec = {
            "sample_id": str(row.sample_id),
            "set_name": row.set_name,
            "draw_order": str(row.draw_order),
            "caption_id": str(row.caption_id),
            "caption": sheet_text(row.caption),
            "gt_image": images.get(int(row.gt_id), (f"image {row.gt_id}", ""))[0],
            "gt_rank": str(row.gt_rank),
            "gt_score": _fmt_score(row.gt_score),
        }
        for k in range(TOPN):
            rec[f"top{k + 1}_image"] = images.get(int(ids[k]), (f"image {ids[k]}", ""))[0] if k < len(ids) else ""
        for k in range(TOPN):
            rec[f"top{k + 1}_score"] = _fmt_score(scores[k]) if k < len(scores) else ""
        rec["picture"] = f"vis_{row.sample_id}.png" if pictures else ""
        rec["category"] = ""
        rec["notes"] = ""
        out.append(rec)
    return out


ASSIGN_COLUMNS = (
    ["sample_id", "caption_id", "caption", "gt_image", "gt_rank", "gt_score"]
    + [f"top{k}_image" for k in range(1, TOPN + 1)]
    + [f"top{k}_score" for k in range(1, TOPN + 1)]
    + ["picture", "suggested_category", "evidence", "category", "notes"]  # suggestions: toolkit.labels.triage
)
SAMPLE_COLUMNS = ["sample_id", "set_name", "draw_order"] + ASSIGN_COLUMNS[1:]


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """UTF-8 with BOM, CRLF, minimal quoting, every cell through the formula guard (toolkit.sheets);
    written to a temporary file and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
        writer.writerow(columns)
        for rec in rows:
            writer.writerow([sheet_text(rec.get(c, "")) for c in columns])
    os.replace(tmp, path)


EXPORT_HEADERS = frozenset(norm_header(c) for c in SAMPLE_COLUMNS + ASSIGN_COLUMNS)


def read_labelled_ids(path: Path) -> set[str] | None:
    """The sample ids of an existing export if writing over it would lose something, else None.

    The file is read as import-labels reads it (toolkit.labels.label_import.read_label_table: encodings,
    separators, an Excel `sep=` line, header spellings such as `Category`, `label`, `Comments`).
    Something would be lost if any row has a non-blank cell in a column that import-labels reads
    besides sample_id (LABEL_KEYS), in a column that the export does not write, or past the last
    column. A file that cannot be read so (not a CSV, no sample_id column, two category columns, ...)
    raises UserError: it is not written over on a guess. An empty file holds nothing.
    """
    # a FIFO, a folder or a device in the file's place is refused before it is opened
    data = read_bytes(
        path,
        "The existing",
        f"sample-failures writes {path.name} there: move it away (or give another --out) and run again. "
        "Nothing was changed.",
    )
    if not data.replace(codecs.BOM_UTF8, b"").strip():
        return None
    try:
        table = read_label_table(path, require_category=False, data=data)
    except UserError as exc:
        raise UserError(
            f"{path} would be written over, but it cannot be read to check that it holds no labels, so it is left as "
            f"it is. ({exc}) Import it or move it away, then run again."
        ) from None
    label_cols = {table.columns[k] for k in LABEL_KEYS if k in table.columns}
    id_col = table.columns.get("sample_id")
    content_cols = label_cols | {
        i for i, h in enumerate(table.header) if i != id_col and norm_header(h) not in EXPORT_HEADERS
    }
    width = len(table.header)
    holds, ids = False, set()
    for record in table.records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue
        raw_id = cells[id_col] if id_col is not None and id_col < len(cells) else ""
        parsed = parse_sample_id(raw_id) if raw_id else None
        ids.add(str(parsed) if parsed is not None else raw_id)
        if any(cells[i] for i in content_cols if i < len(cells)) or any(cells[width:]):
            holds = True
    return ids if holds else None


def _assign_files(annotators: list[str]) -> list[str]:
    return ["assign_overlap.csv"] + [f"assign_{a}.csv" for a in annotators] + ["assign_backup.csv"]


def _refuse_labelled_exports(out_dir: Path, annotators: list[str], keep_ids: dict[str, set[str]] | None) -> list[str]:
    """Files that hold labels: kept if they hold exactly the planned sample ids, else a UserError."""
    keep, clash = [], []
    for name in ["failure_samples.csv", *_assign_files(annotators)]:
        path = out_dir / name
        if not path.exists():
            continue
        ids = read_labelled_ids(path)
        if ids is None:
            continue
        if keep_ids is not None and ids == keep_ids.get(name):
            keep.append(name)
        else:
            clash.append(str(path))
    if clash:
        raise UserError(
            "These files already hold filled-in labels (or other cells that the export does not write) for another "
            f"sample and would be overwritten: {list_offenders(clash)}. Import them (clipfail import-labels) or move "
            "them away, then run again."
        )
    return keep


def annotator_readme(con, set_sizes: dict[str, int]) -> str:
    cats = con.execute(
        "SELECT name, is_actionable, coalesce(definition, '') AS definition, coalesce(example, '') AS example "
        "FROM categories ORDER BY position, name"
    ).df()
    aliases = con.execute("SELECT category, string_agg(alias, ', ' ORDER BY alias) FROM category_aliases GROUP BY 1")
    alias_map = dict(aliases.fetchall())
    annot = [s for s in set_sizes if s not in RESERVED_SETS]
    lines = [
        "Labelling CLIP retrieval failures",
        "=================================",
        "",
        "Each row is a caption for which CLIP ranked some other image above the caption's own image",
        "(the ground truth). Open the row's picture (column 'picture'): the caption is at the top, the",
        "ground-truth image is framed in green on the left, and the five images CLIP ranked highest follow",
        "with their rank and similarity score.",
        "",
        "Your file: " + ", ".join(f"assign_{a}.csv" for a in annot) + " (one per annotator). Everyone also labels",
        "assign_overlap.csv, so that we can measure how far annotators agree; return your copy of it with",
        "your name in the file name (assign_overlap_A.csv), since the file itself names nobody.",
        "assign_backup.csv is spare.",
        "",
        "Fill in the 'category' column with ONE category name from the list below. If two apply, write",
        "both as 'Primary; Secondary' (the first is the main one). Use 'notes' for anything else.",
        "Do not change sample_id or the other columns. Save as CSV (UTF-8); any separator is fine.",
        "",
        "Categories",
        "----------",
    ]
    for row in cats.itertuples():
        kind = "" if row.is_actionable else " (not actionable)"
        lines += ["", f"{row.name}{kind}"]
        lines += textwrap.wrap(f"Definition: {row.definition}", 96, initial_indent="  ", subsequent_indent="    ")
        if row.example:
            lines += textwrap.wrap(f"Example: {row.example}", 96, initial_indent="  ", subsequent_indent="    ")
        if alias_map.get(row.name):
            lines += textwrap.wrap(
                f"Also accepted: {alias_map[row.name]}", 96, initial_indent="  ", subsequent_indent="    "
            )
    lines += [
        "",
        "When in doubt between Ambiguous and another category: choose Ambiguous when the retrieved image",
        "would also be a correct answer for the caption, or when no wording of the caption could tell the",
        "two images apart.",
        "",
    ]
    return "\r\n".join(lines)


def prepare_out_dir(out_dir: Path) -> None:
    """Create out_dir and check that files can be created in it, or raise UserError (nothing written yet)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder. Give --out a folder for the annotators' files.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging.make(out_dir, STAGING_PREFIX).remove()
    except OSError as exc:
        raise UserError(
            f"Cannot write the annotators' files into {out_dir}: {exc.strerror or exc}. Give --out a folder that "
            "you can write to. Nothing was changed."
        ) from None


def export(
    con,
    retrieval_run_id: int,
    out_dir: Path,
    *,
    pictures: bool = True,
    result: SampleResult,
    only_missing_pictures: bool = False,
    remove: list[str] | tuple = (),
    show_suggestions_on_overlap: bool = False,
) -> None:
    """Write the CSVs, README.txt and pictures of a retrieval run's sample into out_dir.

    Everything is first written into a staging folder inside out_dir, then renamed into place
    (pictures first, the CSVs last); `remove` names files of out_dir to delete after that. An error
    before the renames leaves out_dir as it was."""
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir)
    staging.remove_stale(out_dir, (STAGING_PREFIX,))  # what a killed run left; never a live run's
    try:
        stage = staging.make(out_dir, STAGING_PREFIX)
    except OSError as exc:
        raise UserError(f"Could not write the annotators' files into {out_dir}: {exc.strerror or exc}.") from None
    placing = False
    try:
        staged = _write_exports(
            con, retrieval_run_id, out_dir, stage.path, pictures, result, only_missing_pictures,
            show_suggestions_on_overlap,
        )  # fmt: skip
        placing = True
        for name in staged:
            os.replace(stage.path / name, out_dir / name)
        for name in remove:
            (out_dir / name).unlink(missing_ok=True)
    except OSError as exc:
        where = "" if placing else " Nothing in it was changed."
        raise UserError(
            f"Could not write the annotators' files into {out_dir}: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}.{where} Check the folder (space, permissions) and "
            "run again; the database keeps its earlier sample."
        ) from None
    finally:
        stage.remove()


def _write_exports(
    con,
    retrieval_run_id: int,
    out_dir: Path,
    staging: Path,
    pictures: bool,
    result: SampleResult,
    only_missing: bool,
    show_suggestions_on_overlap: bool = False,
) -> list[str]:
    """Write the files into staging; return their names in the order to move them into out_dir."""
    df = sample_table(con, retrieval_run_id)
    annotators = [s for s in result.set_sizes if s not in RESERVED_SETS]
    image_ids = set(df["gt_id"].astype(int))
    for ids in df["topk_ids"]:
        image_ids.update(int(x) for x in list(ids)[:TOPN])
    images = _image_lookup(con, image_ids)
    rows = export_rows(df, images, pictures)
    from toolkit.labels.triage import add_suggestions

    add_suggestions(con, retrieval_run_id, rows, show_on_overlap=show_suggestions_on_overlap)

    groups = {"failure_samples.csv": rows}
    for s in ["overlap", *annotators, "backup"]:
        fname = "assign_overlap.csv" if s == "overlap" else f"assign_{s}.csv"
        groups[fname] = [r for r in rows if r["set_name"] == s]
    planned_ids = {name: {r["sample_id"] for r in recs} for name, recs in groups.items()}
    keep = _refuse_labelled_exports(out_dir, annotators, keep_ids=planned_ids)
    csvs = []
    for name, recs in groups.items():
        if name in keep:
            result.kept.append(name)
            continue
        write_csv(staging / name, recs, SAMPLE_COLUMNS if name == "failure_samples.csv" else ASSIGN_COLUMNS)
        csvs.append(name)
    (staging / "README.txt").write_text(annotator_readme(con, result.set_sizes), encoding="utf-8-sig")

    pngs: list[str] = []
    if pictures:
        pngs = _write_pictures(con, retrieval_run_id, df, rows, images, out_dir, staging, result, only_missing)
    # Again, just before the files go into place: an annotator may have saved labels meanwhile.
    if _refuse_labelled_exports(out_dir, annotators, keep_ids=planned_ids) != keep:
        raise UserError(
            f"A file in {out_dir} was changed while the files were written; nothing was written over. Run again."
        )
    result.written += csvs + ["README.txt"]
    return pngs + ["README.txt"] + csvs


def _write_pictures(con, retrieval_run_id, df, rows, images, out_dir, staging, result, only_missing) -> list[str]:
    subset = con.execute(
        "SELECT s.image_root, (SELECT count(*) FROM subset_images si WHERE si.subset_id = s.subset_id) "
        "FROM retrieval_runs r JOIN subsets s USING (subset_id) WHERE r.retrieval_run_id = ?",
        [retrieval_run_id],
    ).fetchone()
    image_root = study_paths.resolve(con, subset[0]) if subset else None
    n_images = int(subset[1]) if subset else None
    renderer = PictureRenderer(image_root)
    from toolkit.progress import progress

    todo = []
    for row, rec in zip(df.itertuples(index=False), rows):
        if only_missing and (out_dir / rec["picture"]).exists():
            continue
        todo.append((row, rec["picture"]))

    def write_one(item) -> None:
        row, name = item
        ids = [int(x) for x in list(row.topk_ids)[:TOPN]]
        scores = [float(x) for x in list(row.topk_scores)[:TOPN]]
        pic = renderer.render(
            caption=row.caption,
            header=(
                f"sample {row.sample_id} · caption {row.caption_id} · set {row.set_name} · ground truth at rank "
                f"{row.gt_rank}" + (f" of {n_images}" if n_images else "") + f", score {row.gt_score:.4f}"
            ),
            gt=(int(row.gt_id), images.get(int(row.gt_id)), int(row.gt_rank), float(row.gt_score)),
            retrieved=[(i, images.get(i), s) for i, s in zip(ids, scores)],
        )
        pic.save(staging / name, "PNG", compress_level=1)

    # PIL releases the GIL while decoding, resizing and compressing, so threads help.
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in progress(pool.map(write_one, todo), total=len(todo), desc="pictures", unit="pic"):
            result.n_pictures += 1
    result.missing_images = sorted(renderer.missing)
    return [name for _, name in todo]


# ---------------------------------------------------------------------------------------------
# Pictures


def _font_path() -> str | None:
    """DejaVu Sans as shipped with matplotlib (covers non-ASCII), found without importing it."""
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.exists():
            return str(path)
    return None


def _font(size: int, bold: bool = False):
    path = _font_path()
    if path and bold:
        bold_path = path.replace("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")
        path = bold_path if Path(bold_path).exists() else path
    if path:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def wrap_to_width(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by pixel width; the last line ends in an ellipsis if text is cut."""
    words = " ".join(str(text).split()).split(" ") if str(text).strip() else [""]
    lines, cur = [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width:
            lines.append(cur)
            trial = word
        cur = trial
        while font.getlength(cur) > width and len(cur) > 1:  # a single over-long word: hard break
            cut = len(cur) - 1
            while cut > 1 and font.getlength(cur[:cut]) > width:
                cut -= 1
            lines.append(cur[:cut])
            cur = cur[cut:]
    lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + " …") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines


class PictureRenderer:
    """Draws one sample's picture (PICTURE_SIZE): caption on top, then six columns:
    the ground-truth image framed in green, and the top-5 retrieved images labelled #rank and
    score (framed in green too, and marked, where one of them is the ground truth; grey otherwise).
    A missing or unreadable image file is drawn as a grey placeholder with its file name.
    """

    W, H = PICTURE_SIZE
    COLS = 1 + TOPN
    BOX = (220, 250)  # image area per column: each image is scaled to fit it, aspect kept
    TOP = 150  # y of the image area
    GREEN = (20, 150, 60)
    GREY = (170, 170, 170)

    def __init__(self, image_root: Path | None, cache_size: int = 512):
        self.image_root = image_root
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.cache_size = cache_size
        self.missing: set[str] = set()
        self.lock = threading.Lock()  # render() may run in several threads at once
        self.f_caption = _font(26)
        self.f_label = _font(18, bold=True)
        self.f_small = _font(15)

    def _placeholder(self, name: str) -> Image.Image:
        im = Image.new("RGB", self.BOX, (205, 205, 205))
        d = ImageDraw.Draw(im)
        lines = ["missing or unreadable:"] + wrap_to_width(name, self.f_small, self.BOX[0] - 16, 4)
        y = self.BOX[1] // 2 - 12 * len(lines)
        for line in lines:
            d.text((8, y), line, fill=(60, 60, 60), font=self.f_small)
            y += 22
        return im

    def thumbnail(self, image_id: int, info: tuple[str, str] | None) -> Image.Image:
        with self.lock:
            if image_id in self.cache:
                self.cache.move_to_end(image_id)
                return self.cache[image_id]
        name = info[0] if info else f"image {image_id} (not in images table)"
        im = None
        if info and self.image_root is not None:
            try:
                # read without blocking: a FIFO or device in the image's place is a placeholder, never opened
                data = read_bytes(self.image_root / info[1], "Image file")
                with Image.open(io.BytesIO(data)) as src:
                    src.draft("RGB", self.BOX)  # JPEG: decode at reduced scale, still >= BOX
                    im = ImageOps.contain(src.convert("RGB"), self.BOX, Image.Resampling.BILINEAR)
            except Exception:  # missing, truncated, not an image, too large: all become a placeholder
                im = None
        with self.lock:
            if im is None:
                self.missing.add(name)
                im = self._placeholder(name)
            self.cache[image_id] = im
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return im

    def _column(self, canvas, draw, col: int, thumb, colour, border: int, lines: list[tuple[str, object, tuple]]):
        colw = self.W // self.COLS
        x0 = col * colw + (colw - self.BOX[0]) // 2
        x = x0 + (self.BOX[0] - thumb.width) // 2
        y = self.TOP + (self.BOX[1] - thumb.height) // 2
        canvas.paste(thumb, (x, y))
        draw.rectangle(
            [x - border, y - border, x + thumb.width - 1 + border, y + thumb.height - 1 + border],
            outline=colour,
            width=border,
        )
        ty = self.TOP + self.BOX[1] + 18
        for text, font, fill in lines:
            for line in wrap_to_width(text, font, colw - 12, 2):
                draw.text((col * colw + 6, ty), line, fill=fill, font=font)
                ty += font.size + 5

    def render(self, caption: str, header: str, gt, retrieved) -> Image.Image:
        """gt = (image_id, (file_name, rel_path) | None, rank, score); retrieved = [(id, info, score), ...]."""
        canvas = Image.new("RGB", PICTURE_SIZE, "white")
        draw = ImageDraw.Draw(canvas)
        y = 14
        for line in wrap_to_width(caption or "(no caption text)", self.f_caption, self.W - 40, 3):
            draw.text((20, y), line, fill="black", font=self.f_caption)
            y += 33
        draw.text((20, y + 6), header, fill=(90, 90, 90), font=self.f_small)
        draw.text(
            (20, self.H - 30),
            "Green frame: the caption's own image (ground truth). Grey frames: the images CLIP ranked highest, "
            "#1 first. Scores are cosine similarities.",
            fill=(110, 110, 110),
            font=self.f_small,
        )
        gt_id, gt_info, gt_rank, gt_score = gt
        gt_name = gt_info[0] if gt_info else f"image {gt_id}"
        self._column(
            canvas,
            draw,
            0,
            self.thumbnail(gt_id, gt_info),
            self.GREEN,
            7,
            [
                ("GROUND TRUTH", self.f_label, self.GREEN),
                (f"rank {gt_rank}, score {gt_score:.4f}", self.f_small, (0, 0, 0)),
                (gt_name, self.f_small, (90, 90, 90)),
            ],
        )
        for k, (image_id, info, score) in enumerate(retrieved[:TOPN], start=1):
            is_gt = image_id == gt_id
            name = info[0] if info else f"image {image_id}"
            title = f"#{k} = GROUND TRUTH" if is_gt else f"#{k} retrieved"
            self._column(
                canvas,
                draw,
                k,
                self.thumbnail(image_id, info),
                self.GREEN if is_gt else self.GREY,
                7 if is_gt else 3,
                [
                    (title, self.f_label, self.GREEN if is_gt else (0, 0, 0)),
                    (f"score {score:.4f}", self.f_small, (0, 0, 0)),
                    (name, self.f_small, (90, 90, 90)),
                ],
            )
        colw = self.W // self.COLS
        draw.line([(colw, self.TOP - 10), (colw, self.H - 45)], fill=(220, 220, 220), width=2)
        return canvas
