"""import-labels and analyze: label import (lenient reading, strict checks, replace semantics), the
taxonomy and agreement views, Figures 1-2, all through the CLI against a temporary DuckDB file.

The retrieval run is built by hand (images, captions, retrieval_runs and retrieval_ranks rows), so these
tests do not depend on ingest/embed/evaluate; the failure sample and the CSVs that annotators fill in
come from the real `clipfail sample-failures` command.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import shutil
import stat
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest
from helpers import label_all, query_df
from PIL import Image

from toolkit.store import db
from toolkit.store.study import open_study

REFERENCE_COUNTS = {
    "Ambiguous": 67,
    "Object": 62,
    "Attribute": 25,
    "Action": 24,
    "Context": 16,
    "Count": 15,
    "Spatial": 1,
}
REFERENCE_PERCENTS = [31.90, 29.52, 11.90, 11.43, 7.62, 7.14, 0.48]  # the reference study's table
# Actionable only (n = 143), by hand: 62/143 = 43.357, 25/143 = 17.483, 24/143 = 16.783,
# 16/143 = 11.189, 15/143 = 10.490, 1/143 = 0.699.
ACTIONABLE_PERCENTS = [43.36, 17.48, 16.78, 11.19, 10.49, 0.70]


# ---------------------------------------------------------------------------------------------
# Fixtures: a hand-made retrieval run, and the real sample-failures exports for it


def make_retrieval_run(con, n_captions: int, n_images: int = 40, first_caption: int = 1000) -> int:
    """Images, captions and a text-to-image run in which every caption is an R@1 failure."""
    images = pd.DataFrame({"image_id": range(1, n_images + 1)})
    images["file_name"] = images["image_id"].map(lambda i: f"{i:012d}.jpg")
    images["rel_path"] = images["file_name"]
    images["width"], images["height"] = 64, 48
    caps = pd.DataFrame({"caption_id": range(first_caption, first_caption + n_captions)})
    caps["image_id"] = [1 + i % n_images for i in range(n_captions)]
    caps["text"] = [f"caption {c}, with a comma" for c in caps["caption_id"]]
    ranks = []
    for c, gt in zip(caps["caption_id"], caps["image_id"]):
        rank = 2 + c % 7
        others = [1 + (gt + k) % n_images for k in range(n_images - 1)]
        order = others[: rank - 1] + [gt] + others[rank - 1 :]
        scores = [round(0.5 - 0.01 * k, 4) for k in range(10)]
        ranks.append(
            {
                "query_id": int(c),
                "gt_id": int(gt),
                "gt_rank": rank,
                "n_tied": 0,
                "gt_score": scores[rank - 1],
                "top1_id": int(order[0]),
                "top1_score": scores[0],
                "topk_ids": [int(x) for x in order[:10]],
                "topk_scores": scores,
            }
        )
    with db.transaction(con):
        have = {r[0] for r in con.execute("SELECT image_id FROM images").fetchall()}
        db.insert_df(con, "images", images[~images["image_id"].isin(have)].reset_index(drop=True))
        db.insert_df(con, "captions", caps)
        rrid = con.execute(
            """
            INSERT INTO retrieval_runs (subset_id, model, text_embedding_set_id, image_embedding_set_id, direction,
                                        tie_policy, topk, config_hash, created_at, run_id)
            VALUES (0, 'hand-made', 0, 0, 'text-to-image', 'optimistic', 10, ?, now(), 0)
            RETURNING retrieval_run_id
            """,
            [f"labels-test-{first_caption}"],
        ).fetchone()[0]
        df = pd.DataFrame(ranks)
        df.insert(0, "retrieval_run_id", rrid)
        db.insert_df(con, "retrieval_ranks", df)
    return int(rrid)


def invoke(*args):
    from click.testing import CliRunner

    from cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def sample(dbpath, out, rrid, **kw):
    opts = {"n": 250, "overlap": 30, "per-annotator": 70, "annotators": "A,B,C"} | kw
    args = ["--db", dbpath, "sample-failures", "--run", rrid, "--out", out, "--no-pictures"]
    for k, v in opts.items():
        args += [f"--{k}", v]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A database with one 300-caption retrieval run and a 250-failure sample: overlap 30, A/B/C 70 each, backup 10."""
    root = tmp_path_factory.mktemp("labels_base")
    path = root / "base.duckdb"
    con = open_study(path)
    rrid = make_retrieval_run(con, 300)
    con.close()
    sample(path, root / "export", rrid)
    return root, rrid


@pytest.fixture
def study(base, tmp_path):
    """A private copy: (db path, export folder, retrieval run id)."""
    root, rrid = base
    shutil.copy(root / "base.duckdb", tmp_path / "db.duckdb")
    shutil.copytree(root / "export", tmp_path / "export")
    return str(tmp_path / "db.duckdb"), tmp_path / "export", rrid


def read_export(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def write_labels(
    src: Path,
    dest: Path,
    labels,
    *,
    columns=None,
    notes=None,
    delimiter=",",
    encoding="utf-8-sig",
    newline="\r\n",
    rename=None,
):
    """A filled-in copy of an exported CSV, written the way a spreadsheet program might save it.

    labels: {sample_id: label} or a function (sample_id) -> label (None leaves the row blank).
    columns: the columns to write, in this order (default: the export's). rename: header spellings.
    notes: a function (sample_id) -> note text.
    """
    header, rows = read_export(src)
    columns = columns or header
    get = labels if callable(labels) else (lambda sid: labels.get(int(sid)))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=newline)
    writer.writerow([(rename or {}).get(c, c) for c in columns])
    for rec in rows:
        label = get(rec["sample_id"])
        rec = {**rec, "category": "" if label is None else label, "notes": notes(rec["sample_id"]) if notes else ""}
        writer.writerow([rec.get(c, "") for c in columns])
    dest.write_bytes(buf.getvalue().encode(encoding))
    return dest


def sample_ids(export: Path, name: str) -> list[int]:
    return [int(r["sample_id"]) for r in read_export(export / name)[1]]


def table(dbpath, sql, params=None) -> pd.DataFrame:
    return query_df(dbpath, sql, params)


def n_annotations(dbpath) -> int:
    return int(table(dbpath, "SELECT count(*) AS n FROM annotations")["n"][0])


