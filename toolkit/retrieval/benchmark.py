"""Many models on one subset: CLIP_benchmark's `models.txt` + `build` workflow inside the database.

`benchmark(db_path, models_file, subset_name=None, ...)` reads a models file with one
`model[,pretrained|checkpoint]` per line (blank lines and lines starting with `#` are skipped):

    ViT-B-32-quickgelu,openai
    openai/clip-vit-base-patch16
    tiny-clip,weights/tiny-seed1.safetensors

The second field is a checkpoint when it contains a `/` (or the platform's separator) or ends with
.pt, .pth, .bin, .safetensors or .ckpt, and a pretrained tag otherwise. A relative checkpoint path
is relative to the models file's folder.

Every line is checked first (the model spec resolves, a checkpoint file exists). A bad line is
named with its line number and runs nothing; the other lines still run. A line whose embed or
evaluate fails (weights that cannot be fetched, an unexpected error such as running out of memory)
is reported the same way, and the next line runs. Each good line runs the
existing stages in order: `toolkit.embed.stage.embed` (which reuses a cached set and resumes an
interrupted one) and `toolkit.retrieval.evaluate.evaluate` in both directions on the very sets that embed
returned (which reuses a run made from the same files). So a benchmark that stopped half-way is
resumed by running it again, and a finished one changes nothing.

The table has one row per good line: model, weights, R@1/5/10 in both directions (read from the
`recall_summary` view), the wall time of the embed run that made the sets (from its `runs` row) and
the device they were made on (from the sets' config). Python only picks and pivots those values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from toolkit.errors import UserError
from toolkit.store import db
from toolkit.store.study import connection

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
DIRECTIONS = ("text-to-image", "image-to-text")
TABLE_COLUMNS = [
    "line",
    "model",
    "weights",
    "t2i_r_at_1",
    "t2i_r_at_5",
    "t2i_r_at_10",
    "i2t_r_at_1",
    "i2t_r_at_5",
    "i2t_r_at_10",
    "embed_seconds",
    "device",
    "t2i_retrieval_run_id",
    "i2t_retrieval_run_id",
]


@dataclass
class ModelLine:
    line_no: int
    text: str
    model: str = ""
    pretrained: str | None = None
    checkpoint: str | None = None
    error: str | None = None  # why this line cannot run (found while reading or checking it)

    @property
    def weights(self) -> str:
        return self.pretrained or (f"checkpoint {self.checkpoint}" if self.checkpoint else "random init")


@dataclass
class LineOutcome:
    line: ModelLine
    status: str  # 'done' | 'already done' | 'failed'
    error: str | None = None
    retrieval_run_ids: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class BenchmarkResult:
    subset: str
    outcomes: list[LineOutcome]
    table: pd.DataFrame  # one row per line that ran (TABLE_COLUMNS)

    @property
    def failed(self) -> list[LineOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _is_checkpoint(field_text: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(s in field_text for s in ["/", *seps]) or field_text.lower().endswith(CHECKPOINT_SUFFIXES)


def read_models_file(path) -> list[ModelLine]:
    """The model lines of a models file, each with `error` set when it cannot run. A file that cannot be
    read, or that names no model at all, is a UserError."""
    from toolkit.userfiles import read_text

    path = Path(path)
    # the one check for a user's file: missing, a folder, a FIFO or a device is refused before it is opened
    text = read_text(path, "Models file", "Give --models FILE, a text file with one model[,pretrained] per line.")
    out = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        item = ModelLine(no, line, model=fields[0])
        if len(fields) > 2:
            item.error = "expected model[,pretrained|checkpoint], found more than two fields"
        elif not fields[0]:
            item.error = "no model name before the comma"
        elif len(fields) == 2 and not fields[1]:
            item.error = "empty pretrained tag or checkpoint after the comma (drop the comma for random weights)"
        elif len(fields) == 2:
            if _is_checkpoint(fields[1]):
                ckpt = Path(fields[1]).expanduser()
                item.checkpoint = str(ckpt if ckpt.is_absolute() else (path.parent / ckpt))
            else:
                item.pretrained = fields[1]
        out.append(item)
    if not out:
        raise UserError(f"Models file {path} names no model. Write one model[,pretrained|checkpoint] per line.")
    return out


def check_line(item: ModelLine) -> None:
    """Set item.error when the model spec does not resolve or the checkpoint file is missing (no network)."""
    if item.error:
        return
    from toolkit.embed.models import resolve_spec

    try:
        resolve_spec(item.model, item.pretrained)
    except UserError as exc:
        item.error = str(exc)
        return
    if item.checkpoint is not None:
        from toolkit.userfiles import regular_problem

        problem = regular_problem(item.checkpoint)  # a FIFO or a device is named, never opened
        if problem:
            item.error = f"checkpoint file {item.checkpoint} {'does not exist' if problem == 'not found' else problem}"


def benchmark(
    database,
    models_file,
    subset_name: str | None = None,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "fp32",
    cache_dir=None,
    topk: int = 10,
    progress: bool | None = None,
) -> BenchmarkResult:
    """Embed and evaluate every model of `models_file` on one subset; see the module docstring."""
    import time

    from toolkit.embed.stage import embed
    from toolkit.retrieval.evaluate import evaluate

    lines = read_models_file(models_file)
    with connection(database) as con:
        subset = str(db.get_subset(con, subset_name)["name"])
    for item in lines:
        check_line(item)
    outcomes = []
    for item in lines:
        if item.error:
            outcomes.append(LineOutcome(item, "failed", item.error))
            continue
        t0 = time.perf_counter()
        try:
            e = embed(
                database,
                subset,
                model=item.model,
                pretrained=item.pretrained,
                checkpoint=item.checkpoint,
                device=device,
                batch_size=batch_size,
                precision=precision,
                cache_dir=cache_dir,
                progress=progress,
            )
            runs, noop = {}, e.is_noop
            with connection(database) as con:
                for direction in DIRECTIONS:
                    ev = evaluate(
                        con,
                        subset,
                        topk=topk,
                        device=device,
                        direction=direction,
                        embedding_set_ids=(e.image_set_id, e.text_set_id),
                        progress=progress,
                    )
                    runs[direction] = ev.retrieval_run_id
                    noop = noop and ev.is_noop
        except UserError as exc:
            outcomes.append(LineOutcome(item, "failed", str(exc), seconds=time.perf_counter() - t0))
            continue
        except Exception as exc:  # e.g. out of memory on one large model: report it, and run the other lines
            msg = f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            outcomes.append(LineOutcome(item, "failed", msg, seconds=time.perf_counter() - t0))
            continue
        status = "already done" if noop else "done"
        outcomes.append(LineOutcome(item, status, None, runs, time.perf_counter() - t0))
    with connection(database) as con:
        table = results_table(con, outcomes)
    return BenchmarkResult(subset, outcomes, table)


def results_table(con, outcomes: list[LineOutcome]) -> pd.DataFrame:
    """One row per line that ran: recall_summary's R@K of both runs, the embed run's wall time and device."""
    rows = []
    for o in outcomes:
        if o.status == "failed":
            continue
        t2i, i2t = o.retrieval_run_ids["text-to-image"], o.retrieval_run_ids["image-to-text"]
        rec = con.execute(
            "SELECT retrieval_run_id, r_at_1, r_at_5, r_at_10 FROM recall_summary WHERE retrieval_run_id IN (?, ?)",
            [t2i, i2t],
        ).df()
        rec = rec.set_index("retrieval_run_id")
        # the embed run(s) that made the two sets the text-to-image run used, and the device they ran on
        made = con.execute(
            """
            WITH sets AS (
                SELECT e.run_id, json_extract_string(e.config_json, '$.device') AS device
                FROM retrieval_runs r
                JOIN embedding_sets e ON e.embedding_set_id IN (r.image_embedding_set_id, r.text_embedding_set_id)
                WHERE r.retrieval_run_id = ?
            )
            SELECT
                (SELECT sum(epoch(u.finished_at) - epoch(u.started_at))
                 FROM runs u WHERE u.run_id IN (SELECT run_id FROM sets)) AS embed_seconds,
                (SELECT string_agg(DISTINCT device, ',' ORDER BY device) FROM sets) AS device
            """,
            [t2i],
        ).fetchone()
        rows.append(
            {
                "line": o.line.line_no,
                "model": o.line.model,
                "weights": o.line.pretrained or _checkpoint_label(o.line.checkpoint),
                "t2i_r_at_1": rec.loc[t2i, "r_at_1"],
                "t2i_r_at_5": rec.loc[t2i, "r_at_5"],
                "t2i_r_at_10": rec.loc[t2i, "r_at_10"],
                "i2t_r_at_1": rec.loc[i2t, "r_at_1"],
                "i2t_r_at_5": rec.loc[i2t, "r_at_5"],
                "i2t_r_at_10": rec.loc[i2t, "r_at_10"],
                "embed_seconds": None if made[0] is None else float(made[0]),
                "device": made[1],
                "t2i_retrieval_run_id": t2i,
                "i2t_retrieval_run_id": i2t,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _checkpoint_label(checkpoint: str | None) -> str:
    return f"checkpoint {Path(checkpoint).name}" if checkpoint else "random init"


def write_table_csv(table: pd.DataFrame, path) -> Path:
    """Write the table as CSV. An existing file is replaced only when every line of it is in the new
    table (a re-run that adds models); a file holding anything else (edited by hand, another table)
    is refused, naming it, and left as it is."""
    from toolkit.sheets import write_frame_csv

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"Folder {path.parent} for --csv {path} does not exist. Create it first.")
    if path.is_dir():
        raise UserError(f"--csv {path} is a folder. Give a file name.")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_frame_csv(table, tmp)
        if path.exists():
            try:
                old = path.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError):
                old = None
            new = set(tmp.read_text(encoding="utf-8-sig").splitlines())
            if old is None or not old or any(line not in new for line in old if line.strip()):
                raise UserError(
                    f"--csv {path} exists and holds lines this table would not keep (edited by hand, another "
                    "table, or a model no longer in the models file). It was left as it is: move it away or give "
                    "another --csv file."
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def describe_failures(outcomes: list[LineOutcome]) -> list[str]:
    return [f"line {o.line.line_no} ({o.line.text}): {o.error}" for o in outcomes if o.status == "failed"]
