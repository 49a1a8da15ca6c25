"""Extended positives: human-verified extra (caption, image) pairs of the COCO 5k test split (issue 27).

COCO pairs each caption with one image, so a model that retrieves another image that the caption
describes just as well is counted as wrong. Two public extensions verify more pairs: CxC (Crisscrossed
Captions, Parekh et al., 2021) and ECCV Caption (Chun et al., 2022). The `eccv_caption` package
(PyPI, MIT; the `positives` extra) ships both as JSON keyed by COCO caption annotation ids and COCO
image ids, one file per direction (caption -> image ids, image -> caption ids).

`import_positives(con, subset, source="eccv"|"cxc")` reads the package's files; `file=` reads a JSON
file of the same content, `{"caption_to_image": {"<caption id>": [image ids]}, "image_to_caption":
{"<image id>": [caption ids]}}`. In one transaction it writes

- a `runs` row (stage 'positives') and a `positive_sets` row: source, package version or none,
  sha256 of the JSON bytes, counts and coverage (for a packaged source also how many of the subset's
  captions and images are in the COCO 5k test, the split it extends: `coco5k_test_split`);
- `extra_positives`: the pairs of both directions whose two ends are in the subset (an id the subset
  does not hold is counted, never an error);
- `positive_ranks` for every retrieval run of the subset that exists (see `rank_positives`); evaluate
  stores them for a run made later (`rank_if_imported`).

The same source (same bytes) for the same subset again is a no-op. A subset that none of the source's
queries falls in is refused ("0 of N captions covered") with what to ingest.

`rank_positives(con, retrieval_run_id)` stores, for each query of a run, the rank of each of its
positives (its COCO pairs and the pairs of every positive set of the subset) under the toolkit's tie
policy: 1 + the number of gallery items scoring strictly higher, from bit for bit the scores evaluate
ranked (`ranking.score_rows`). The metrics (R@K, R-Precision, mAP@R per source) are the
`recall_extended` view over these ranks; nothing is computed beside it here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit import userfiles
from toolkit.errors import UserError
from toolkit.retrieval import ranking as R
from toolkit.retrieval.eccv_package import coco5k_test_split, read_id_lists
from toolkit.retrieval.eccv_package import id_lists as _id_lists
from toolkit.retrieval.eccv_package import package_dir as _package_dir
from toolkit.store import artifacts, db

STAGE = "positives"
PACKAGED_SOURCES = ("eccv", "cxc")
DIRECTIONS = {"caption_to_image": "text-to-image", "image_to_caption": "image-to-text"}
INGEST_HINT = (
    "ECCV Caption and CxC cover the COCO 5k test split (Karpathy) by COCO caption annotation ids and COCO image "
    "ids: ingest that split with `clipfail ingest --coco5k-test` (from captions_val2014.json, or 2017 train+val); "
    "a study made with --karpathy-json holds Karpathy sentence ids, which cannot join."
)
RANK_ROWS = 2048  # query rows scored at once (memory: RANK_ROWS x gallery x 4 bytes)


@dataclass
class ImportResult:
    positive_set_id: int
    run_id: int
    reused: bool
    subset: str
    source: str
    source_version: str | None
    n_pairs_read: int
    n_pairs_kept: int
    n_unknown_ids: int
    n_captions: int
    n_captions_covered: int
    n_images: int
    n_images_covered: int
    coverage: pd.DataFrame  # the positive_coverage view's rows of this set
    ranked_runs: list[int]
    n_captions_in_5k_test: int | None = None  # of the subset's captions, those in the COCO 5k test (NULL: a file)
    n_images_in_5k_test: int | None = None


def read_source(source: str | None, file: str | Path | None) -> tuple[str, str | None, str, dict]:
    """(source name, version or None, sha256 of the bytes read, {direction: {query id: [positive ids]}})."""
    if file is not None:
        data = userfiles.read_bytes(file, "positives file")
        obj = userfiles.want_dict(userfiles.parse_json(data, f"positives file {file}"), f"positives file {file}")
        unknown = sorted(set(obj) - set(DIRECTIONS))
        if unknown or not obj:
            raise userfiles.JsonShapeError(
                f"positives file {file} must be an object with the keys caption_to_image and/or image_to_caption; "
                f"it has {', '.join(map(repr, unknown)) or 'neither'}."
            )
        lists = {DIRECTIONS[k]: _id_lists(v, f"positives file {file}: {k}") for k, v in obj.items()}
        return f"file:{Path(file).name}", None, hashlib.sha256(data).hexdigest(), lists
    if source not in PACKAGED_SOURCES:
        raise UserError(f"--source must be one of {', '.join(PACKAGED_SOURCES)}, not {source!r}.")
    folder, version = _package_dir()
    sha = hashlib.sha256()
    lists = {}
    for key, direction in DIRECTIONS.items():
        data, lists[direction] = read_id_lists(folder / f"{source}_{key}.json")  # parsed once per process
        sha.update(data)
    return source, version, sha.hexdigest(), lists


def _pairs(lists: dict) -> pd.DataFrame:
    rows = [(d, q, p) for d, by_query in lists.items() for q, ps in by_query.items() for p in ps]
    df = pd.DataFrame(rows, columns=["direction", "query_id", "positive_id"])
    return df.astype({"query_id": "int64", "positive_id": "int64"}).drop_duplicates()


def import_positives(
    con, subset_name: str | None, source: str | None = None, file: str | Path | None = None, *, rank_runs: bool = True
) -> ImportResult:
    """Import one source of extended positives for a subset; see the module docstring. rank_runs=False leaves the
    ranks of existing runs to `rank_positives` (benchmarks/extended_metrics.py times the two apart)."""
    started = db.now()
    if (source is None) == (file is None):
        raise UserError("Give one source of positives: --source eccv|cxc, or --file F (not both, not neither).")
    name, version, sha, lists = read_source(source, file)
    subset = db.get_subset(con, subset_name)
    subset_id, subset_label = int(subset["subset_id"]), str(subset["name"])
    config = {"subset_id": subset_id, "source": name, "source_sha256": sha}
    chash = db.config_hash(config)
    existing = con.execute(
        "SELECT positive_set_id FROM positive_sets WHERE config_hash = ? ORDER BY 1 LIMIT 1", [chash]
    ).fetchone()
    if existing is not None:
        return _result(con, int(existing[0]), True, [])

    pairs = _pairs(lists)
    caps = set(
        con.execute("SELECT caption_id FROM subset_captions WHERE subset_id = ?", [subset_id])
        .fetchnumpy()["caption_id"]
        .tolist()
    )
    imgs = set(
        con.execute("SELECT image_id FROM subset_images WHERE subset_id = ?", [subset_id])
        .fetchnumpy()["image_id"]
        .tolist()
    )
    t2i = pairs["direction"] == "text-to-image"
    cap_col = np.where(t2i, pairs["query_id"], pairs["positive_id"])
    img_col = np.where(t2i, pairs["positive_id"], pairs["query_id"])
    cap_in = np.isin(cap_col, list(caps))
    img_in = np.isin(img_col, list(imgs))
    kept = pairs[cap_in & img_in]
    unknown = len(set(cap_col[~cap_in].tolist())) + len(set(img_col[~img_in].tolist()))
    in_test = _in_5k_test(caps, imgs) if file is None else [None, None]
    n_caps_cov = kept.loc[kept["direction"] == "text-to-image", "query_id"].nunique()
    n_imgs_cov = kept.loc[kept["direction"] == "image-to-text", "query_id"].nunique()
    if kept.empty:
        raise UserError(
            f"0 of {len(caps)} captions (and 0 of {len(imgs)} images) of subset {subset_label!r} are covered by "
            f"{name}: none of its {len(pairs)} pairs has both ends in the subset. {INGEST_HINT}"
        )
    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, config | {"subset": subset_label, "source_version": version}, started)
        psid = con.execute(
            """
            INSERT INTO positive_sets (subset_id, source, source_version, source_sha256, n_pairs_read, n_pairs_kept,
                                       n_unknown_ids, n_captions, n_captions_covered, n_images, n_images_covered,
                                       config_hash, created_at, run_id, n_captions_in_5k_test, n_images_in_5k_test)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            RETURNING positive_set_id
            """,
            [subset_id, name, version, sha, len(pairs), len(kept), unknown, len(caps), n_caps_cov, len(imgs),
             n_imgs_cov, chash, db.now(), run_id, *in_test],
        ).fetchone()[0]  # fmt: skip
        db.insert_df(con, "extra_positives", kept.assign(positive_set_id=np.int64(psid)))
        runs = con.execute(
            "SELECT retrieval_run_id FROM retrieval_runs WHERE subset_id = ? ORDER BY 1", [subset_id]
        ).fetchnumpy()["retrieval_run_id"]
        ranked = [int(r) for r in runs if rank_runs and _rank_into(con, int(r)) > 0]
    return _result(con, int(psid), False, ranked)


def _result(con, psid: int, reused: bool, ranked: list[int]) -> ImportResult:
    row = con.execute(
        """
        SELECT p.*, s.name AS subset FROM positive_sets p JOIN subsets s USING (subset_id)
        WHERE positive_set_id = ?
        """,
        [psid],
    ).df().iloc[0]  # fmt: skip
    coverage = con.execute(
        "SELECT * FROM positive_coverage WHERE positive_set_id = ? ORDER BY direction DESC", [psid]
    ).df()
    return ImportResult(
        psid, int(row["run_id"]), reused, str(row["subset"]), str(row["source"]),
        None if pd.isna(row["source_version"]) else str(row["source_version"]),
        *(int(row[c]) for c in ("n_pairs_read", "n_pairs_kept", "n_unknown_ids", "n_captions", "n_captions_covered",
                                "n_images", "n_images_covered")),
        coverage, ranked,
        *(None if pd.isna(row[c]) else int(row[c]) for c in ("n_captions_in_5k_test", "n_images_in_5k_test")),
    )  # fmt: skip


def _in_5k_test(caps: set[int], imgs: set[int]) -> list[int]:
    """How many of a subset's captions and images are in the COCO 5k test, the split that the packaged sources
    extend (their positives can only apply there)."""
    split = coco5k_test_split("--source eccv|cxc")
    return [len(caps & split.caption_ids), len(imgs & split.image_to_captions.keys())]


def _missing_pairs(con, rrid: int) -> pd.DataFrame:
    """The run's (query, positive) pairs (COCO's and every positive set's of its subset) without a stored rank."""
    return con.execute(
        """
        WITH run AS (SELECT retrieval_run_id, subset_id, direction FROM retrieval_runs WHERE retrieval_run_id = ?),
        coco AS (
            SELECT CASE WHEN run.direction = 'text-to-image' THEN c.caption_id ELSE c.image_id END AS query_id,
                   CASE WHEN run.direction = 'text-to-image' THEN c.image_id ELSE c.caption_id END AS positive_id
            FROM run JOIN subset_captions c USING (subset_id)
        ),
        extra AS (
            SELECT e.query_id, e.positive_id
            FROM run JOIN positive_sets p USING (subset_id)
            JOIN extra_positives e ON e.positive_set_id = p.positive_set_id AND e.direction = run.direction
        ),
        wanted AS (SELECT * FROM coco UNION SELECT * FROM extra)
        SELECT w.query_id, w.positive_id,
            -- text-to-image: the caption's own image is the one ground truth that evaluate ranked; its rank, ties
            -- and score are stored already, from the same scores (image-to-text: n_tied there leaves out the
            -- image's other captions, so every caption is ranked here)
            q.gt_id = w.positive_id AND run.direction = 'text-to-image' AS is_evaluated,
            q.gt_rank, q.n_tied AS gt_n_tied, q.gt_score
        FROM wanted w
        CROSS JOIN run
        JOIN retrieval_ranks q ON q.retrieval_run_id = ? AND q.query_id = w.query_id
        ANTI JOIN (SELECT query_id, positive_id FROM positive_ranks WHERE retrieval_run_id = ?) done
            ON done.query_id = w.query_id AND done.positive_id = w.positive_id
        ORDER BY w.query_id, w.positive_id
        """,
        [rrid, rrid, rrid],
    ).df()