def reference_labels(export: Path) -> dict[str, dict[int, str]]:
    """Labels for A/B/C (70 each) with exactly the reference study's counts, shuffled (seeded)."""
    pool = [cat for cat, n in REFERENCE_COUNTS.items() for _ in range(n)]
    random.Random(7).shuffle(pool)
    out, k = {}, 0
    for who in "ABC":
        ids = sample_ids(export, f"assign_{who}.csv")
        out[who] = dict(zip(ids, pool[k : k + len(ids)]))
        k += len(ids)
    assert k == len(pool) == 210
    return out


def overlap_file(export: Path, dest: Path, labels_by_annotator: dict[str, dict[int, str]]) -> Path:
    """One overlap CSV holding every annotator's rows, told apart by an `annotator` column."""
    header, rows = read_export(export / "assign_overlap.csv")
    columns = ["annotator", *header]
    with open(dest, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\r\n")
        writer.writeheader()
        for who, labels in labels_by_annotator.items():
            for rec in rows:
                label = labels.get(int(rec["sample_id"]))
                if label is not None:
                    writer.writerow({**rec, "annotator": who, "category": label})
    return dest


# ---------------------------------------------------------------------------------------------
# The reference table


def test_reference_table_exactly(study, tmp_path):
    dbpath, export, rrid = study
    labels = reference_labels(export)
    files = [write_labels(export / f"assign_{w}.csv", tmp_path / f"assign_{w}.csv", labels[w]) for w in "ABC"]
    # Overlap labels that would change every count if the overlap set were not excluded.
    ov = sample_ids(export, "assign_overlap.csv")
    files.append(overlap_file(export, tmp_path / "assign_overlap.csv", {w: dict.fromkeys(ov, "Spatial") for w in "AB"}))

    res = invoke("--db", dbpath, "import-labels", *files)
    assert res.exit_code == 0, res.output
    assert "Imported 270 labels" in res.output
    assert n_annotations(dbpath) == 270

    dist = table(dbpath, "SELECT * FROM taxonomy_distribution WHERE retrieval_run_id = ?", [rrid])
    assert list(dist["category"]) == list(REFERENCE_COUNTS)
    assert list(dist["count"]) == list(REFERENCE_COUNTS.values())
    assert list(dist["percent"]) == REFERENCE_PERCENTS
    assert (dist["n_total"] == 210).all()
    # The reference table sums to 99.99; the largest-remainder column sums to exactly 100.
    assert table(dbpath, "SELECT sum(percent) AS s FROM taxonomy_distribution")["s"][0] == pytest.approx(99.99)
    lr = table(dbpath, "SELECT sum(percent_lr)::VARCHAR AS s FROM taxonomy_distribution")["s"][0]
    assert lr == "100.00"
    # Remainders: Context .90, Action .86, Spatial .62, then Ambiguous and Attribute tie at .476
    # (10000*67 mod 210 = 10000*25 mod 210 = 100): the larger count (Ambiguous) gets the 4th hundredth.
    assert list(dist["percent_lr"]) == [31.91, 29.52, 11.90, 11.43, 7.62, 7.14, 0.48]

    act = table(dbpath, "SELECT * FROM taxonomy_actionable WHERE retrieval_run_id = ?", [rrid])
    assert list(act["category"]) == ["Object", "Attribute", "Action", "Context", "Count", "Spatial"]
    assert list(act["percent"]) == ACTIONABLE_PERCENTS
    assert list(act["count"]) == [62, 25, 24, 16, 15, 1]

    by = table(dbpath, "SELECT annotator, category, count FROM taxonomy_by_annotator")
    assert set(by["annotator"]) == {"A", "B", "C"}
    assert by.groupby("category")["count"].sum().to_dict() == REFERENCE_COUNTS
    for who in "ABC":
        mine = by[by["annotator"] == who]
        assert len(mine) == 7 and mine["count"].sum() == 70
        expect = pd.Series(labels[who].values()).value_counts().to_dict()
        assert {c: n for c, n in zip(mine["category"], mine["count"]) if n} == expect

    # analyze prints what the views return and writes it as CSV and figures
    out = tmp_path / "analysis"
    res = invoke("--db", dbpath, "analyze", "--out", out)
    assert res.exit_code == 0, res.output
    for cat, pct in zip(REFERENCE_COUNTS, REFERENCE_PERCENTS):
        assert any(cat in line and f"{pct:.2f}" in line for line in res.output.splitlines()), (cat, res.output)
    with open(out / "taxonomy_distribution.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["category"], r["count"], r["percent"]) for r in rows] == [
        (c, str(n), f"{p:.2f}") for (c, n), p in zip(REFERENCE_COUNTS.items(), REFERENCE_PERCENTS)
    ]
    for stem in ("figure1_taxonomy", "figure2_actionable"):
        with Image.open(out / f"{stem}.png") as im:
            assert im.width >= 800 and im.height >= 600
        svg = (out / f"{stem}.svg").read_text()
        assert "<svg" in svg
    svg1 = (out / "figure1_taxonomy.svg").read_text()
    assert "31.90%" in svg1 and "0.48%" in svg1 and "Ambiguous" in svg1
    svg2 = (out / "figure2_actionable.svg").read_text()
    assert "43.36%" in svg2 and "Ambiguous" not in svg2
    for name in ("taxonomy_actionable", "taxonomy_by_annotator", "annotator_agreement"):
        assert (out / f"{name}.csv").stat().st_size > 0

    # the README's example queries run (queries/examples/labels.sql)
    examples = Path(__file__).parent.parent / "queries" / "examples" / "labels.sql"
    statements = [s for s in examples.read_text().split(";") if s.strip()]
    assert len(statements) == 5
    statements = ["\n".join(ln for ln in s.splitlines() if not ln.startswith("--")) for s in statements]
    for stmt in statements:
        res = invoke("--db", dbpath, "sql", stmt)
        assert res.exit_code == 0, (stmt, res.output)
    gap = invoke("--db", dbpath, "sql", statements[-1]).output
    assert "Ambiguous 67 " in gap and "Spatial  1 " in gap  # the overlap set's 60 Spatial labels stay out


# ---------------------------------------------------------------------------------------------
# Agreement: a hand-computed example and textbook examples, through the view


def import_overlap(dbpath, export, tmp_path, labels_by_annotator):
    path = overlap_file(export, tmp_path / "assign_overlap.csv", labels_by_annotator)
    res = invoke("--db", dbpath, "import-labels", path)
    assert res.exit_code == 0, res.output
    return res


def agreement(dbpath):
    return table(dbpath, "SELECT * FROM annotator_agreement")


def test_agreement_hand_computed(study, tmp_path):
    dbpath, export, rrid = study
    ids = sample_ids(export, "assign_overlap.csv")[:6]
    A = ["Object", "Object", "Ambiguous", "Attribute", "Ambiguous", "Action"]
    B = ["Object", "Attribute", "Ambiguous", "Attribute", "Object", "Action"]
    C = ["Object", "Object", "Action", "Attribute", "Ambiguous", "Action"]
    import_overlap(dbpath, export, tmp_path, {w: dict(zip(ids, x)) for w, x in zip("ABC", (A, B, C))})
    ag = agreement(dbpath)
    cohen = ag[ag["measure"] == "cohen"].set_index("annotators")
    # By hand. Every pair's marginals give p_e = 9/36 = 1/4:
    #   A,B agree on 4 of 6: (2/3 - 1/4) / (3/4) = 5/9
    #   A,C agree on 5 of 6: (5/6 - 1/4) / (3/4) = 7/9
    #   B,C agree on 3 of 6: (1/2 - 1/4) / (3/4) = 1/3
    assert list(cohen.index) == ["A,B", "A,C", "B,C"]
    assert list(cohen["n_items"]) == [6, 6, 6]
    assert list(cohen["n_agree"]) == [4, 5, 3]
    assert list(cohen["percent_agreement"]) == [66.67, 83.33, 50.0]
    assert cohen["expected_agreement"].tolist() == pytest.approx([0.25] * 3, abs=1e-12)
    assert cohen["kappa"].tolist() == pytest.approx([5 / 9, 7 / 9, 1 / 3], abs=1e-12)
    # Fleiss, by hand: P_i = 1, 1/3, 1/3, 1, 1/3, 1 -> P_bar = 2/3; category shares 6/18, 4/18, 4/18,
    # 4/18 -> P_e = 84/324 = 7/27; kappa = (2/3 - 7/27) / (20/27) = 11/20. Unanimous: items 1, 4, 6.
    fl = ag[ag["measure"] == "fleiss"].iloc[0]
    assert fl["annotators"] == "A,B,C" and fl["n_annotators"] == 3 and fl["n_items"] == 6 and fl["n_agree"] == 3
    assert fl["observed_agreement"] == pytest.approx(2 / 3, abs=1e-12)
    assert fl["expected_agreement"] == pytest.approx(7 / 27, abs=1e-12)
    assert fl["kappa"] == pytest.approx(11 / 20, abs=1e-12)

    # Majorities: 2 of 3 wins; sample_labels has the overlap samples with their majority label.
    sl = table(dbpath, "SELECT * FROM sample_labels WHERE is_overlap ORDER BY draw_order")
    assert list(sl["category"]) == ["Object", "Object", "Ambiguous", "Attribute", "Ambiguous", "Action"]
    assert list(sl["n_labels"]) == [3] * 6 and list(sl["n_votes"]) == [3, 2, 2, 3, 2, 3]
    assert not sl["is_tie"].any()
    # The overlap set stays out of the taxonomy tables.
    assert table(dbpath, "SELECT count(*) AS n FROM taxonomy_distribution")["n"][0] == 0


def test_cohen_kappa_textbook_example(tmp_path):
    """The worked example of the Wikipedia article "Cohen's kappa": 50 applications, rater A says
    yes/B yes 20, A yes/B no 5, A no/B yes 10, A no/B no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4."""
    dbpath = str(tmp_path / "cohen.duckdb")
    con = open_study(dbpath)
    rrid = make_retrieval_run(con, 60)
    con.close()
    sample(dbpath, tmp_path / "big", rrid, n=60, overlap=50, **{"per-annotator": 5}, annotators="A,B")
    ids = sample_ids(tmp_path / "big", "assign_overlap.csv")
    assert len(ids) == 50
    yes, no = "Object", "Attribute"
    a = [yes] * 20 + [yes] * 5 + [no] * 10 + [no] * 15
    b = [yes] * 20 + [no] * 5 + [yes] * 10 + [no] * 15
    import_overlap(dbpath, tmp_path / "big", tmp_path, {"A": dict(zip(ids, a)), "B": dict(zip(ids, b))})
    ag = agreement(dbpath)
    row = ag[ag["measure"] == "cohen"].iloc[0]
    assert (row["annotator_a"], row["annotator_b"], row["n_items"], row["n_agree"]) == ("A", "B", 50, 35)
    assert row["observed_agreement"] == pytest.approx(0.7, abs=1e-12)
    assert row["expected_agreement"] == pytest.approx(0.5, abs=1e-12)
    assert row["kappa"] == pytest.approx(0.4, abs=1e-12)
    # With two annotators Fleiss' kappa is Scott's pi: p_e from pooled shares (30/100, 70/100... here
    # yes = 55/100, no = 45/100) -> P_e = 0.505, kappa = (0.7 - 0.505) / 0.495.
    fl = ag[ag["measure"] == "fleiss"].iloc[0]
    assert fl["kappa"] == pytest.approx((0.7 - 0.505) / 0.495, abs=1e-12)


def test_fleiss_kappa_textbook_example(tmp_path):
    """The worked example of the Wikipedia article "Fleiss' kappa": 14 raters put 10 items in 5
    categories; P_bar = 0.378, P_e = 0.213, kappa = 0.210."""
    table_ = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    cats = ["Object", "Attribute", "Action", "Context", "Count"]
    raters = [f"R{i:02d}" for i in range(1, 15)]
    dbpath = str(tmp_path / "fleiss.duckdb")
    con = open_study(dbpath)
    rrid = make_retrieval_run(con, 12)
    con.close()
    export = tmp_path / "export"
    sample(dbpath, export, rrid, n=10, overlap=10, **{"per-annotator": 0}, annotators=",".join(raters))
    ids = sample_ids(export, "assign_overlap.csv")
    labels = {r: {} for r in raters}
    for sid, counts in zip(ids, table_):
        item = [c for c, k in zip(cats, counts) for _ in range(k)]
        for r, c in zip(raters, item):
            labels[r][sid] = c
    import_overlap(dbpath, export, tmp_path, labels)
    fl = agreement(dbpath).query("measure == 'fleiss'").iloc[0]
    assert fl["n_annotators"] == 14 and fl["n_items"] == 10 and fl["n_agree"] == 1
    assert round(fl["observed_agreement"], 3) == 0.378
    assert round(fl["expected_agreement"], 3) == 0.213
    assert round(fl["kappa"], 3) == 0.210
    exact = Fraction(0)
    p_bar = sum(Fraction(sum(k * k for k in row) - 14, 14 * 13) for row in table_) / 10
    p_e = sum(Fraction(sum(row[j] for row in table_), 140) ** 2 for j in range(5))
    exact = (p_bar - p_e) / (1 - p_e)
    assert fl["kappa"] == pytest.approx(float(exact), abs=1e-12)
    # 14 raters give 91 pairs of Cohen's kappa
    assert (agreement(dbpath)["measure"] == "cohen").sum() == 91


def test_agreement_matches_toolkit_stats(study, tmp_path):
    from toolkit import stats

    dbpath, export, rrid = study
    ids = sample_ids(export, "assign_overlap.csv")
    rng = random.Random(3)
    cats = list(REFERENCE_COUNTS)
    labels = {w: {sid: rng.choice(cats[: 3 + "ABC".index(w)]) for sid in ids} for w in "ABC"}
    import_overlap(dbpath, export, tmp_path, labels)
    ag = agreement(dbpath)
    for row in ag[ag["measure"] == "cohen"].itertuples():
        a = [labels[row.annotator_a][s] for s in ids]
        b = [labels[row.annotator_b][s] for s in ids]
        assert row.kappa == pytest.approx(stats.cohen_kappa(a, b), abs=1e-9)
    fl = ag[ag["measure"] == "fleiss"].iloc[0]
    assert fl["kappa"] == pytest.approx(stats.fleiss_kappa([[labels[w][s] for w in "ABC"] for s in ids]), abs=1e-9)


def test_majority_tie_rule_and_partial_overlap(study, tmp_path):
    dbpath, export, rrid = study
    ids = sample_ids(export, "assign_overlap.csv")[:4]
    a = dict(zip(ids, ["Attribute", "Count", "Object", "Spatial; Object"]))
    b = dict(zip(ids, ["Object", "Ambiguous", "Object", "Spatial"]))
    c = {ids[3]: "Context; Count"}  # C labelled one overlap sample only
    import_overlap(dbpath, export, tmp_path, {"A": a, "B": b, "C": c})
    sl = table(dbpath, "SELECT * FROM sample_labels WHERE is_overlap ORDER BY draw_order")
    # Ties go to the category first in taxonomy order: Object (1) before Attribute (2);
    # Ambiguous (0) before Count (5). Sample 4: Spatial 2 votes to Context 1; its secondary is the
    # most frequent among Spatial voters (Object).
    assert list(sl["category"]) == ["Object", "Ambiguous", "Object", "Spatial"]
    assert list(sl["is_tie"]) == [True, True, False, False]
    assert list(sl["n_labels"]) == [2, 2, 2, 3]
    assert sl["secondary_category"].tolist()[3] == "Object"
    ag = agreement(dbpath)
    pairs = ag[ag["measure"] == "cohen"].set_index("annotators")
    assert pairs.loc["A,B", "n_items"] == 4 and pairs.loc["A,C", "n_items"] == 1
    # Fleiss uses the one item that all three labelled (Spatial, Spatial, Context): P_bar = 2/6,
    # P_e = (2/3)^2 + (1/3)^2 = 5/9, kappa = (1/3 - 5/9) / (4/9) = -1/2.
    fl = ag[ag["measure"] == "fleiss"].iloc[0]
    assert fl["n_items"] == 1 and fl["n_agree"] == 0
    assert fl["kappa"] == pytest.approx(-0.5, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Reading what spreadsheet programs save


def resave(src: Path, dest: Path, labels, variant: str) -> Path:
    if variant == "excel-comma":  # as exported: BOM, CRLF, ','
        return write_labels(src, dest, labels)
    if variant == "semicolon-lf-no-bom":  # LibreOffice in a ';' locale
        return write_labels(src, dest, labels, delimiter=";", encoding="utf-8", newline="\n")
    if variant == "excel-sep-line":  # Excel's "sep=;" hint before the header
        write_labels(src, dest, labels, delimiter=";")
        dest.write_bytes(b"sep=;\r\n" + dest.read_bytes().removeprefix(b"\xef\xbb\xbf"))
        return dest
    if variant == "utf16-tab":  # Excel's "Unicode text"
        return write_labels(src, dest, labels, delimiter="\t", encoding="utf-16")
    if variant == "cp1252-reordered":  # Excel "CSV (Comma delimited)" on Windows, columns moved, one added
        header, _ = read_export(src)
        cols = ["notes", "category", "reviewer"] + [c for c in header if c not in ("notes", "category")]
        return write_labels(
            src,
            dest,
            labels,
            columns=cols,
            notes=lambda sid: f"café, «{sid}»",
            encoding="cp1252",
            rename={"sample_id": "Sample ID", "category": "Category"},
        )
    raise AssertionError(variant)


@pytest.mark.parametrize(
    "variant", ["excel-comma", "semicolon-lf-no-bom", "excel-sep-line", "utf16-tab", "cp1252-reordered"]
)
def test_resaved_spreadsheets_import_the_same(study, tmp_path, variant):
    dbpath, export, rrid = study
    ids = sample_ids(export, "assign_B.csv")
    messy = [" objects ", "OBJ", "attr.", "Object/Attribute", "colour", "Ambiguous", "counts", "Spatial relations"]
    labels = {sid: messy[i % len(messy)] if i % 10 != 9 else None for i, sid in enumerate(ids)}
    path = resave(export / "assign_B.csv", tmp_path / "assign_B.csv", labels, variant)
    res = invoke("--db", dbpath, "import-labels", path)
    assert res.exit_code == 0, res.output
    assert "Imported 63 labels" in res.output
    assert "7 rows have no label yet (unlabeled); they were not imported." in res.output
    got = table(dbpath, "SELECT sample_id, annotator, raw_label, category, secondary_category FROM annotations")
    assert len(got) == 63 and set(got["annotator"]) == {"B"}
    expect = {
        " objects ": ("Object", None),
        "OBJ": ("Object", None),
        "attr.": ("Attribute", None),
        "Object/Attribute": ("Object", "Attribute"),
        "colour": ("Attribute", None),
        "Ambiguous": ("Ambiguous", None),
        "counts": ("Count", None),
        "Spatial relations": ("Spatial", None),
    }
    for rec in got.itertuples():
        want = expect[labels[rec.sample_id]]
        assert (rec.category, None if pd.isna(rec.secondary_category) else rec.secondary_category) == want
        assert rec.raw_label.strip() == labels[rec.sample_id].strip()


def test_a_stray_byte_in_a_utf8_file_is_refused_not_read_as_windows_1252(study, tmp_path):
    # one non-UTF-8 byte used to make the whole file decode as cp1252, garbling every accented note
    dbpath, export, _ = study
    ids = sample_ids(export, "assign_B.csv")
    good = write_labels(
        export / "assign_B.csv", tmp_path / "assign_B.csv", {sid: "Object" for sid in ids}, notes=lambda s: "café"
    )
    data = good.read_bytes()
    at = data.index(b"caf\xc3\xa9", len(data) // 2)  # a note in the middle of the file
    bad = tmp_path / "stray" / "assign_B.csv"
    bad.parent.mkdir()
    bad.write_bytes(data[:at] + b"caf\xe9" + data[at + 5 :])
    res = invoke("--db", dbpath, "import-labels", bad)
    assert res.exit_code == 2 and "Traceback" not in res.output
    row = data[:at].count(b"\n") + 1
    assert f"row {row} (byte offset {at + 3}: 0xe9)" in res.output and "UTF-8" in res.output
    assert n_annotations(dbpath) == 0
    # the clean UTF-8 file imports with its accents intact, and says nothing about its encoding
    res = invoke("--db", dbpath, "import-labels", good)
    assert res.exit_code == 0 and "was read as" not in res.output
    assert set(table(dbpath, "SELECT notes FROM annotations")["notes"]) == {"café"}


def test_a_windows_1252_file_says_so_and_one_that_is_neither_is_refused(study, tmp_path):
    dbpath, export, _ = study
    ids = sample_ids(export, "assign_B.csv")
    ansi = write_labels(
        export / "assign_B.csv",
        tmp_path / "assign_B.csv",
        {sid: "Object" for sid in ids},
        notes=lambda s: "café",
        encoding="cp1252",
    )
    res = invoke("--db", dbpath, "import-labels", ansi)
    assert res.exit_code == 0 and f"{ansi} was read as Windows-1252 (it is not UTF-8)." in res.output
    assert set(table(dbpath, "SELECT notes FROM annotations")["notes"]) == {"café"}
    # 0x81 is undefined in Windows-1252 and not UTF-8: refused with where it is
    data = ansi.read_bytes()
    at = data.index(b"caf\xe9")
    other = tmp_path / "other" / "assign_B.csv"
    other.parent.mkdir()
    other.write_bytes(data[:at] + b"\x81" + data[at + 1 :])
    res = invoke("--db", dbpath, "import-labels", other)
    assert (
        res.exit_code == 2
        and f"byte offset {at}: 0x81" in res.output
        and "neither UTF-8 nor Windows-1252" in res.output
    )


def test_quoted_newlines_and_row_numbers(study, tmp_path):
    """A caption or note with line breaks is one spreadsheet row; errors name spreadsheet rows."""
    dbpath, export, rrid = study
    header, rows = read_export(export / "assign_A.csv")
    a_ids = [int(r["sample_id"]) for r in rows]
    b_id = sample_ids(export, "assign_B.csv")[0]
    backup_id = sample_ids(export, "assign_backup.csv")[0]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    cells = {c: "" for c in header}
    w.writerow([{**cells, "sample_id": a_ids[0], "caption": "two\nlines", "category": "Object"}[c] for c in header])
    w.writerow(
        [
            {**cells, "sample_id": a_ids[1], "notes": 'a "quoted"\nnote, 3 lines\n!', "category": "Objekt"}[c]
            for c in header
        ]
    )
    w.writerow([{**cells, "sample_id": 999999, "category": "Object"}[c] for c in header])
    w.writerow([{**cells, "sample_id": b_id, "category": "Object"}[c] for c in header])
    w.writerow([{**cells, "sample_id": backup_id, "category": "Object"}[c] for c in header])
    w.writerow([{**cells, "sample_id": a_ids[0], "category": "Count"}[c] for c in header])
    w.writerow([{**cells, "sample_id": "x12", "category": "Count"}[c] for c in header])
    w.writerow([{**cells, "sample_id": a_ids[2], "category": "Object, Attribute, Count"}[c] for c in header])
    w.writerow([{**cells, "sample_id": a_ids[3], "category": "Context"}[c] for c in header])
    w.writerow([""] * len(header))  # trailing empty rows are ignored
    path = tmp_path / "assign_A.csv"
    path.write_bytes(buf.getvalue().encode("utf-8-sig"))
    good = write_labels(export / "assign_C.csv", tmp_path / "assign_C.csv", lambda s: "Object")

    res = invoke("--db", dbpath, "import-labels", good, path)
    assert res.exit_code == 2, res.output
    out = res.output
    assert "Traceback" not in out
    assert "Nothing was imported: 7 problems in 1 file" in out
    assert "row 3: unknown category 'objekt' in label 'Objekt'" in out
    assert "row 4: sample 999999 is not in the failure sample" in out
    assert f"row 5: sample {b_id} is in B's set, not A's" in out
    assert f"row 6: sample {backup_id} is in the backup set (assigned to nobody), not A's" in out
    assert f"row 7: sample {a_ids[0]} is labelled by A twice (also at row 2)" in out
    assert "row 8: sample_id 'x12' is not a whole number" in out
    assert "row 9: label 'Object, Attribute, Count' names 3 categories" in out
    assert "row 2:" not in out and "row 10" not in out
    assert "Known categories: Ambiguous, Object, Attribute" in out
    assert n_annotations(dbpath) == 0  # the good file was not imported either


# ---------------------------------------------------------------------------------------------
# Malformed files: each has its message, and nothing is imported


def _malformed(tmp_path: Path, export: Path, case: str) -> tuple[Path, str]:
    header, rows = read_export(export / "assign_A.csv")
    p = tmp_path / "assign_A.csv"
    if case == "missing":
        return tmp_path / "nowhere" / "assign_A.csv", "does not exist"
    if case == "folder":
        d = tmp_path / "assign_A_dir"
        d.mkdir()
        return d, "is a folder"
    if case == "empty":
        p.write_bytes(b"")
        return p, "is empty"
    if case == "blank":
        p.write_bytes(b"\xef\xbb\xbf\r\n  \r\n")
        return p, "is empty"
    if case == "header-only":
        p.write_text(",".join(header) + "\r\n", encoding="utf-8-sig")
        return p, "has a header but no rows"
    if case == "xlsx":
        p = tmp_path / "assign_A.xlsx"
        p.write_bytes(b"PK\x03\x04" + bytes(200))
        return p, "not a CSV"
    if case == "binary":
        p.write_bytes(bytes(range(256)) * 4)
        return p, "is not a text CSV file"
    if case == "no-sample-id":
        p.write_text("id,category\n1,Object\n", encoding="utf-8")
        return p, "has no sample_id column"
    if case == "not-csv":
        p.write_text('{"sample": 1, "labels": ["Object"]}\n', encoding="utf-8")
        return p, "has no sample_id column"
    if case == "no-category":
        p.write_text("sample_id,caption,notes\n" + rows[0]["sample_id"] + ",x,y\n", encoding="utf-8")
        return p, "has no category column"
    if case == "two-category-columns":
        p.write_text("sample_id,category,Category\n" + rows[0]["sample_id"] + ",Object,Count\n", encoding="utf-8")
        return p, "has 2 category columns"
    if case == "overlap-without-annotator":
        p = write_labels(export / "assign_overlap.csv", tmp_path / "assign_overlap.csv", lambda s: "Object")
        return p, "it is the overlap set, which every annotator labels. Give --annotator NAME"
    if case == "unknown-annotator-in-name":
        p = write_labels(export / "assign_A.csv", tmp_path / "assign_Z.csv", lambda s: "Object")
        return p, "'Z' (from the file name 'assign_Z.csv') is not an annotator of the sample (A, B, C)"
    if case == "no-annotator-in-name":
        p = write_labels(export / "assign_A.csv", tmp_path / "labels.csv", lambda s: "Object")
        return p, "Cannot tell whose labels are in"
    raise AssertionError(case)


MALFORMED = [
    "missing",
    "folder",
    "empty",
    "blank",
    "header-only",
    "xlsx",
    "binary",
    "no-sample-id",
    "not-csv",
    "no-category",
    "two-category-columns",
    "overlap-without-annotator",
    "unknown-annotator-in-name",
    "no-annotator-in-name",
]


def test_each_malformed_file_has_its_message_and_imports_nothing(study, tmp_path):
    dbpath, export, rrid = study
    good = write_labels(export / "assign_B.csv", tmp_path / "assign_B.csv", lambda s: "Object")
    runs_before = table(dbpath, "SELECT count(*) AS n FROM runs")["n"][0]
    for case in MALFORMED:
        case_dir = tmp_path / case
        case_dir.mkdir()
        bad, message = _malformed(case_dir, export, case)
        res = invoke("--db", dbpath, "import-labels", good, bad)
        assert res.exit_code == 2, (case, res.output)
        assert "Traceback" not in res.output and message in res.output, (case, res.output)
        assert "Nothing was imported" in res.output, (case, res.output)
        if case in ("missing", "empty", "no-category"):  # alone, the message is the same
            alone = invoke("--db", dbpath, "import-labels", bad)
            assert alone.exit_code == 2 and message in alone.output, (case, alone.output)
    assert n_annotations(dbpath) == 0
    assert table(dbpath, "SELECT count(*) AS n FROM runs")["n"][0] == runs_before
    # all the bad files at once: every one is reported
    bads = []
    for case in ("empty", "no-category", "xlsx"):
        d = tmp_path / f"all-{case}"
        d.mkdir()
        bads.append(_malformed(d, export, case))
    res = invoke("--db", dbpath, "import-labels", *[b for b, _ in bads])
    assert res.exit_code == 2 and "3 problems in 3 files" in res.output
    assert all(m in res.output for _, m in bads)


def test_a_fifo_or_device_given_as_a_label_file_is_refused_not_opened(study, tmp_path):
    from helpers import invoke_unblocking

    dbpath, export, rrid = study
    good = write_labels(export / "assign_B.csv", tmp_path / "assign_B.csv", lambda s: "Object")
    fifo = tmp_path / "assign_A.csv"
    os.mkfifo(fifo)
    runs_before = table(dbpath, "SELECT * FROM runs ORDER BY run_id")
    for bad, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a device")):  # /dev/zero would never end
        res = invoke_unblocking(["--db", dbpath, "import-labels", good, bad], [fifo])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"{bad} is {kind}" in res.output and "Nothing was imported" in res.output, res.output
    assert n_annotations(dbpath) == 0
    pd.testing.assert_frame_equal(table(dbpath, "SELECT * FROM runs ORDER BY run_id"), runs_before)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_annotator_option_and_column(study, tmp_path):
    dbpath, export, rrid = study
    ov = sample_ids(export, "assign_overlap.csv")
    # the overlap file for one annotator, given by --annotator (case-insensitive)
    f = write_labels(export / "assign_overlap.csv", tmp_path / "assign_overlap.csv", lambda s: "Count")
    res = invoke("--db", dbpath, "import-labels", f, "--annotator", "b")
    assert res.exit_code == 0, res.output
    got = table(dbpath, "SELECT DISTINCT annotator, category FROM annotations")
    assert got.values.tolist() == [["B", "Count"]]
    assert n_annotations(dbpath) == len(ov)
    # --annotator on A's file: A's samples are not B's
    fa = write_labels(export / "assign_A.csv", tmp_path / "assign_A.csv", lambda s: "Count")
    res = invoke("--db", dbpath, "import-labels", fa, "--annotator", "B")
    assert res.exit_code == 2 and "is in A's set, not B's" in res.output
    # an annotator column that disagrees with --annotator
    g = overlap_file(export, tmp_path / "ov2.csv", {"A": dict.fromkeys(ov, "Object")})
    res = invoke("--db", dbpath, "import-labels", g, "--annotator", "C")
    assert res.exit_code == 2 and "the annotator column says 'A' but --annotator says C" in res.output
    res = invoke("--db", dbpath, "import-labels", g, "--annotator", "nobody")
    assert res.exit_code == 2 and "--annotator 'nobody' is not an annotator" in res.output
    # a renamed copy still names its annotator
    h = write_labels(export / "assign_C.csv", tmp_path / "assign_C (1).csv", lambda s: "Action")
    res = invoke("--db", dbpath, "import-labels", h)
    assert res.exit_code == 0, res.output
    assert set(table(dbpath, "SELECT annotator FROM annotations")["annotator"]) == {"B", "C"}


# ---------------------------------------------------------------------------------------------
# Re-import


def test_reimport_replaces_never_duplicates(study, tmp_path):
    dbpath, export, rrid = study
    ids = sample_ids(export, "assign_A.csv")
    f = write_labels(export / "assign_A.csv", tmp_path / "assign_A.csv", lambda s: "Object")
    assert invoke("--db", dbpath, "import-labels", f).exit_code == 0
    assert n_annotations(dbpath) == 70
    runs = table(dbpath, "SELECT count(*) AS n FROM runs WHERE stage = 'import-labels'")["n"][0]

    again = invoke("--db", dbpath, "import-labels", f)
    assert again.exit_code == 0 and "already imported exactly as they are" in again.output
    assert table(dbpath, "SELECT count(*) AS n FROM runs WHERE stage = 'import-labels'")["n"][0] == runs

    # change 5 labels, blank 3: 67 replaced, the 3 blank rows keep their labels, one row per key
    changed = {s: ("Count" if i < 5 else None if i < 8 else "Object") for i, s in enumerate(ids)}
    (tmp_path / "v2").mkdir()
    f2 = write_labels(export / "assign_A.csv", tmp_path / "v2" / "assign_A.csv", changed)
    res = invoke("--db", dbpath, "import-labels", f2)
    assert res.exit_code == 0, res.output
    assert "Imported 67 labels" in res.output and "67 earlier labels were replaced" in res.output
    assert "3 blank rows have a label imported earlier, which was kept" in res.output
    count_per_key = "count(*) OVER (PARTITION BY sample_id, annotator) AS k"
    got = table(dbpath, f"SELECT sample_id, category, {count_per_key} FROM annotations")
    assert len(got) == 70 and (got["k"] == 1).all()
    assert (got["category"] == "Count").sum() == 5 and (got["category"] == "Object").sum() == 65
    # again: a no-op (the kept labels do not count as a change)
    assert "already imported exactly" in invoke("--db", dbpath, "import-labels", f2).output

    # --clear-blank removes the labels of blank rows
    res = invoke("--db", dbpath, "import-labels", f2, "--clear-blank")
    assert res.exit_code == 0 and "3 earlier labels were removed (--clear-blank)" in res.output, res.output
    got = table(dbpath, f"SELECT sample_id, category, {count_per_key} FROM annotations")
    assert len(got) == 67 and (got["k"] == 1).all()
    assert set(got["sample_id"]) == {s for s, lab in changed.items() if lab}
    assert table(dbpath, "SELECT count(*) AS n FROM sample_labels")["n"][0] == 67

    # the unfilled export, imported by mistake, destroys nothing
    res = invoke("--db", dbpath, "import-labels", export / "assign_A.csv")
    assert res.exit_code == 0 and "67 blank rows have a label imported earlier, which was kept" in res.output
    assert n_annotations(dbpath) == 67
    res = invoke("--db", dbpath, "import-labels", export / "assign_B.csv")
    assert "Nothing to import: every row's category is blank" in res.output
    assert n_annotations(dbpath) == 67


def test_import_is_one_transaction(study, tmp_path, monkeypatch):
    """An import that dies after deleting the old labels, before inserting the new ones, leaves the old ones."""
    dbpath, export, rrid = study
    f = write_labels(export / "assign_A.csv", tmp_path / "assign_A.csv", lambda s: "Object")
    assert invoke("--db", dbpath, "import-labels", f).exit_code == 0
    before = table(dbpath, "SELECT * FROM annotations ORDER BY sample_id")
    runs = table(dbpath, "SELECT count(*) AS n FROM runs")["n"][0]

    real_insert = db.insert_df

    def dying_insert(con, name, df):
        if name == "annotations":
            raise KeyboardInterrupt
        return real_insert(con, name, df)

    monkeypatch.setattr(db, "insert_df", dying_insert)
    g = write_labels(export / "assign_A.csv", tmp_path / "v2.csv", lambda s: "Count")
    res = invoke("--db", dbpath, "import-labels", g, "--annotator", "A")
    assert res.exit_code == 130, res.output
    monkeypatch.undo()
    pd.testing.assert_frame_equal(table(dbpath, "SELECT * FROM annotations ORDER BY sample_id"), before)
    assert table(dbpath, "SELECT count(*) AS n FROM runs")["n"][0] == runs


def test_failure_details_and_multiple_runs(study, tmp_path):
    dbpath, export, rrid = study
    a_ids = sample_ids(export, "assign_A.csv")
    f = write_labels(export / "assign_A.csv", tmp_path / "assign_A.csv", {a_ids[0]: "Object; Count"})
    assert invoke("--db", dbpath, "import-labels", f).exit_code == 0
    fd = table(dbpath, "SELECT * FROM failure_details WHERE sample_id = ?", [a_ids[0]]).iloc[0]
    rank = table(
        dbpath,
        "SELECT * FROM retrieval_ranks WHERE retrieval_run_id = ? AND query_id = ?",
        [rrid, int(fd["caption_id"])],
    ).iloc[0]
    assert fd["caption"] == f"caption {fd['caption_id']}, with a comma"
    assert fd["gt_image_id"] == rank["gt_id"] and fd["gt_file_name"] == f"{rank['gt_id']:012d}.jpg"
    assert fd["top1_image_id"] == rank["top1_id"] and fd["top1_file_name"] == f"{rank['top1_id']:012d}.jpg"
    assert fd["gt_rank"] == rank["gt_rank"] and fd["gt_rank"] > 1
    assert fd["category"] == "Object" and fd["secondary_category"] == "Count" and fd["n_labels"] == 1
    assert table(dbpath, "SELECT count(*) AS n FROM failure_details")["n"][0] == 250
    assert table(dbpath, "SELECT count(*) AS n FROM failure_details WHERE category IS NOT NULL")["n"][0] == 1

    # a second retrieval run with its own sample and labels: every view keeps them apart
    con = open_study(dbpath)
    rr2 = make_retrieval_run(con, 20, first_caption=5000)
    con.close()
    sample(dbpath, tmp_path / "export2", rr2, n=10, overlap=2, **{"per-annotator": 4}, annotators="A,D")
    g = write_labels(tmp_path / "export2" / "assign_D.csv", tmp_path / "assign_D.csv", lambda s: "Spatial")
    res = invoke("--db", dbpath, "import-labels", g)
    assert res.exit_code == 0, res.output
    dist = table(dbpath, "SELECT retrieval_run_id, category, count, n_total FROM taxonomy_distribution WHERE count > 0")
    assert dist.values.tolist() == [[rrid, "Object", 1, 1], [rr2, "Spatial", 4, 4]]
    res = invoke("--db", dbpath, "analyze", "--out", tmp_path / "an1", "--run", rrid)
    assert res.exit_code == 0 and f"retrieval run {rrid}: 1 labelled" in res.output
    res = invoke("--db", dbpath, "analyze", "--out", tmp_path / "an2")  # default: the run labelled last
    assert res.exit_code == 0 and f"retrieval run {rr2}: 4 labelled" in res.output
    res = invoke("--db", dbpath, "analyze", "--out", tmp_path / "an3", "--run", 12345)
    assert res.exit_code == 2 and "No retrieval run with id 12345. Runs with labels:" in res.output


def test_analyze_without_labels(study, tmp_path):
    dbpath, export, rrid = study
    res = invoke("--db", dbpath, "analyze", "--out", tmp_path / "a")
    assert res.exit_code == 2 and "No labels have been imported yet" in res.output
    res = invoke("--db", str(tmp_path / "fresh.duckdb"), "import-labels", export / "assign_A.csv")
    assert res.exit_code == 2 and "no failure sample" in res.output


def test_simulated_labels_are_marked(study, tmp_path):
    """The demo's simulated annotators go through the same import, flagged in the rows, views and output."""
    from toolkit.labels.label_import import import_labels

    dbpath, export, rrid = study
    f = write_labels(export / "assign_A.csv", tmp_path / "assign_A.csv", lambda s: "Object")
    con = open_study(dbpath)
    try:
        res = import_labels(con, [f], simulated=True)
    finally:
        con.close()
    assert not res.is_noop and res.n_labelled == 70
    assert table(dbpath, "SELECT bool_and(is_simulated) AS s FROM annotations")["s"][0]
    assert table(dbpath, "SELECT bool_and(is_simulated) AS s FROM taxonomy_distribution")["s"][0]
    out = invoke("--db", dbpath, "analyze", "--out", tmp_path / "an")
    assert out.exit_code == 0 and "SIMULATED" in out.output
    assert "SIMULATED" in (tmp_path / "an" / "figure1_taxonomy.svg").read_text()
    # the same file imported as human labels is a change, not a no-op
    real = invoke("--db", dbpath, "import-labels", f)
    assert real.exit_code == 0 and "Imported 70 labels" in real.output
    assert not table(dbpath, "SELECT bool_or(is_simulated) AS s FROM annotations")["s"][0]


def test_analyze_with_overlap_labels_only(study, tmp_path):
    dbpath, export, rrid = study
    ids = sample_ids(export, "assign_overlap.csv")
    import_overlap(dbpath, export, tmp_path, {"A": dict.fromkeys(ids, "Object"), "C": dict.fromkeys(ids, "Object")})
    res = invoke("--db", dbpath, "analyze", "--out", tmp_path / "an")
    assert res.exit_code == 0, res.output
    assert "0 labelled samples" in res.output and "(30 labelled samples)" in res.output
    assert "kappa is blank where it is undefined" in res.output
    written = sorted(p.name for p in (tmp_path / "an").iterdir() if p.name != ".clipfail-manifest.json")
    assert written == [
        "annotator_agreement.csv",
        "taxonomy_actionable.csv",
        "taxonomy_by_annotator.csv",
        "taxonomy_distribution.csv",
    ]
    ag = pd.read_csv(tmp_path / "an" / "annotator_agreement.csv")
    assert ag["n_items"].tolist() == [30, 30] and ag["n_agree"].tolist() == [30, 30]
    assert ag["kappa"].isna().all()  # p_e = 1: kappa is undefined, not 1 and not 0


# ---------------------------------------------------------------------------------------------
# Issue 11: a file given twice has a sentence of its own. On ranked_db
# (conftest.py).


def test_a_file_given_twice_has_a_sentence_of_its_own(run_cli, ranked_db, tmp_path):
    out = tmp_path / "fa"
    run_cli(
        "--db",
        ranked_db,
        "sample-failures",
        "--out",
        out,
        "--n",
        40,
        "--overlap",
        10,
        "--per-annotator",
        8,
        "--annotators",
        "A,B,C",
        "--no-pictures",
    )
    label_all(out / "assign_A.csv", "Object")
    res = run_cli("--db", ranked_db, "import-labels", out / "assign_A.csv", out / "assign_A.csv", expect=2)
    assert "given twice Nothing" not in res.output
    assert re.search(r"given twice; give each file once\. Nothing was imported\.", res.output), res.output
    assert table(ranked_db, "SELECT count(*) AS n FROM annotations")["n"][0] == 0
