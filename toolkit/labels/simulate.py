"""Simulated annotators for the offline demo. Their labels are NOT human judgements.

`simulate_labels(con, assign_dir, out_dir, seed)` fills in the category column of the
assign_<annotator>.csv files that sample-failures exported, as seeded random "annotators"
would, writes the filled files to `out_dir` and imports them with `is_simulated = true`,
through the same import path (toolkit.labels.label_import.import_labels) that people's files take.

The method (deterministic for a seed):
- every sample gets a latent category, drawn with numpy's default_rng(seed) from a prior
  that is the reference study's merged label counts (PRIOR below; categories added to the
  taxonomy later get weight 1);
- each annotator who labels a sample gives the latent category with probability `accuracy`
  (default 0.75), otherwise another category drawn from the prior without the latent one.
  So annotators disagree on part of the overlap set, as people would, and agreement
  (annotator_agreement) comes out well below 1 but above chance.

Nothing here depends on what the images show: the simulated labels exercise the pipeline,
they say nothing about CLIP.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.userfiles import read_text, refuse_non_regular

PRIOR = {"Ambiguous": 67, "Object": 62, "Attribute": 25, "Action": 24, "Context": 16, "Count": 15, "Spatial": 1}
NOTE = "simulated annotator (clipfail demo), not a human judgement"


@dataclass
class SimulatedLabels:
    files: list[Path] = field(default_factory=list)
    n_labels: int = 0
    import_run_id: int | None = None


def _read_export(path: Path) -> tuple[list[str], list[dict]]:
    # through userfiles: a FIFO or device in place of an export is refused, never opened (it would block)
    reader = csv.DictReader(io.StringIO(read_text(path, "Exported label file"), newline=""))
    return list(reader.fieldnames or []), list(reader)


def _write(path: Path, columns: list[str], rows: list[dict]) -> Path:
    refuse_non_regular(path, "Simulated label file")  # opening a FIFO for writing blocks too
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def simulate_labels(con, assign_dir, out_dir, seed: int = 0, accuracy: float = 0.75, retrieval_run_id=None):
    """Fill the exported CSVs with seeded simulated labels and import them as simulated."""
    from toolkit.labels.label_import import import_labels

    assign_dir, out_dir = Path(assign_dir), Path(out_dir)
    categories = [r[0] for r in con.execute("SELECT name FROM categories ORDER BY position, name").fetchall()]
    weights = np.array([PRIOR.get(c, 1) for c in categories], dtype=float)
    where = "" if retrieval_run_id is None else "WHERE retrieval_run_id = ?"
    samples = con.execute(
        f"SELECT sample_id, set_name FROM failure_samples {where} ORDER BY sample_id",
        [] if retrieval_run_id is None else [retrieval_run_id],
    ).df()
    if samples.empty:
        raise UserError("There is no failure sample to label. Run: clipfail sample-failures")
    annotators = sorted(set(samples["set_name"]) - {"overlap", "backup"})

    rng = np.random.default_rng(seed)
    latent = {
        int(s): categories[i]
        for s, i in zip(samples["sample_id"], rng.choice(len(categories), len(samples), p=weights / weights.sum()))
    }

    def label(sample_id: int) -> str:
        true = latent[sample_id]
        if rng.random() < accuracy:
            return true
        others = [i for i, c in enumerate(categories) if c != true]
        w = weights[others]
        return categories[others[rng.choice(len(others), p=w / w.sum())]]

    out_dir.mkdir(parents=True, exist_ok=True)
    result = SimulatedLabels()
    overlap_path = assign_dir / "assign_overlap.csv"
    overlap_cols, overlap_rows = _read_export(overlap_path) if overlap_path.exists() else ([], [])
    for name in annotators:
        path = assign_dir / f"assign_{name}.csv"
        if not path.exists():
            raise UserError(f"{path} is missing. Run clipfail sample-failures again to export it.")
        columns, rows = _read_export(path)
        for row in rows:
            row["category"] = label(int(row["sample_id"]))
            row["notes"] = NOTE
        result.files.append(_write(out_dir / f"assign_{name}.csv", columns, rows))
        result.n_labels += len(rows)
    if overlap_rows:
        columns = overlap_cols + ([] if "annotator" in overlap_cols else ["annotator"])
        rows = []
        for name in annotators:
            for row in overlap_rows:
                rows.append({**row, "annotator": name, "category": label(int(row["sample_id"])), "notes": NOTE})
        result.files.append(_write(out_dir / "assign_overlap.csv", columns, rows))
        result.n_labels += len(rows)
    res = import_labels(con, result.files, simulated=True)
    result.import_run_id = res.run_id
    return result