def _rank_into(con, rrid: int) -> int:
    """Compute and insert the missing positive ranks of run `rrid` (inside the caller's transaction)."""
    missing = _missing_pairs(con, rrid)
    if missing.empty:
        return 0
    known = missing[missing["is_evaluated"]]
    db.insert_df(
        con,
        "positive_ranks",
        pd.DataFrame(
            {
                "retrieval_run_id": np.int64(rrid),
                "query_id": known["query_id"],
                "positive_id": known["positive_id"],
                "rank": known["gt_rank"],
                "n_tied": known["gt_n_tied"],
                "score": known["gt_score"],
            }
        ),
    )
    todo = missing.loc[~missing["is_evaluated"], ["query_id", "positive_id"]]
    if todo.empty:
        return len(missing)
    direction, img_set, txt_set = con.execute(
        "SELECT direction, image_embedding_set_id, text_embedding_set_id FROM retrieval_runs "
        "WHERE retrieval_run_id = ?",
        [rrid],
    ).fetchone()
    images = artifacts.load_embedding_set(con, int(img_set))
    texts = artifacts.load_embedding_set(con, int(txt_set))
    queries, gallery = (texts, images) if direction == "text-to-image" else (images, texts)
    q_row = pd.Series(np.arange(len(queries.item_ids)), index=queries.item_ids)
    g_row = pd.Series(np.arange(len(gallery.item_ids)), index=gallery.item_ids)
    qi = q_row.loc[todo["query_id"].to_numpy()].to_numpy()
    gi = g_row.loc[todo["positive_id"].to_numpy()].to_numpy()
    rank = np.empty(len(todo), dtype=np.int64)
    tied = np.empty(len(todo), dtype=np.int64)
    score = np.empty(len(todo), dtype=np.float32)
    uq = np.unique(qi)
    for s in range(0, len(uq), RANK_ROWS):
        rows = uq[s : s + RANK_ROWS]
        S = R.score_rows(queries.array[rows], gallery.array)  # the scores evaluate ranked, bit for bit
        at = np.flatnonzero(np.isin(qi, rows))
        local = np.searchsorted(rows, qi[at])
        sc = S[local, gi[at]]
        S.sort(axis=1)  # ascending, in place: counts by binary search (exact float32 comparisons, as `>` and `==`)
        order = np.argsort(local, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(local[order]) != 0])
        for a, b in zip(starts, np.r_[starts[1:], len(order)]):
            pick = order[a:b]
            row = S[local[pick[0]]]
            left = np.searchsorted(row, sc[pick], side="left")
            right = np.searchsorted(row, sc[pick], side="right")
            rank[at[pick]] = 1 + len(row) - right  # 1 + items scoring strictly higher
            tied[at[pick]] = right - left - 1  # other items with exactly this score
        score[at] = sc
    db.insert_df(
        con,
        "positive_ranks",
        todo.assign(retrieval_run_id=np.int64(rrid), rank=rank, n_tied=tied, score=score),
    )
    return len(missing)


def rank_if_imported(con, retrieval_run_id: int) -> int:
    """For evaluate, inside its transaction: the positive ranks of a new run whose subset has positive sets."""
    rrid = int(retrieval_run_id)
    imported = con.execute(
        "SELECT count(*) FROM positive_sets p JOIN retrieval_runs r USING (subset_id) WHERE r.retrieval_run_id = ?",
        [rrid],
    ).fetchone()[0]
    return _rank_into(con, rrid) if imported else 0


def rank_positives(con, retrieval_run_id: int) -> int:
    """Store the ranks of run `retrieval_run_id`'s positives that are not stored yet; returns how many rows."""
    rrid = int(retrieval_run_id)
    if con.execute("SELECT count(*) FROM retrieval_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()[0] == 0:
        raise UserError(f"No retrieval run {rrid}. List them with: clipfail sql 'SELECT * FROM retrieval_runs'")
    with db.transaction(con):
        return _rank_into(con, rrid)
