"""clipfail command line: one click group, one thin command per stage.

Each command parses its options, opens the database, calls one toolkit function and
prints what it returns. User errors (toolkit.errors.UserError) print one message and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click
import duckdb
import pandas as pd

from toolkit._version import __version__
from toolkit.errors import UserError
from toolkit.store import db
from toolkit.store.paths import clipfail_command
from toolkit.store.study import open_study, schema_version

# The commands in the order of the study's stages (docs/cli.md and `clipfail --help` list them so):
# set up, data, model, retrieval, failures and their labels, analysis, the fix, the report, then the
# whole-pipeline commands and the housekeeping ones. A command not named here is listed after these.
STAGE_ORDER = (
    "init",
    "download-coco",
    "make-synthetic-coco",
    "ingest",
    "positives",
    "embed",
    "evaluate",
    "benchmark",
    "compare",
    "triage",
    "sample-failures",
    "annotate",
    "export-labelstudio",
    "import-labels",
    "labelstudio",
    "categories",
    "analyze",
    "templates",
    "improve",
    "report",
    "run",
    "demo",
    "relocate",
    "status",
    "sql",
)


class ClipfailGroup(click.Group):
    def list_commands(self, ctx):
        """The commands in stage order (STAGE_ORDER), then any other in the order they were defined."""
        rank = {name: i for i, name in enumerate(STAGE_ORDER)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "Interrupted. The stage that was running wrote nothing to the database (stages that had "
                "finished keep their results); run the same command again to carry on.",
                err=True,
            )
            ctx.exit(130)


def db_option(f):
    """Every command takes --db; it may also be given before the command name."""

    @click.option(
        "--db",
        "db_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="DuckDB file (default: $CLIPFAIL_DB or ./clipfail.duckdb).",
    )
    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx, db_path, *args, **kwargs):
        given = db_path if db_path is not None else (ctx.obj or {}).get("db_path")
        path = given if given is not None else db.default_db_path()  # --db "" is refused, never the default
        # before the command does anything: a CSV, a folder, a FIFO, :memory: ... is no study's database
        db.check_db_path(
            path, "--db" if given is not None else "$CLIPFAIL_DB" if os.environ.get("CLIPFAIL_DB") else "Database"
        )
        try:
            return ctx.invoke(f, *args, db_path=path, **kwargs)
        except duckdb.Error as exc:
            if db.is_corruption(exc):  # a damaged block can surface in any query, not only on open
                raise db.damaged_database_error(path, exc) from None
            raise

    return wrapper


def run_option(default: str):
    """--run: the retrieval run a command works on, declared once; `default` says which run it takes without one."""
    return click.option(
        "--run",
        "retrieval_run_id",
        type=click.IntRange(1, 2**63 - 1),
        default=None,
        help=f"Retrieval run id (default: {default}).",
    )


def model_options(
    *, model_default: str | None = None, model_required: bool = False, precision: bool = False, weights: bool = True
):
    """The options that pick and place a model (--model, --pretrained, --checkpoint, --device and, with
    precision=True, --precision), declared once so that every command that loads a model documents
    them alike. A command whose --model has no default says in its docstring what it falls back to.
    weights=False leaves out --model/--pretrained/--checkpoint (for a command that reads them elsewhere)."""

    def decorate(f):
        weight_options = [
            click.option(
                "--model",
                default=model_default,
                required=model_required,
                show_default=model_default is not None,
                help="Model: an open_clip name (ViT-B-32), a Hugging Face name (openai/clip-vit-base-patch32), "
                "hf-hub:ORG/NAME, or a model-config JSON file.",
            ),
            click.option(
                "--pretrained", default=None, help="open_clip pretrained tag, e.g. openai (or give --checkpoint)."
            ),
            click.option(
                "--checkpoint",
                type=click.Path(dir_okay=False),
                default=None,
                help="Local weights file, for offline use (instead of --pretrained).",
            ),
        ]
        options = (weight_options if weights else []) + [
            click.option(
                "--device",
                default="auto",
                show_default=True,
                help="Where the model runs: auto (a GPU when there is one, else cpu), cpu, cuda, cuda:N or mps.",
            ),
        ]
        if precision:
            options.append(
                click.option(
                    "--precision",
                    type=click.Choice(["fp32", "fp16", "bf16"]),
                    default="fp32",
                    show_default=True,
                    help="Arithmetic of the image and text encoders; fp32 reproduces the reference study, fp16/bf16 "
                    "are opt-in (recorded in the embedding set's config).",
                )
            )
        return _stack(options)(f)

    return decorate


def _stack(options):
    """Apply click options so that --help lists them in the order given."""

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def subset_options(f):
    """Where the COCO data is and how the subset is drawn, declared once for `ingest` and `run`."""
    return _stack(
        [
            click.option(
                "--coco-root",
                type=click.Path(),
                help="Folder with annotations/captions_val2017.json and val2017/ (--coco5k-test: 2014 or 2017's).",
            ),
            click.option(
                "--captions-json",
                type=click.Path(),
                multiple=True,
                help="A COCO captions JSON (instead of --coco-root); twice only with --coco5k-test.",
            ),
            click.option(
                "--images-dir",
                type=click.Path(),
                multiple=True,
                help="The folder its file_names are relative to (one per --captions-json).",
            ),
            click.option(
                "--num-images",
                default=None,
                help="Images to sample, or 'all' (default: 5000; Flickr30k: the whole split).",
            ),
            click.option(
                "--captions-per-image",
                type=click.IntRange(1, 2**31 - 1),
                default=5,
                show_default=True,
                help="Captions kept per image (the first, by annotation id).",
            ),
            click.option(
                "--seed",
                type=click.IntRange(0, 2**32 - 1),
                default=42,
                show_default=True,
                help="Seed of the image sample.",
            ),
            click.option("--name", default=None, help="Subset name (default: <num-images>-seed<seed>)."),
            click.option("--skip-bad-images", is_flag=True, help="Exclude missing/unreadable images before sampling."),
            click.option(
                "--coco5k-test",
                is_flag=True,
                help="Take the COCO 5k test split by COCO ids (from the eccv_caption package) instead of a sample, "
                "from captions_val2014.json or captions_train2017.json + captions_val2017.json; ECCV Caption and "
                "CxC join it.",
            ),
        ]
    )(f)


def sample_options(*, n_param: str = "n", seed_flag: str = "--seed", seed_param: str = "seed"):
    """How failures are drawn and exported for annotators, declared once for `sample-failures` and `run`
    (which names the count and the seed n_failures / --failure-seed beside its other seeds)."""
    return _stack(
        [
            click.option(
                "--n",
                n_param,
                type=click.IntRange(1, 1_000_000),
                default=200,
                show_default=True,
                help="R@1 failures to draw.",
            ),
            click.option(
                seed_flag,
                seed_param,
                type=click.IntRange(0, 2**32 - 1),
                default=42,
                show_default=True,
                help="Seed of the failure draw.",
            ),
            click.option(
                "--overlap",
                type=click.IntRange(0, 1_000_000),
                default=30,
                show_default=True,
                help="Failures drawn first; every annotator labels them.",
            ),
            click.option(
                "--per-annotator",
                type=click.IntRange(0, 1_000_000),
                default=50,
                show_default=True,
                help="Failures for each annotator alone, after the overlap.",
            ),
            click.option("--annotators", default="A,B,C", show_default=True, help="Comma-separated annotator names."),
            click.option(
                "--out",
                "out_dir",
                type=click.Path(file_okay=False),
                default="failure_analysis",
                show_default=True,
                help="Folder for the annotators' CSVs, README.txt and pictures.",
            ),
            click.option(
                "--pictures/--no-pictures", default=True, show_default=True, help="Write vis_<sample_id>.png."
            ),
        ]
    )


class FiniteFloat(click.FloatRange):
    """A real-valued option: a finite number in [min, max] (open ends with min_open / max_open). click's
    FloatRange lets NaN through (it compares false with both ends), and an infinity where an end is open-ended;
    here each is one message that names the option, and `--help` shows the range."""

    name = "number"

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number; give one in {self._describe_range()}.", param, ctx)
        return rv


# the files sample-failures (and run) write into --out: checked against the study's files before any work
SAMPLE_FILES = ("failure_samples.csv", "assign_*.csv", "README.txt", "vis_*.png")


def echo_df(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> None:
    """Print a DataFrame as a plain aligned table."""
    if df.empty:
        click.echo("(no rows)")
        return
    shown = df.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else floatfmt.format(v))
    click.echo(shown.to_string(index=False))


@click.group(cls=ClipfailGroup)
@click.version_option(__version__, prog_name="clipfail")
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="DuckDB file for every command (default: $CLIPFAIL_DB or ./clipfail.duckdb).",
)
@click.pass_context
def cli(ctx, db_path):
    """Why does CLIP miss at text-to-image retrieval on COCO, and does a text-side fix help?

    Every stage reads and writes one DuckDB file. Run `clipfail demo` for an offline tour.
    """
    ctx.ensure_object(dict)
    ctx.obj["db_path"] = db_path


def _with_db(step: str, db_path: str) -> str:
    """Spell out --db in a suggested command when the database is not the default one."""
    return step.replace("clipfail ", f"{clipfail_command(db_path)} ", 1)


@cli.command()
@click.option(
    "--compat",
    is_flag=True,
    help="Rewrite a file in a newer DuckDB storage format in DuckDB 1.4's (keeps the original as a backup).",
)
@db_option
def init(db_path, compat):
    """Create the database, or upgrade its schema, and apply the views.

    Every writing command upgrades by itself; run init once before read-only commands (status, sql,
    analyze, report) on a database made by an older clipfail. It also restores missing tables/columns.
    Studies are written in DuckDB 1.4's storage format, so DuckDB 1.4.x clients open them; --compat
    rewrites a file that an older clipfail wrote in a newer format.

    \b
    Example:
      clipfail --db study.duckdb init
    """
    from toolkit.store.compat import is_newer_than_compatible, rewrite_compatible, storage_version

    res = None
    if compat and Path(db_path).exists():  # before the upgrade, so that the backup is the study as it was
        res = rewrite_compatible(db_path)
    with open_study(db_path, force_upgrade=True) as con:
        version = schema_version(con)
        storage = storage_version(con)
    click.echo(f"Database {db_path} is ready (schema version {version}).")
    if res is not None and res.backup is not None:
        click.echo(
            f"Rewrote it in DuckDB's {db.STORAGE_COMPATIBILITY} storage format (it was {res.old_version}), which "
            f"DuckDB 1.4.x opens; the original is kept, as it was, as {res.backup}."
        )
    elif is_newer_than_compatible(storage):
        click.echo(
            f"Its DuckDB storage format is {storage}, which DuckDB 1.4.x (the long-term-support line: its CLI, R, "
            "DBeaver) cannot open. " + _with_db("clipfail init --compat", db_path) + " rewrites it (keeping a backup)."
        )


@cli.command("download-coco")
@click.option("--dest", required=True, type=click.Path(file_okay=False), help="Folder to download and extract into.")
@click.option(
    "--base-url",
    default="http://images.cocodataset.org",
    show_default=True,
    help="Server holding annotations/annotations_trainval<year>.zip and zips/val<year>.zip (a mirror).",
)
@click.option(
    "--year",
    type=click.Choice(["2017", "2014"]),
    default="2017",
    show_default=True,
    help="COCO 2017 val, or 2014 val (it holds the COCO 5k test: ingest --coco5k-test).",
)
@click.option(
    "--images/--no-images",
    default=True,
    show_default=True,
    help="Also download val<year>.zip (2017: 778 MiB; 2014: 6.2 GiB).",
)
def download_coco(dest, base_url, year, images):
    """Download COCO val captions (and images) into the layout `ingest --coco-root` reads.

    Resumes interrupted downloads (HTTP Range on DEST/zips/*.part), checks sizes and every zip
    member's CRC, extracts only val<year>/*.jpg and the val annotation JSONs, refuses unsafe or
    oversized archives (renamed to *.rejected), and never replaces a different existing file.

    \b
    Example:
      clipfail download-coco --dest ~/coco && clipfail ingest --coco-root ~/coco
      clipfail download-coco --year 2014 --dest ~/coco2014 && clipfail ingest --coco5k-test --coco-root ~/coco2014
    """
    from toolkit.ingest.download import download_coco as run_download

    res = run_download(dest, base_url=base_url, images=images, year=year)
    for f in res.files:
        skipped = ""
        if f.n_skipped:
            examples = ", ".join(repr(n) for n in f.skipped_examples) + (", ..." if f.n_skipped > 3 else "")
            skipped = f"; skipped {f.n_skipped} member{'s' if f.n_skipped != 1 else ''} not needed here ({examples})"
        click.echo(
            f"{f.name}: {f.action} ({f.size:,} bytes, CRC checked); "
            f"extracted {f.n_extracted} files, {f.n_kept} already there{skipped}."
        )
    click.echo(f"Captions: {res.captions_json}")
    if res.images_dir is not None:
        click.echo(f"Images:   {res.images_dir}/ ({res.n_images} files)")
    click.echo(f"Next: clipfail ingest{' --coco5k-test' if year == '2014' else ''} --coco-root {res.dest}")


@cli.command("make-synthetic-coco")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option(
    "--images", "n_images", type=click.IntRange(1, 1_000_000), default=40, show_default=True, help="Images to draw."
)
@click.option(
    "--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the scenes and captions."
)
def make_synthetic_coco(dest, n_images, seed):
    """Write a small COCO-format dataset of drawn scenes (for tests and the demo).

    \b
    Example:
      clipfail make-synthetic-coco /tmp/coco --images 40
    """
    from toolkit.ingest.synthetic import make_synthetic_coco as make
    from toolkit.store.paths import check_output_path

    check_output_path(dest, "DEST", writes=())  # a folder that can be made and written, before any image is drawn
    path = make(dest, n_images, seed=seed)
    click.echo(f"Wrote {n_images} images and {path}. Ingest with: clipfail ingest --coco-root {dest}")


@cli.command()
@subset_options
@click.option(
    "--karpathy-json",
    type=click.Path(),
    help="Karpathy's dataset_coco.json or dataset_flickr30k.json (image root: --images-dir).",
)
@click.option("--split", default=None, help="Karpathy split to take (default: test).")
@click.option("--replace", is_flag=True, help="Rebuild an existing subset of this name with a new config.")
@click.option(
    "--instances-json",
    type=click.Path(),
    default=None,
    help="COCO instances JSON for triage (default: annotations/instances_val2017.json under --coco-root, if any).",
)
@db_option
def ingest(db_path, **options):
    """Read COCO captions and images, and draw a seeded subset.

    Sampling: sort the image ids, draw with numpy's default_rng(seed); captions keep
    ascending annotation-id order, the first --captions-per-image of each image.

    --coco5k-test draws nothing: it takes the 5,000 images of the COCO 5k test (Karpathy's
    test split) and each one's own 5 captions of the split, by COCO ids, so that
    `clipfail positives import` (ECCV Caption, CxC) joins them. Every id must be in the
    captions JSON (COCO 2014 val, or 2017 train and val together) and every image on disk
    (or --skip-bad-images). Needs pip install 'clipfail[positives]'.

    \b
    Example:
      clipfail ingest --coco-root ~/coco --num-images 5000 --seed 42
      clipfail ingest --coco5k-test --coco-root ~/coco2014
    """
    from toolkit.ingest.stage import ingest as run_ingest

    with open_study(db_path) as con:
        res = run_ingest(con, **options)
    if res.is_noop:
        click.echo(f"Subset {res.name!r} is already ingested with this configuration; nothing changed.")
    else:
        click.echo(f"Ingested subset {res.name!r} (id {res.subset_id}, run {res.run_id}).")
    click.echo(f"  images:   {res.num_images}")
    click.echo(f"  captions: {res.num_captions}")
    click.echo("  captions per image: " + ", ".join(f"{n}: {c} images" for n, c in res.captions_histogram.items()))
    if res.num_short_images:
        click.echo(f"  {res.num_short_images} images have fewer captions than asked; they keep what they have.")
    if res.num_bad_images:
        click.echo(f"  {res.num_bad_images} bad images were excluded before sampling (table bad_images).")
    if res.num_instances is not None:
        click.echo(f"  object instances: {res.num_instances} stored (table image_instances).")
    if options["coco5k_test"]:
        click.echo(f"Extended positives: {_with_db('clipfail positives import --source eccv', db_path)} (or cxc).")


@cli.group()
def positives():
    """Extended positives: human-verified extra caption-image pairs (ECCV Caption, CxC) of the COCO 5k test.

    COCO pairs each caption with one image; ECCV Caption and CxC verify more. Once imported, the view
    recall_extended gives R@K, R-Precision and mAP@R per source with them counted as hits (the
    original pairs always count). The packaged sources need the eccv_caption package:
    pip install 'clipfail[positives]'.

    \b
    Example:
      clipfail positives import --source eccv
    """


@positives.command("import")
@click.option(
    "--source", "sources", multiple=True, type=click.Choice(["eccv", "cxc"]),
    help="A source that the eccv_caption package ships: eccv (ECCV Caption) or cxc (Crisscrossed Captions).",
)  # fmt: skip
@click.option(
    "--file", "file", type=click.Path(dir_okay=False), default=None,
    help='A JSON file of the same content: {"caption_to_image": {"<caption id>": [image ids]}, '
    '"image_to_caption": {"<image id>": [caption ids]}}.',
)  # fmt: skip
@click.option("--subset", default=None, help="Subset name (default: the most recent).")
@db_option
def positives_import(db_path, sources, file, subset):
    """Import one source of extended positives for a subset (tables positive_sets, extra_positives).

    Keeps the pairs whose two ends are in the subset (ids are COCO caption annotation ids and COCO
    image ids; the others are counted and skipped), reports the coverage (view positive_coverage) and
    stores the ranks of every positive for the subset's retrieval runs (table positive_ranks). The
    same source again is a no-op; a subset that the source does not reach at all is refused.
    Improvement runs made before the import get their extended figures (view
    improvement_recall_extended) from their clipfail improve command run again; the command names them.

    \b
    Example:
      clipfail positives import --source cxc --subset s5000
    """
    from toolkit.retrieval.positives import import_positives

    if len(sources) + (file is not None) > 1:
        given = [f"--source {s}" for s in sources] + ([f"--file {file}"] if file else [])
        raise UserError(f"Give one source of positives per import, not {len(given)} ({', '.join(given)}).")
    from toolkit.improve.extended import unranked_improvements

    with open_study(db_path) as con:
        res = import_positives(con, subset, source=sources[0] if sources else None, file=file)
        late = unranked_improvements(con, int(db.get_subset(con, res.subset)["subset_id"]))
    state = "already imported, nothing changed" if res.reused else "imported"
    version = f" {res.source_version}" if res.source_version else ""
    click.echo(
        f"Positive set {res.positive_set_id} ({state}): {res.source}{version} for subset {res.subset}: "
        f"{res.n_pairs_kept:,} of {res.n_pairs_read:,} pairs have both ends in the subset; "
        f"{res.n_unknown_ids:,} ids of the source are not in it (skipped)."
    )
    if res.n_captions_in_5k_test is not None:
        click.echo(
            f"COCO 5k test: {res.n_captions_in_5k_test:,} of the subset's {res.n_captions:,} captions and "
            f"{res.n_images_in_5k_test:,} of its {res.n_images:,} images are in it (the split that {res.source} "
            "extends: its positives apply there only)."
        )
    click.echo(
        f"Coverage: {res.n_captions_covered:,} of {res.n_captions:,} captions and {res.n_images_covered:,} of "
        f"{res.n_images:,} images are queries of {res.source} here."
    )
    echo_df(res.coverage[["direction", "n_queries", "n_covered", "mean_positives", "max_positives"]], floatfmt="{:.2f}")
    if res.ranked_runs:
        click.echo(f"Ranked the positives of retrieval run(s) {', '.join(map(str, res.ranked_runs))}.")
    click.echo(f'Metrics: {clipfail_command(db_path, always=True)} sql "SELECT * FROM recall_extended"')
    if late:
        click.echo(LATE_IMPROVEMENTS.format(ids=", ".join(map(str, late))))


LATE_IMPROVEMENTS = (
    "Improvement run(s) {ids} were made before the positives were imported: run their clipfail improve command "
    "again (the same options) to rank their extended positives (view improvement_recall_extended); nothing else "
    "changes."
)


@positives.command("rank")
@run_option("every retrieval run that lacks some")
@db_option
def positives_rank(db_path, retrieval_run_id):
    """Store the positive ranks that a retrieval run lacks (table positive_ranks).

    import and evaluate store them themselves; this fills in the rest (e.g. a run evaluated by an
    older clipfail). recall_extended shows a (run, source) only once all of its positives are
    ranked. Nothing to do is a no-op. Improvement runs are ranked by clipfail improve (the command
    names those that lack their extended figures).

    \b
    Example:
      clipfail positives rank --run 3
    """
    from toolkit.retrieval.positives import rank_positives

    with open_study(db_path) as con:
        runs = (
            [retrieval_run_id]
            if retrieval_run_id is not None
            else con.execute("SELECT retrieval_run_id FROM retrieval_runs ORDER BY 1").fetchnumpy()["retrieval_run_id"]
        )
        for rrid in runs:
            n = rank_positives(con, int(rrid))
            click.echo(f"Retrieval run {int(rrid)}: {n:,} positive ranks stored" + ("" if n else " (none missing)."))
        from toolkit.improve.extended import unranked_improvements

        late = unranked_improvements(con)
    if late:
        click.echo(LATE_IMPROVEMENTS.format(ids=", ".join(map(str, late))))


@cli.command()
@click.option("--subset", "subset_name", default=None, help="Subset name (default: the most recent subset).")
@model_options(model_required=True, precision=True)
@click.option(
    "--batch-size", type=click.IntRange(1, 65536), default=None, help="Default: 64 images / 256 captions on CPU."
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Embedding cache folder (default: <db stem>_cache/embeddings/ beside the database).",
)
@click.option("--recompute", is_flag=True, help="Rebuild the embeddings even if a cached set exists.")
@click.option("--draft-decode", "draft", is_flag=True, help="Opt-in JPEG draft decoding (faster; resize noise only).")
@click.option(
    "--decode",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="gpu (opt-in, CUDA only): decode JPEGs and preprocess on the GPU (cosine 0.99997 to cpu on an H200).",
)
@click.option(
    "--num-workers", type=click.IntRange(0, 64), default=None, help="Image decoding workers (default: automatic)."
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where the rows are computed: this process, or a Ray cluster (needs pip install 'clipfail[ray]'). "
    "Same sets either way; the engine is recorded, not part of the identity.",
)
@click.option(
    "--ray-address",
    metavar="ADDRESS",
    default=None,
    help="--engine ray: the cluster, HOST:PORT or ray://HOST:PORT or auto (default: RAY_ADDRESS, else a new "
    "local Ray instance).",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(0, None),
    metavar="G",
    default=None,
    help="--engine ray: GPUs per model replica (default: 1 when the cluster has GPUs, else 0: CPU replicas).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 100000),
    metavar="N",
    default=None,
    help="--engine ray: model replicas (default: one per GPU, or 1 CPU replica).",
)
@db_option
def embed(
    db_path,
    subset_name,
    model,
    pretrained,
    checkpoint,
    device,
    batch_size,
    precision,
    cache_dir,
    recompute,
    draft,
    decode,
    num_workers,
    engine,
    ray_address,
    gpus_per_worker,
    workers,
):
    """Compute (or reuse) L2-normalised CLIP embeddings of a subset's images and captions.

    Files go to a cache folder beside the database and are registered in embedding_sets with
    their sha256; a re-run reuses them, an interrupted run resumes from its last shard.
    --engine ray computes the rows on a Ray cluster (model replicas as Ray Data actors); the
    driver still writes the same shards and files and registers the same sets.

    \b
    Example:
      clipfail embed --subset 5000-seed42 --model openai/clip-vit-base-patch32
      clipfail embed --model openai/clip-vit-base-patch32 --engine ray --ray-address 10.0.0.5:6379
    """
    from toolkit.embed.stage import embed as run_embed

    if pretrained and checkpoint:
        raise UserError("Give either --pretrained TAG or --checkpoint PATH, not both.")
    # embed opens the database only to read its inputs and to register the results, not while encoding
    res = run_embed(
        db_path,
        subset_name,
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        batch_size=batch_size,
        precision=precision,
        cache_dir=cache_dir,
        recompute=recompute,
        draft=draft,
        num_workers=num_workers,
        decode=decode,
        engine=engine,
        ray_address=ray_address,
        gpus_per_worker=gpus_per_worker,
        workers=workers,
    )
    weights = res.pretrained or (f"checkpoint {res.checkpoint_sha256[:12]}" if res.checkpoint_sha256 else "random")
    how = (", draft decode" if res.draft else "") + (", GPU decode" if res.decode == "gpu" else "")
    what = f"subset {res.subset!r} with {res.model} ({weights}, {res.precision}{how})"
    for note in res.notes:
        click.echo(f"Note: {note}")
    if res.is_noop:
        click.echo(f"Already embedded {what}; checksums match, nothing recomputed.")
    else:
        resumed = f", {res.reused_shards} shard(s) reused from an interrupted run" if res.reused_shards else ""
        click.echo(f"Embedded {what} in {res.seconds:.1f} s (run {res.run_id}{resumed}).")
    click.echo(f"  images:   {res.n_images} x {res.dim} -> embedding set {res.image_set_id}: {res.image_path}")
    click.echo(f"  captions: {res.n_captions} x {res.dim} -> embedding set {res.text_set_id}: {res.text_path}")
    if res.n_truncated is not None:
        click.echo(f"  captions truncated at {res.context_length} tokens: {res.n_truncated}")


@cli.command()
@click.option("--subset", "subset_name", default=None, help="Subset name (default: the most recent subset).")
@model_options()
@click.option(
    "--topk", type=click.IntRange(1, 2**31 - 1), default=10, show_default=True, help="Top-k ids and scores stored."
)
@click.option(
    "--direction",
    type=click.Choice(["text-to-image", "image-to-text"]),
    default="text-to-image",
    show_default=True,
    help="Captions ranking images (the study's), or images ranking captions.",
)
@click.option(
    "--chunk",
    type=click.IntRange(1, 2**31 - 1),
    default=None,
    help="Queries scored at a time; memory is about chunk x images x 4 bytes (default: 512 per CPU thread).",
)
@db_option
def evaluate(db_path, subset_name, model, pretrained, checkpoint, topk, device, direction, chunk):
    """Exact ranks of every query's ground truth from the cached embeddings, and Recall@K.

    Writes retrieval_runs and retrieval_ranks, then prints the run's row of the recall_summary
    view. Rank = 1 + the number of gallery items scoring strictly higher (ties: optimistic;
    n_tied gives the pessimistic rank). For image-to-text an image's rank is the best rank among
    its captions. Re-running with the same embeddings is a no-op. The model options pick the
    embedding sets to rank; without them, the subset's only model.

    \b
    Example:
      clipfail evaluate --subset 5000-seed42 --model openai/clip-vit-base-patch32
    """
    from toolkit.retrieval.evaluate import evaluate as run_evaluate

    with open_study(db_path) as con:
        res = run_evaluate(
            con,
            subset_name,
            model=model,
            topk=topk,
            device=device,
            direction=direction,
            chunk=chunk,
            pretrained=pretrained,
            checkpoint=checkpoint,
        )
    state = "already evaluated, nothing changed" if res.is_noop else f"{res.n_queries:,} queries ranked"
    click.echo(
        f"Retrieval run {res.retrieval_run_id} ({res.direction}, subset {res.subset}, model {res.model}): {state}"
    )
    echo_df(res.summary)


@cli.command("benchmark")
@click.option(
    "--models",
    "models_file",
    required=True,
    type=click.Path(),
    help="Text file, one model[,pretrained|checkpoint] per line (# comments).",
)
@click.option("--subset", "subset_name", default=None, help="Subset name (default: the most recent subset).")
@model_options(weights=False, precision=True)
@click.option("--batch-size", type=click.IntRange(1, 65536), default=None, help="Embedding batch size.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Embedding cache folder (default: <db stem>_cache/embeddings/ beside the database).",
)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Also write the table here.")
@db_option
def benchmark(db_path, models_file, subset_name, device, batch_size, precision, cache_dir, csv_path):
    """Embed and evaluate every model of a models file on one subset, and print one table.

    FILE has one model[,pretrained|checkpoint] per line, as CLIP_benchmark's models.txt (a second
    field with a / or a .pt/.pth/.bin/.safetensors/.ckpt suffix is a checkpoint, relative to the
    file's folder). Each line runs embed and evaluate (both directions) and reuses what is done,
    so an interrupted benchmark resumes. A bad line is named and runs nothing; the others still run,
    and the exit status is then 1. The table: R@1/5/10 both ways (from recall_summary), the embed
    run's wall time and the device.

    \b
    Example:
      clipfail benchmark --models models.txt --subset karpathy-test --csv benchmark.csv
    """
    from toolkit.retrieval.benchmark import benchmark as run_benchmark
    from toolkit.retrieval.benchmark import describe_failures, write_table_csv
    from toolkit.store.paths import check_output_path

    if csv_path:  # before any model runs: a folder that takes the file, and never a database or its files
        check_output_path(csv_path, "--csv", db_path)
    res = run_benchmark(
        db_path,
        models_file,
        subset_name,
        device=device,
        batch_size=batch_size,
        precision=precision,
        cache_dir=cache_dir,
    )
    for o in res.outcomes:
        where = f"line {o.line.line_no} ({o.line.text})"
        click.echo(f"{where}: {o.status}" + (f" in {o.seconds:.1f} s" if o.status == "done" else ""))
    click.echo(f"\nSubset {res.subset}:")
    echo_df(res.table)
    if csv_path:
        write_table_csv(res.table, csv_path)
        click.echo(f"Wrote {len(res.table)} rows to {csv_path}.")
    failures = describe_failures(res.outcomes)
    if failures:
        click.echo(f"\n{len(failures)} line(s) of {models_file} failed and ran nothing:", err=True)
        for line in failures:
            click.echo(f"  {line}", err=True)
        click.get_current_context().exit(1)


@cli.command("compare")
@click.argument("run_a", type=click.IntRange(1, 2**63 - 1))
@click.argument("run_b", type=click.IntRange(1, 2**63 - 1))
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated K values of R@K.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True, help="Bootstrap seed.")
@db_option
def compare(db_path, run_a, run_b, ks, seed):
    """Paired comparison of two retrieval runs of the same subset and direction (B against A).

    Per K: R@K of each run, ΔR@K = R@K(B) - R@K(A) in pp with a paired bootstrap 95% interval
    (10,000 resamples, --seed), the exact McNemar p, and the queries fixed (A miss, B hit), broken
    (A hit, B miss), shared (both miss) and neither (both hit). Stored in run_comparisons and
    run_comparison_stats; see the views run_pairs, run_comparison and failure_overlap_by_category.
    Neither run gains from ties: where counting them optimistically would move some R@K by more than
    0.01 pp, every figure counts them pessimistically (rank + n_tied <= K) and the command says so.
    Runs on different subsets or directions are refused. The same comparison again is a no-op.

    \b
    Example:
      clipfail compare 1 2 --k 1,5,10
    """
    from toolkit.retrieval.compare import compare as run_compare

    with open_study(db_path) as con:
        res = run_compare(con, run_a, run_b, ks, seed=seed)
        overlap = con.execute(
            "SELECT category, n_labelled_a, n_fixed, n_shared, percent_fixed, n_labelled_b, n_broken "
            "FROM failure_overlap_by_category WHERE run_comparison_id = ?",
            [res.run_comparison_id],
        ).df()
    state = "already stored, nothing changed" if res.is_noop else "stored"
    click.echo(
        f"Comparison {res.run_comparison_id} ({state}): retrieval run {res.retrieval_run_b_id} (B) against "
        f"run {res.retrieval_run_a_id} (A), {res.direction}, subset {res.subset}, {res.n_queries:,} paired queries."
    )
    if res.is_same_run:
        click.echo("Run A and run B are the same run: every delta is zero and nothing is fixed or broken.")
    elif res.is_identical_ranks:
        click.echo("The two runs rank every query identically: every delta is zero and nothing is fixed or broken.")
    if bool(res.summary["is_tie_affected"].any()):
        tied_a, tied_b = int(res.summary["n_tied_queries_a"].iloc[0]), int(res.summary["n_tied_queries_b"].iloc[0])
        click.echo(
            f"Ties: the ground truth ties with other items for {tied_a:,} queries in run A and {tied_b:,} in run B, "
            "and counting them optimistically would move R@K by more than 0.01 pp. Every figure below counts "
            "them pessimistically (rank + n_tied <= K, both runs), so neither run gains from ties; the view "
            "run_comparison also gives r_at_k_a/b_optimistic and _pessimistic."
        )
    cols = ["k", "r_at_k_a", "r_at_k_b", "delta_pp", "ci_low_pp", "ci_high_pp", "mcnemar_p"]
    counts = ["k", "n_fixed", "n_broken", "n_shared", "n_neither"]
    shown = res.summary[cols].copy()
    for col in ("delta_pp", "ci_low_pp", "ci_high_pp"):  # percentage points, as the view rounds them
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:+.2f}")
    echo_df(shown)
    click.echo("")
    echo_df(res.summary[counts])
    if not overlap.empty:
        click.echo("\nLabelled R@1 failures of run A per category (view failure_overlap_by_category):")
        echo_df(overlap, floatfmt="{:.2f}")
    click.echo(
        f"\nPer query: {clipfail_command(db_path, always=True)} sql "
        f'"SELECT * FROM run_pairs WHERE run_comparison_id = {res.run_comparison_id}"'
    )


@cli.command("triage")
@run_option("the newest text-to-image run")
@click.option(
    "--hub-factor",
    type=FiniteFloat(0, 1e6, min_open=True),  # toolkit.labels.triage.HUB_FACTOR_MAX
    default=3.0,
    show_default=True,
    help="Hub flag: top-1 of at least this many times the queries-per-image of the run.",
)
@db_option
def triage(db_path, retrieval_run_id, hub_factor):
    """Suggest a failure category, with its evidence, for every R@1 failure of a run.

    Rules (toolkit/labels/triage.py), first that fires wins: Object, Count, Spatial (from the COCO
    object instances that ingest stored), Ambiguous (caption-to-caption cosines, same category
    set), then Attribute/Action from the caption lexicon; else no suggestion. Writes
    triage_runs and triage_suggestions; see the views triage_agreement, triage_confusion and
    triage_distribution. Re-running with the same inputs is a no-op.

    \b
    Example:
      clipfail triage --run 1
    """
    from toolkit.labels.triage import triage as run_triage

    with open_study(db_path) as con:
        res = run_triage(con, retrieval_run_id, hub_factor=hub_factor)
    if res.n_failures == 0:
        click.echo(f"Retrieval run {res.retrieval_run_id} has no R@1 failures: nothing to triage, nothing written.")
        return
    state = "already triaged with these inputs, nothing changed" if res.is_noop else "triaged"
    click.echo(
        f"Retrieval run {res.retrieval_run_id}: {res.n_failures:,} R@1 failures {state} "
        f"(triage run {res.triage_run_id}; hub threshold {res.hub_threshold} top-1s)."
    )
    if not res.is_instances_used:
        click.echo(
            "  No object instances for this subset: Object, Count and Spatial cannot fire. "
            "Ingest with --instances-json (instances_val2017.json) to add them."
        )
    echo_df(pd.DataFrame({"suggestion": list(res.counts), "failures": list(res.counts.values())}))


@cli.command("sample-failures")
@run_option("latest text-to-image")
@sample_options()
@click.option("--replace", is_flag=True, help="Draw a new sample for a run that has one (refused once labelled).")
@click.option(
    "--show-suggestions-on-overlap",
    is_flag=True,
    help="Also show triage suggestions in assign_overlap.csv (hidden by default: they would bias agreement).",
)
@click.option(
    "--exclude-verified-positives",
    is_flag=True,
    help="Leave out failures whose top-1 image is a verified positive (view failure_false_negatives; needs "
    "`clipfail positives import`): known false negatives never reach annotators. Recorded in the sample's config.",
)
@db_option
def sample_failures(
    db_path,
    retrieval_run_id,
    n,
    seed,
    overlap,
    per_annotator,
    annotators,
    out_dir,
    pictures,
    replace,
    show_suggestions_on_overlap,
    exclude_verified_positives,
):
    """Draw a seeded sample of R@1 failures and export CSVs and pictures for annotators.

    Failures (gt_rank > 1) are sorted by caption id and numpy's default_rng(seed) draws --n of
    them; the first --overlap drawn go to everyone, then --per-annotator to each annotator in
    the order given, the rest are backup.

    \b
    Example:
      clipfail sample-failures --n 200 --seed 42 --overlap 30 --per-annotator 50 --annotators A,B,C
    """
    from toolkit.labels.sample import sample_failures as run_sample
    from toolkit.store.paths import check_output_path

    with open_study(db_path) as con:
        check_output_path(out_dir, "--out", con, writes=SAMPLE_FILES, probe=False)
        res = run_sample(
            con,
            retrieval_run_id=retrieval_run_id,
            n=n,
            seed=seed,
            overlap=overlap,
            per_annotator=per_annotator,
            annotators=annotators,
            out_dir=out_dir,
            pictures=pictures,
            replace=replace,
            show_suggestions_on_overlap=show_suggestions_on_overlap,
            exclude_verified_positives=exclude_verified_positives,
        )
    if res.is_noop:
        click.echo(
            f"Retrieval run {res.retrieval_run_id} already has this sample (run {res.run_id}); "
            "the database is unchanged."
        )
    else:
        replaced = f", replacing {res.replaced_samples} earlier samples" if res.replaced_samples else ""
        if res.removed_explain_runs:
            replaced += (
                f" and the {res.removed_explain_runs} explain run(s) of them: run clipfail explain again for the new"
                " sample"
            )
        click.echo(
            f"Sampled {res.n} of {res.n_failures} R@1 failures of retrieval run {res.retrieval_run_id} "
            f"(seed {res.seed}; run {res.run_id}{replaced})."
        )
    echo_df(pd.DataFrame({"set": list(res.set_sizes), "samples": list(res.set_sizes.values())}))
    click.echo(f"Files in {res.out_dir}/: {', '.join(res.written)}")
    if res.kept:
        click.echo(f"  kept as they were (labels filled in): {', '.join(res.kept)}")
    if pictures:
        click.echo(f"  {res.n_pictures} pictures written (vis_<sample_id>.png, 1500x600).")
    if res.missing_images:
        click.echo(f"  {len(res.missing_images)} images could not be read and are drawn as placeholders.")


@cli.command()
@click.option("--annotator", "annotators", multiple=True, required=True, help="Whose labels (repeat for several).")
@click.option(
    "--set",
    "set_choice",
    default="all",
    show_default=True,
    help="mine, overlap or all (mine + overlap); backup is assigned to nobody and refused.",
)
@run_option("the one sampled last")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: any free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Any other host requires the printed tokens.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default web browser.")
@click.option(
    "--show-suggestions-on-overlap",
    is_flag=True,
    help="Also show triage suggestions on overlap items (hidden by default: they would bias agreement).",
)
@db_option
def annotate(db_path, annotators, set_choice, retrieval_run_id, port, host, open_browser, show_suggestions_on_overlap):
    """Label the failure sample in the browser; each label is saved to the database as it is given.

    Serves one item per page (caption, ground truth and top-5 images, keys 1-7 for the categories)
    until Ctrl-C. Labels go through import-labels' checks and replace rules. The database is
    opened only for each save, so other commands can run meanwhile. After clipfail triage, an
    item shows the suggested category and its evidence as a hint (never selected for you).

    \b
    Example:
      clipfail annotate --annotator A --set all --open
    """
    from toolkit.labels import workbench as wb_mod

    wb = wb_mod.prepare(
        db_path,
        list(annotators),
        set_choice=set_choice,
        retrieval_run_id=retrieval_run_id,
        host=host,
        show_suggestions_on_overlap=show_suggestions_on_overlap,
    )
    sock = wb_mod.bind(host, port)
    try:
        wb.port = sock.getsockname()[1]
        wb_mod.start_session(wb)
    except BaseException:
        sock.close()
        raise
    # SIGTERM and SIGHUP stop it like Ctrl-C: the same summary, and an empty session's run row removed.
    with wb_mod.stop_signals_as_ctrl_c():
        try:
            click.echo(
                f"Labelling retrieval run {wb.retrieval_run_id} (set {wb.set_choice}) into {db_path}; "
                f"session run {wb.run_id}. Stop with Ctrl-C."
            )
            for name, url in wb.links().items():
                click.echo(f"  {name} ({len(wb.items[name])} items): {url}")
            if wb.needs_token:
                click.echo("  Each link holds that annotator's token: give it to them only.")
            if open_browser:
                import threading
                import webbrowser

                first = next(iter(wb.links().values()))
                threading.Timer(0.5, webbrowser.open, args=[first.replace("0.0.0.0", "127.0.0.1")]).start()
            wb_mod.serve(wb, sock)
        except KeyboardInterrupt:
            pass  # Ctrl-C (or SIGTERM) is how the server is stopped; every label was saved as it was given
        finally:
            n = wb_mod.finish_session(wb)
            if n:
                click.echo(f"Stopped. The labels of {n} items carry this session's run id {wb.run_id}.")
            else:
                click.echo("Stopped. No label was saved in this session (its run record was removed).")


@cli.command("export-labelstudio")
@click.argument("out_dir", type=click.Path(file_okay=False))
@run_option("the one sampled last")
@click.option("--image-url-prefix", default=None, help="Image URLs = PREFIX + path under the image root.")
@click.option("--force", is_flag=True, help="Overwrite tasks.json / labeling_config.xml that differ.")
@click.option(
    "--show-suggestions-on-overlap",
    is_flag=True,
    help="Also give overlap tasks the triage predictions (left out by default: they would bias agreement).",
)
@db_option
def export_labelstudio(db_path, out_dir, retrieval_run_id, image_url_prefix, force, show_suggestions_on_overlap):
    """Write the failure sample as Label Studio tasks (tasks.json) and labelling config (labeling_config.xml).

    After clipfail triage, each task carries the suggested category as a Label Studio prediction
    (shown pre-filled; overlap tasks carry none by default). The import reads annotations only,
    never predictions.

    Import the labels back with: clipfail import-labels --format labelstudio EXPORT.json

    \b
    Example:
      clipfail export-labelstudio labelstudio/
    """
    from toolkit.labels.labelstudio import export_labelstudio as run_export
    from toolkit.store.paths import check_output_path

    with open_study(db_path, read_only=True) as con:
        check_output_path(out_dir, "OUT_DIR", con, writes=("tasks.json", "labeling_config.xml"), probe=False)
        res = run_export(
            con,
            out_dir,
            retrieval_run_id=retrieval_run_id,
            image_url_prefix=image_url_prefix,
            force=force,
            show_suggestions_on_overlap=show_suggestions_on_overlap,
        )
    click.echo(f"{res.n_tasks} tasks of retrieval run {res.retrieval_run_id} (every set but backup) in {res.out_dir}/.")
    if res.triage_run_id is not None:
        hidden = "" if show_suggestions_on_overlap else " (none on the overlap set)"
        click.echo(f"  {res.n_predictions} carry a prediction from triage run {res.triage_run_id}{hidden}.")
    if res.written:
        click.echo(f"  written: {', '.join(res.written)}")
    if res.unchanged:
        click.echo(f"  already up to date: {', '.join(res.unchanged)}")
    click.echo(
        "In Label Studio: create a project, paste labeling_config.xml as its labelling interface, import tasks.json."
    )
    if res.url_mode == "local-files":
        above = Path(res.image_root).parent if res.image_root else "<the folder above the images>"
        click.echo(
            "  Images are local-files URLs: start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={above} (the folder above the images: Label Studio refuses a "
            "storage on the root itself), and add a Local Files storage (Settings > Cloud Storage > Add Source "
            f"Storage) with the absolute path {res.image_root}. Do not sync it: the tasks come from tasks.json."
        )
        click.echo("  (clipfail labelstudio push does all of this through Label Studio's API.)")
    click.echo("Then export as JSON and run: clipfail import-labels --format labelstudio EXPORT.json")


@cli.command("import-labels")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--annotator", default=None, help="Whose labels these are (default: from assign_<NAME>.csv).")
@click.option("--clear-blank", is_flag=True, help="Blank rows remove labels imported earlier (default: keep them).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "labelstudio"]),
    default="csv",
    show_default=True,
    help="csv: assign_<annotator>.csv files; labelstudio: Label Studio's JSON export.",
)
@click.option("--user-map", multiple=True, help="labelstudio: USER=ANNOTATOR, a Label Studio user id or email.")
@db_option
def import_labels(db_path, files, annotator, clear_blank, fmt, user_map):
    """Import filled-in label CSVs (assign_<annotator>.csv) into the annotations table.

    Every row is checked first; any unknown category, unknown sample or sample not assigned to
    the annotator rejects the whole import with a list of row numbers. A re-import replaces
    that annotator's labels for the samples labelled in the file; blank rows keep earlier
    labels unless --clear-blank. For assign_overlap.csv, give --annotator or an 'annotator'
    column. With --format labelstudio, FILES are Label Studio JSON exports of the tasks that
    export-labelstudio wrote; whose labels: --annotator, --user-map, or the annotation's user.

    \b
    Example:
      clipfail import-labels failure_analysis/assign_A.csv failure_analysis/assign_B.csv
    """
    from toolkit.labels.label_import import ENCODING_NAMES
    from toolkit.labels.label_import import import_labels as run_import

    if user_map and fmt != "labelstudio":
        raise UserError("--user-map is for --format labelstudio (Label Studio users); CSV files name annotators.")
    with open_study(db_path) as con:
        if fmt == "labelstudio":
            from toolkit.labels.labelstudio import import_labelstudio

            res = import_labelstudio(con, list(files), annotator=annotator, user_map=user_map, clear_blank=clear_blank)
        else:
            res = run_import(con, list(files), annotator=annotator, clear_blank=clear_blank)
    if res.is_noop and res.n_labelled == 0 and not res.n_kept:
        click.echo("Nothing to import: every row's category is blank. The database is unchanged.")
    elif res.is_noop:
        click.echo("These labels are already imported exactly as they are; the database is unchanged.")
    else:
        click.echo(f"Imported {res.n_labelled} labels (run {res.run_id}).")
    echo_df(
        pd.DataFrame(
            {
                "file": [f.path for f in res.files],
                "annotator": [",".join(f.annotators) for f in res.files],
                "rows": [f.n_rows for f in res.files],
                "labelled": [f.n_labelled for f in res.files],
                "unlabeled": [f.n_unlabeled for f in res.files],
                "two_categories": [f.n_secondary for f in res.files],
                "replaced": [f.n_replaced for f in res.files],
                "kept": [f.n_kept for f in res.files],
                "cleared": [f.n_cleared for f in res.files],
            }
        )
    )
    for f in res.files:
        if f.encoding != "utf-8":
            click.echo(f"{f.path} was read as {ENCODING_NAMES.get(f.encoding, f.encoding)} (it is not UTF-8).")
    if res.n_unlabeled:
        click.echo(f"{res.n_unlabeled} rows have no label yet (unlabeled); they were not imported.")
    if res.n_replaced and not res.is_noop:
        click.echo(f"{res.n_replaced} earlier labels were replaced by the file's.")
    if res.n_kept:
        click.echo(
            f"{res.n_kept} blank rows have a label imported earlier, which was kept "
            "(give --clear-blank to remove such labels)."
        )
    if res.n_cleared and not res.is_noop:
        click.echo(f"{res.n_cleared} earlier labels were removed (--clear-blank): their rows are blank in the file.")
    click.echo("Next: " + _with_db("clipfail analyze", db_path))


def labelstudio_options(f):
    """--url, --token, --project and --title: which Label Studio project (push and pull alike)."""
    for option in reversed(
        [
            click.option(
                "--url",
                envvar="LABEL_STUDIO_URL",
                default="http://localhost:8080",
                show_default=True,
                help="Label Studio's address (or $LABEL_STUDIO_URL).",
            ),
            click.option(
                "--token",
                envvar="LABEL_STUDIO_API_KEY",
                default=None,
                help="API token (or $LABEL_STUDIO_API_KEY): a legacy token or a personal access token.",
            ),
            click.option(
                "--project",
                "project_id",
                type=click.IntRange(1, 2**63 - 1),
                default=None,
                help="Project id (default: the project titled --title).",
            ),
            click.option("--title", default=None, help="Project title (default: clipfail <database file> run <N>)."),
        ]
    ):
        f = option(f)
    return f


@cli.group("labelstudio")
def labelstudio_group():
    """Push the failure sample to a Label Studio server and pull its labels back, through its API.

    Without API access, use export-labelstudio and import-labels --format labelstudio instead.

    \b
    Example:
      clipfail labelstudio push --url http://localhost:8080 --token TOKEN
    """


@labelstudio_group.command("push")
@labelstudio_options
@run_option("the one sampled last")
@click.option("--image-url-prefix", default=None, help="Image URLs = PREFIX + path under the image root (no storage).")
@click.option(
    "--document-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: the folder above the images).",
)
@click.option("--force", is_flag=True, help="Push even into a project that holds tasks of another sample.")
@click.option(
    "--show-suggestions-on-overlap",
    is_flag=True,
    help="Also give overlap tasks the triage predictions (left out by default: they would bias agreement).",
)
@db_option
def labelstudio_push(
    db_path, url, token, project_id, title, retrieval_run_id, image_url_prefix, document_root, force,
    show_suggestions_on_overlap,
):  # fmt: skip
    """Create or update a Label Studio project with the failure sample, and print its address.

    Sends what export-labelstudio writes: the labelling config and the tasks (every set but backup),
    with the triage predictions on each annotator's own items. Tasks already in the project are not
    sent again; a project holding tasks of another sample is refused unless --force. Images: a Local
    Files storage on the image folder (start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true
    and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the folder above the images), or URLs under
    --image-url-prefix.

    \b
    Example:
      clipfail labelstudio push --url http://localhost:8080 --token TOKEN
    """
    from toolkit.labels.ls_api import LabelStudio
    from toolkit.labels.ls_sync import push

    ls = LabelStudio(url, token)
    with open_study(db_path, read_only=True) as con:
        res = push(
            con, ls, db_path=db_path, project_id=project_id, title=title, retrieval_run_id=retrieval_run_id,
            image_url_prefix=image_url_prefix, document_root=document_root, force=force,
            show_suggestions_on_overlap=show_suggestions_on_overlap,
        )  # fmt: skip
    what = "Created" if res.created else "Updated"
    click.echo(f"{what} project {res.project_id} ({res.title!r}): {res.project_url}")
    click.echo(
        f"  {res.n_tasks} tasks of retrieval run {res.retrieval_run_id}: {res.n_added} added, {res.n_present} there "
        "already."
    )
    if res.n_foreign:
        click.echo(f"  The project also holds {res.n_foreign} tasks of another sample (--force); pull refuses them.")
    if res.triage_run_id is not None and res.n_added:
        click.echo(f"  {res.n_predictions} of the added tasks carry a prediction from triage run {res.triage_run_id}.")
    if res.config_updated:
        click.echo("  The labelling config was updated.")
    if res.storage != "none":
        click.echo(
            f"  Images: Local Files storage on {res.image_root} ({res.storage}); Label Studio must run with "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={res.document_root}."
        )
    click.echo("Next, once labelled: " + _with_db(f"clipfail labelstudio pull --project {res.project_id}", db_path))


@labelstudio_group.command("pull")
@labelstudio_options
@click.option("--annotator", default=None, help="Whose labels these are (default: each annotation's user).")
@click.option(
    "--user-map",
    multiple=True,
    help="USER=ANNOTATOR: a Label Studio user id, e-mail or user name, and the annotator's name.",
)
@click.option("--clear-blank", is_flag=True, help="Skipped tasks remove labels imported earlier (default: keep them).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to save the export, a new file (default: labelstudio-project-<ID>.json beside the database, or "
    "-2, -3, ... when an earlier pull's file holds something else).",
)
@db_option
@click.pass_context
def labelstudio_pull(ctx, db_path, url, token, project_id, title, annotator, user_map, clear_blank, out):
    """Export a Label Studio project's annotations and import them as labels.

    Users are looked up in Label Studio's user list, so --user-map takes an id, an e-mail or a user
    name, and an annotator named like a user's e-mail (before the @) or user name is found. The
    export is saved, then imported as import-labels --format labelstudio would: every annotation is
    checked first, and any problem imports nothing.

    \b
    Example:
      clipfail labelstudio pull --project 3 --user-map alice@lab.org=A --user-map bob=B
    """
    from toolkit.labels.ls_api import LabelStudio
    from toolkit.labels.ls_sync import fetch_export
    from toolkit.store.paths import check_output_path

    ls = LabelStudio(url, token)
    with open_study(db_path) as con:
        if out is not None:
            check_output_path(out, "--out", con)
        pulled = fetch_export(con, ls, db_path=db_path, project_id=project_id, title=title, out=out, user_map=user_map)
    click.echo(
        f"Project {pulled.project_id}: {pulled.n_annotations} annotations on {pulled.n_tasks} tasks, saved in "
        f"{pulled.export_path}."
    )
    ctx.invoke(
        import_labels, db_path=db_path, files=(str(pulled.export_path),), annotator=annotator,
        clear_blank=clear_blank, fmt="labelstudio", user_map=user_map,
    )  # fmt: skip


@cli.group()
def categories():
    """The failure taxonomy: list categories and aliases, or add to them.

    \b
    Example:
      clipfail categories list
    """


@categories.command("list")
@db_option
def categories_list(db_path):
    """List the categories (in position order) with their aliases.

    \b
    Example:
      clipfail categories list
    """
    from toolkit.labels.taxonomy import list_categories

    with open_study(db_path) as con:
        df = list_categories(con)
    for row in df.itertuples():
        kind = "actionable" if row.is_actionable else "not actionable"
        click.echo(f"{row.position}. {row.name} ({kind}): {row.definition}")
        if row.example:
            click.echo(f"   example: {row.example}")
        click.echo(f"   aliases: {row.aliases or '(none)'}")


@categories.command("add")
@click.argument("name")
@click.option("--definition", required=True, help="One line that annotators read in README.txt.")
@click.option(
    "--actionable/--not-actionable",
    default=True,
    show_default=True,
    help="Whether a text-side fix could address such failures (taxonomy_actionable leaves the others out).",
)
@click.option("--example", default=None, help="An example caption and what went wrong.")
@click.option(
    "--position", type=click.IntRange(0, 1_000_000), default=None, help="Sort position (default: after the last)."
)
@db_option
def categories_add(db_path, name, definition, actionable, example, position):
    """Add a category to the taxonomy.

    \b
    Example:
      clipfail categories add Text --definition "The caption quotes text in the image." --example "A STOP sign"
    """
    from toolkit.labels.taxonomy import add_category

    with open_study(db_path) as con:
        row = add_category(con, name, definition, is_actionable=actionable, example=example, position=position)
    kind = "actionable" if row["is_actionable"] else "not actionable"
    click.echo(f"Added category {row['name']!r} ({kind}) at position {row['position']}.")


@categories.command("add-alias")
@click.argument("alias")
@click.argument("category")
@click.option("--replace", is_flag=True, help="Re-point an alias that already names another category.")
@db_option
def categories_add_alias(db_path, alias, category, replace):
    """Let ALIAS (stored normalised: lower case, single spaces) stand for CATEGORY in labels.

    \b
    Example:
      clipfail categories add-alias "wrong colour" Attribute
    """
    from toolkit.labels.taxonomy import add_alias

    with open_study(db_path) as con:
        res = add_alias(con, alias, category, replace=replace)
    if res["is_noop"]:
        click.echo(f"Alias {res['alias']!r} already means {res['category']}; nothing changed.")
    else:
        click.echo(f"Alias {res['alias']!r} now means {res['category']}.")


def _percent_table(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    shown = df[[c for c in columns if c in df.columns]].copy()
    for col in ("percent", "percent_lr", "percent_agreement"):
        if col in shown.columns:
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{float(v):.2f}")
    return shown


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="analysis",
    show_default=True,
    help="Folder for the CSV tables and figures, rewritten as a whole (refused if it holds files of others).",
)
@run_option("the one labelled last")
@db_option
def analyze(db_path, out_dir, retrieval_run_id):
    """Print the failure taxonomy and annotator agreement; write them as CSV, with Figures 1-2.

    The tables are the views taxonomy_distribution, taxonomy_actionable, taxonomy_by_annotator
    and annotator_agreement, for one retrieval run. Counts merge the annotators and exclude the
    overlap set; percent is rounded half up to 2 decimals (percent_lr: largest remainder, sums
    to exactly 100).

    \b
    Example:
      clipfail analyze --out failure_analysis/analysis
    """
    from toolkit.report.analysis import analyze as run_analyze
    from toolkit.store.paths import check_output_path

    with open_study(db_path, read_only=True) as con:
        check_output_path(out_dir, "--out", con, writes=("**",), probe=False)
        res = run_analyze(con, out_dir=out_dir, retrieval_run_id=retrieval_run_id)
    if res.is_simulated:
        click.echo("NOTE: some of these labels are SIMULATED (demo annotators), not human judgements.")
    click.echo(
        f"Failure taxonomy of retrieval run {res.retrieval_run_id}: {res.n_labelled_samples} labelled samples "
        "(merged over annotators, overlap set excluded)"
    )
    echo_df(_percent_table(res.distribution, ["category", "count", "percent", "percent_lr"]))
    click.echo("\nActionable categories only (re-normalised)")
    echo_df(_percent_table(res.actionable, ["category", "count", "percent", "percent_lr"]))
    click.echo("\nBy annotator")
    echo_df(_percent_table(res.by_annotator, ["annotator", "category", "count", "percent"]))
    click.echo(f"\nAgreement on the overlap set ({res.n_overlap_samples} labelled samples)")
    echo_df(
        _percent_table(res.agreement, ["measure", "annotators", "n_items", "n_agree", "percent_agreement", "kappa"])
    )
    if res.agreement["kappa"].isna().any():
        click.echo("(kappa is blank where it is undefined: every label was the same category, so p_e = 1.)")
    click.echo(f"\nWrote to {res.out_dir}/: {', '.join(p.name for p in res.written)}")


@cli.group()
def templates():
    """Prompt-template sets for `clipfail improve` (table prompt_templates).

    A set has, per category, templates in position order; position 0 is the identity
    {caption}. Slots: {caption}, {caption_lc}, {objects}, {attributes}, {actions}, {count},
    {relation} (filled from the caption by a lexicon-based phrase extractor; a template whose
    slot is empty for a caption is skipped for it). The sets 'default-v2' (improve's default)
    and 'default' (the first one, kept for earlier runs) ship with clipfail.

    \b
    Example:
      clipfail templates export --set default-v2 --out my_templates.csv
    """


@templates.command("list")
@click.option("--set", "template_set", default=None, help="Show this set's templates (default: a summary of sets).")
@db_option
def templates_list(db_path, template_set):
    """List template sets (templates per category: the largest --k), or one set's templates.

    \b
    Example:
      clipfail templates list --set default-v2
    """
    from toolkit.improve import templates as tpl

    with open_study(db_path) as con:
        df = tpl.list_sets(con) if template_set is None else tpl.load_set(con, template_set)
    echo_df(df)


@templates.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "template_set", default=None, help="Import every row into this set (overrides template_set).")
@click.option("--replace", is_flag=True, help="Replace an existing set of that name (refused once a run used it).")
@db_option
def templates_import(db_path, file, template_set, replace):
    """Import a CSV with columns template_set, category, position, template.

    Every category of a set must include the identity template {caption}. position may be
    left out (file order). All rows are checked first; any problem imports nothing.

    \b
    Example:
      clipfail templates import my_templates.csv --set mine
    """
    from toolkit.improve import templates as tpl

    with open_study(db_path) as con:
        res = tpl.import_templates(con, file, set_name=template_set, replace=replace)
    for name, n in res.sets.items():
        if name in res.unchanged:
            click.echo(f"Template set {name!r} is already in the database exactly as in the file; nothing changed.")
        elif name in res.replaced:
            click.echo(f"Replaced template set {name!r}: {n} templates.")
        else:
            click.echo(f"Imported template set {name!r}: {n} templates.")


@templates.command("export")
@click.option("--set", "template_set", default=None, help="Export only this set (default: all sets).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, help="CSV file (default: stdout).")
@db_option
def templates_export(db_path, template_set, out_file):
    """Write template sets as CSV (the format `templates import` reads).

    \b
    Example:
      clipfail templates export --set default --out templates.csv
    """
    from pathlib import Path

    from toolkit.improve import templates as tpl
    from toolkit.store.paths import check_output_path
    from toolkit.userfiles import read_bytes

    with open_study(db_path) as con:
        if out_file is not None:
            check_output_path(out_file, "--out", con)
        text = tpl.export_csv(con, template_set)
    if out_file is None:
        click.echo(text, nl=False)
        return
    out = Path(out_file)
    # a template CSV the user edited is never written over (only the same content again)
    if out.exists() and (not out.is_file() or read_bytes(out, "The existing") != text.encode("utf-8")):
        raise UserError(
            f"{out_file} already exists and holds something else (perhaps templates you edited); it was left as it "
            "was. Give another --out, or move that file away first."
        )
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"Cannot write {out_file}: {exc.strerror or exc}. Give --out in a folder that exists."
        ) from None
    click.echo(f"Wrote {out_file}")


class MethodOption(click.Option):
    """A method option: its value is None unless given (each method applies its own default), and --help shows
    the methods' default when they agree."""

    def __init__(self, *args, method_default=None, **kw):
        super().__init__(*args, **kw)
        self.method_default = method_default

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if self.method_default is not None and not self.is_flag:
            extra = {"default": str(self.method_default), **extra}
        return extra


def method_options():
    """improve's --method (every registered method, broken plugins included, so that choosing one names it) and
    the methods' options, built from the registry (`toolkit.improve.methods`): one option per parameter name,
    shared by the methods that declare it (default None: each method applies its own default)."""
    from toolkit.improve import methods

    def click_type(row):
        lo, hi = row["lo"], row["hi"]
        if row["kind"] == "float":
            return FiniteFloat(lo, hi) if lo is not None or hi is not None else FiniteFloat()
        if row["kind"] in ("count", "int"):
            return click.IntRange(lo or 1, hi or methods.COUNT_MAX)
        if row["kind"] == "choice":
            return click.Choice(list(row["choices"]))
        return None

    def decorate(f):
        for row in reversed(list(methods.option_table().values())):
            parts = [n for n in row["methods"] if not methods.registry()[n].method.is_combination] or row["methods"]
            who = " / ".join(dict.fromkeys(parts))
            defaults = {repr(d) for d in row["defaults"].values()}
            shown = next(iter(row["defaults"].values())) if len(defaults) == 1 else None
            kw = {"is_flag": True} if row["kind"] == "flag" else {"type": click_type(row)}
            help_text = f"{who}: {row['help']}" if row["help"] else f"{who}."
            f = click.option(row["flag"], row["name"], cls=MethodOption, default=None, method_default=shown,
                             help=help_text, **kw)(f)  # fmt: skip
        names = methods.names()
        f = click.option(
            "--method",
            type=click.Choice(names),
            default="templates",
            show_default=True,
            help="The fix: templates (prompt ensembling), a score transform, templates then one, or a plugin's method "
            "(docs/plugins.md).",
        )(f)
        return f

    return decorate


def _given_method_options(method: str, values: dict) -> dict:
    """The method options given on the command line (field name -> value); the method refuses the others."""
    ctx = click.get_current_context()
    return {n: v for n, v in values.items() if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}


@cli.command()
@click.option("--categories", required=True, help="Comma-separated failure categories, e.g. Object,Attribute.")
@run_option("the one labelled last")
@click.option(
    "--max-subset", type=click.IntRange(1, 2**31 - 1), default=200, show_default=True, help="Cap (seeded draw)."
)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True, help="Draws, bootstrap.")
@click.option("--include-overlap", is_flag=True, help="Add the overlap set with its majority labels.")
@click.option("--control", default=None, help="Also run on R@1 successes: successes:N, or on every caption: all.")
@model_options()
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True, help="Prompts per batch.")
@method_options()
@db_option
def improve(
    db_path,
    categories,
    retrieval_run_id,
    max_subset,
    seed,
    include_overlap,
    control,
    model,
    pretrained,
    checkpoint,
    device,
    batch_size,
    method,
    **method_params,
):
    """Category-aware prompt ensembling on labelled R@1 failures: baseline vs improved R@1/5/10.

    Each caption of the chosen categories becomes up to --k distinct prompts (itself, then the
    templates that apply to it, in the set's order; union mode: the categories' lists one after the
    other); each prompt is scored
    against every image and the scores are pooled per image (max, mean, or tau*log-mean-exp).
    Prompt embeddings are cached by (model, prompt text), so another pooling or tau encodes
    nothing. Mean pooling ranks exactly as CLIP's embedding-average ensemble. Each delta comes
    with a paired bootstrap 95% interval and an exact McNemar p. --control adds the same run on
    R@1 successes (how many the fix breaks) or on every caption. Results: views
    improvement_recall, category_recall_delta and improvement_effective_k. The model options give the
    model that encodes the new prompts; without them, the model of the text embeddings.

    --method runs another training-free fix on the same captions, with the same statistics and
    controls: inverted-softmax (--beta), qb-norm (QB-Norm with the Dynamic Inverted Softmax over a
    query bank: --beta, --k-bank, --bank; by default the bank is the subset's captions that the call
    does not evaluate), query-expansion (--top, --alpha), or templates followed by inverted-softmax or
    qb-norm on the pooled scores. View method_comparison compares them per category.

    No method gains from ties: each rank records how many images tie with the ground truth, and a
    run whose optimistic and pessimistic Recall@K differ by more than 0.01 pp is flagged (TIES, view
    improvement_ties) and shown with its pessimistic figures. Scores that come out NaN or infinite
    are refused, and nothing is written.

    When the subset has imported positives (clipfail positives import: ECCV Caption, CxC), the same
    scores rank each caption's verified extra positives too, and R@K with them counted as hits comes
    with the same interval and McNemar (view improvement_recall_extended): a fix that only swaps one
    valid image for another gains nothing there. Runs made before the import get them from the same
    command again.

    \b
    Examples:
      clipfail improve --categories Object,Attribute --template-mode union --k 15 --pooling all
      clipfail improve --categories Object,Attribute --method qb-norm --control successes:200
    """
    given = _given_method_options(method, method_params)
    from toolkit.improve import extended as improve_extended
    from toolkit.improve.stage import effective_k as improve_effective_k
    from toolkit.improve.stage import improve as run_improve
    from toolkit.improve.stage import model_encoder_factory
    from toolkit.improve.stage import summary as improve_summary
    from toolkit.improve.stage import ties as improve_ties

    with open_study(db_path) as con:
        res = run_improve(
            con,
            categories,
            retrieval_run_id=retrieval_run_id,
            max_subset=max_subset,
            seed=seed,
            include_overlap=include_overlap,
            control=control,
            encoder_factory=model_encoder_factory(
                model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, batch_size=batch_size
            ),
            method=method,
            **given,
        )
        summary = improve_summary(con, res.improvement_ids)
        eff_k = improve_effective_k(con, res.improvement_ids)
        ties = improve_ties(con, res.improvement_ids)
        extended = improve_extended.summary(con, res.improvement_ids)
    for note in res.notes:
        click.echo(f"Note: {note}")
    _echo_improve_state(res, method)
    from toolkit.report import display as tables

    for title, table, stat in tables.improvement_tables(summary, eff_k):
        click.echo("")
        click.echo(title)
        echo_df(table[["pooling", tables.TIE_COLUMN, *tables.RECALL_COLUMNS]], floatfmt="{:.2f}")
        echo_df(stat, floatfmt="{:+.2f}")
    for note in tables.tie_notes(ties):
        click.echo(f"\n{note}")
    _echo_extended(extended)
    click.echo("")
    click.echo(
        f"Improvement ids: {', '.join(map(str, res.improvement_ids))} (views improvement_recall, category_recall_delta)"
    )


def _echo_improve_state(res, method: str) -> None:
    """The line that says what an improve call did (nothing; extended ranks only; a run and its prompts)."""
    from toolkit.improve import methods as improve_methods

    if res.is_noop:
        click.echo("Already computed with exactly this configuration; nothing changed.")
    elif res.run_id is None:
        click.echo(
            f"Extended positives ranked for improvement run(s) {', '.join(map(str, res.extended_ids))}, made before "
            "the positives were imported (view improvement_recall_extended); nothing else changed."
        )
    elif not improve_methods.get(method)[0].needs_prompts:
        click.echo(f"Improve run {res.run_id}: method {method} (view method_comparison compares the methods).")
    else:
        click.echo(
            f"Improve run {res.run_id}: {res.n_prompts} distinct prompts besides the captions, "
            f"{res.n_encoded} encoded now, {res.n_prompts - res.n_encoded} from the cache."
        )


def _echo_extended(extended) -> None:
    """improve's table of view improvement_recall_extended (its runs' deltas with verified positives), if any."""
    from toolkit.report import display as tables

    if len(extended):
        click.echo("\nWith the verified extended positives counted as hits (view improvement_recall_extended):")
        shown = tables.extended_improvement_table(extended)
        shown["McNemar p"] = [f"{p:.4g}" for p in shown["McNemar p"]]
        echo_df(shown, floatfmt="{:+.2f}")


@cli.command("explain")
@run_option("the sampled one (with --all-failures: the newest text-to-image run)")
@click.option(
    "--sample/--all-failures",
    "use_sample",
    default=True,
    show_default=True,
    help="The failure sample (default) or every R@1 failure of the run.",
)
@click.option(
    "--roles", default=None, help="Comma-separated roles (default all): attribute,count,relation,action,object."
)
@model_options()
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True, help="Texts per batch.")
@db_option
def explain(db_path, retrieval_run_id, use_sample, roles, model, pretrained, checkpoint, device, batch_size):
    """Rank every R@1 failure again with one phrase of its caption removed or neutralised.

    One variant per phrase the extractor finds (toolkit/labels/ablation.py, docs/design.md): the
    attribute's adjectives dropped, the count dropped, the relation or the action phrase dropped,
    an object mention replaced by "thing". Variants are encoded through improve's prompt cache
    (no text is encoded twice) and ranked with evaluate's ranking and tie policy. Writes
    explain_runs and failure_ablations; see the views failure_blame, blame_by_category and blame_agreement.
    Re-running with the same inputs is a no-op.

    \b
    Example:
      clipfail explain --run 1 --roles attribute,count
    """
    from toolkit.improve.stage import model_encoder_factory
    from toolkit.retrieval.explain import explain as run_explain

    with open_study(db_path) as con:
        res = run_explain(
            con,
            retrieval_run_id,
            scope="sample" if use_sample else "all-failures",
            roles=roles,
            encoder_factory=model_encoder_factory(
                model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, batch_size=batch_size
            ),
        )
    for note in res.notes:
        click.echo(f"Note: {note}")
    state = "already explained with these inputs, nothing changed" if res.is_reused else "explained"
    click.echo(
        f"Retrieval run {res.retrieval_run_id} ({res.scope}): {res.n_failures:,} R@1 failures {state} "
        f"(explain run {res.explain_run_id})."
    )
    encoded = f"{res.n_encoded:,} texts encoded now, {res.n_cached:,} from the cache"
    encoded = "stored before" if res.is_reused else encoded
    click.echo(
        f"  {res.n_variants:,} variants ({encoded}); "
        f"skipped: {res.n_skipped_identical} identical to the caption, {res.n_skipped_empty} empty; "
        f"{res.n_no_phrase} caption(s) with no phrase found."
    )
    echo_df(pd.DataFrame({"role": list(res.variants_by_role), "variants": list(res.variants_by_role.values())}))


@cli.command("report")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="report",
    show_default=True,
    help="Folder for report.html, figures/ and tables/, rewritten as a whole (refused if it holds files of others).",
)
@click.option(
    "--no-figures",
    is_flag=True,
    help="Draw no figure (a tables-only page in a fraction of the time): each figure keeps its number and caption, "
    "and says that it was left out; every table and CSV is the same.",
)
@run_option("the one labelled last")
@db_option
def report(db_path, out_dir, retrieval_run_id, no_figures):
    """Write the study's report: a self-contained report.html, figures (PNG/SVG) and tables (CSV).

    Every number in it is read from the views (recall_summary, taxonomy_distribution,
    taxonomy_actionable, annotator_agreement, improvement_recall, category_recall_delta);
    simulated labels and runs whose figures count ties pessimistically are flagged on the page.
    On a writable database it records its run (one `report` row per database state and folder,
    so that status knows); a write-protected one is only read and stays byte-identical.

    \b
    Example:
      clipfail report --out report/
    """
    from toolkit.report.page import write_report
    from toolkit.store.paths import check_output_path

    # A writable study records the report as a run (so `status` knows it is written); a write-protected
    # one is only read, and left byte-identical.
    if not Path(db_path).exists():
        raise UserError(db.missing_database_message(db_path))
    with open_study(db_path, read_only=not db.is_writable(db_path)) as con:
        check_output_path(out_dir, "--out", con, writes=("**",), probe=False)
        res = write_report(
            con, out_dir=out_dir, retrieval_run_id=retrieval_run_id, db_path=db_path, figures=not no_figures
        )
    if res.is_simulated:
        click.echo("NOTE: the labels in this report are SIMULATED (demo annotators); the page says so.")
    drawn = f"{len(res.figures)} figure files" if not no_figures else "no figures: --no-figures"
    click.echo(f"Wrote {res.html_path} ({drawn}, {len(res.tables)} CSV tables).")
    click.echo("Sections: " + "; ".join(res.sections))
    for item in res.missing:
        click.echo(f"  not in the report yet: {item}")


@cli.command("run")
@subset_options
@model_options(model_default="openai/clip-vit-base-patch32", precision=True)
@click.option(
    "--batch-size", type=click.IntRange(1, 65536), default=None, help="Embedding batch size (default: embed's)."
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Embedding cache folder (default: <db stem>_cache/embeddings/ beside the database).",
)
@sample_options(n_param="n_failures", seed_flag="--failure-seed", seed_param="failure_seed")
@db_option
def run(db_path, **options):
    """Run init, ingest, embed, evaluate and sample-failures in one go, resuming what is done.

    Every stage is idempotent, so after an interruption the same command carries on where the
    database stands. Ends with what to do next: label the CSVs, import-labels, improve, report.

    \b
    Example:
      clipfail run --coco-root ~/coco --model openai/clip-vit-base-patch32 --num-images 5000
    """
    from toolkit.store.paths import check_output_path
    from toolkit.workflows.pipeline import run_pipeline

    check_output_path(options["out_dir"], "--out", db_path, writes=SAMPLE_FILES)  # before ingest and embed
    res = run_pipeline(db_path, **options)  # each stage opens the database; embed does not hold it while encoding
    echo_df(
        pd.DataFrame(
            {
                "stage": [s.stage for s in res.stages],
                "status": [s.status for s in res.stages],
                "seconds": [f"{s.seconds:.1f}" for s in res.stages],
                "result": [s.detail for s in res.stages],
            }
        )
    )
    click.echo("")
    echo_df(res.summary[["retrieval_run_id", "subset", "model", "n_queries", "r_at_1", "r_at_5", "r_at_10"]])
    click.echo("\nNext steps:")
    for i, step in enumerate(res.next_steps, start=1):
        click.echo(f"  {i}. {_with_db(step, db_path)}")


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="demo_out",
    show_default=True,
    help="Folder for the data, model, database and report.",
)
@click.option(
    "--images", "n_images", type=click.IntRange(60, 100_000), default=100, show_default=True, help="Images to generate."
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Data, model and simulated-annotator seed.",
)
@click.option("--pictures/--no-pictures", default=True, show_default=True, help="Draw the annotators' pictures.")
@click.option(
    "--figures/--no-figures",
    default=True,
    show_default=True,
    help="Draw the report's figures (--no-figures: the same page and tables, each figure left out; see report).",
)
def demo(out_dir, n_images, seed, pictures, figures):
    """Run the whole study offline on generated data with a random tiny model, and write the report.

    Generates a COCO-format dataset, saves a randomly initialised tiny open_clip model as a
    local checkpoint, runs ingest, embed, evaluate and sample-failures, fills the labels with
    SIMULATED annotators (flagged as such everywhere), runs improve with all poolings on four
    subsets plus a control, and writes OUT/report/report.html. The database is OUT/demo.duckdb.

    \b
    Example:
      clipfail demo --out demo_out
    """
    from toolkit.workflows.demo import run_demo

    res = run_demo(out_dir, n_images=n_images, seed=seed, pictures=pictures, figures=figures)
    echo_df(pd.DataFrame({"step": [s for s, _ in res.timings], "seconds": [f"{t:.1f}" for _, t in res.timings]}))
    click.echo("")
    echo_df(res.recall[["retrieval_run_id", "subset", "model", "n_queries", "r_at_1", "r_at_5", "r_at_10"]])
    click.echo(f"\nImprovement subsets: {'; '.join(res.improvement_subsets)} (labels are SIMULATED).")
    click.echo(f"Database: {res.db_path}  (try: {clipfail_command(res.db_path, always=True)} status)")
    click.echo(f"Report:   {res.report_path}")


@cli.command("relocate")
@click.option("--images-root", type=click.Path(file_okay=False), default=None, help="New folder of a subset's images.")
@click.option("--subset", "subset_name", default=None, help="Only this subset (default: every subset).")
@click.option("--captions-json", type=click.Path(dir_okay=False), default=None, help="New place of the captions JSON.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Folder with the moved .npy files.")
@db_option
def relocate(db_path, images_root, subset_name, captions_json, cache_dir):
    """Rebind stored paths after images, the captions JSON or the embedding cache moved.

    Paths under the database's folder are stored relative to it and move with it; this is for the
    others. Nothing changes unless every referenced file is found at the new place: every image
    (and the recorded size of a sample of them), the captions JSON by sha256, every embedding file
    by sha256 (searched by name under --cache-dir). All rows change in one transaction.

    \b
    Example:
      clipfail --db study.duckdb relocate --images-root /data/coco/val2017 --cache-dir /data/study_cache
    """
    from pathlib import Path

    from toolkit.store import paths

    if not Path(db_path).is_file():
        raise UserError(f"Database {db_path} does not exist. Give the study's database with --db PATH.")
    if not (images_root or captions_json or cache_dir):
        raise UserError("Give what moved: --images-root DIR, --captions-json FILE and/or --cache-dir DIR.")
    with open_study(db_path) as con:
        res = paths.relocate(
            con, images_root=images_root, subset_name=subset_name, captions_json=captions_json, cache_dir=cache_dir
        )
    for name, old, new in res.images:
        click.echo(f"subset {name!r}: images {old} -> {new} ({res.checked_images} files found)")
    for name, old, new in res.captions:
        click.echo(f"subset {name!r}: captions JSON {old} -> {new} (sha256 matches)")
    if res.embeddings:
        click.echo(f"{len(res.embeddings)} embedding file(s) rebound (sha256 matches), e.g.:")
        for set_id, old, new in res.embeddings[:3]:
            click.echo(f"  set {set_id}: {old} -> {new}")
    for note in res.unchanged[:3]:
        click.echo(f"unchanged: {note}")
    if len(res.unchanged) > 3:
        click.echo(f"unchanged: {len(res.unchanged) - 3} more")
    if not res.updates:
        click.echo("Nothing to change: the database already points there.")


@cli.command("status")
@db_option
def status(db_path):
    """Show which stages have run, for which subset and model, with row counts, and what to do next.

    \b
    Example:
      clipfail --db study.duckdb status
    """
    from toolkit.report.status import study_status

    with open_study(db_path, read_only=True) as con:
        res = study_status(con)
    click.echo(f"Database {db_path}")
    if res.stages.empty:
        click.echo("No stage has run yet.")
    else:  # each row with what comes next for it, the --db of this study spelt out
        nexts = [" ".join(_with_db(line, db_path) for line in n.split("\n")) if n else "" for n in res.stages["next"]]
        echo_df(res.stages.assign(next=nexts))
    if res.has_simulated_labels:
        click.echo("NOTE: some labels are SIMULATED (demo annotators), not human judgements.")
    if res.missing_files:
        click.echo("\nMISSING FILES (the database references them; the stages that read them will stop):")
        for line in res.missing_files:
            click.echo(f"  {line}")
    click.echo("\nNext:")
    for step in res.next_steps:
        click.echo(f"  {_with_db(step, db_path)}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("query")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the result to this CSV file.")
@db_option
def sql(db_path, query, csv_path):
    """Run one read-only SQL query (a SELECT) and print the result as a table.

    The database is opened read-only and the query cannot read or write any other file: COPY,
    EXPORT, ATTACH, SET, PRAGMA, CALL, INSTALL/LOAD and several statements at once are refused.
    Save a result with --csv. A query that starts with `--` (a comment) can also be given
    after a lone `--`, so that it is never read as an option:

    \b
    clipfail sql -- "-- per subset ..."

    \b
    Example:
      clipfail sql "SELECT * FROM recall_summary"
    """
    from pathlib import Path

    from toolkit.sheets import write_frame_csv
    from toolkit.store.paths import check_output_path
    from toolkit.store.sql import run_query

    with open_study(db_path, read_only=True) as con:
        if csv_path:  # before the query runs: never the study, its .wal, its caches or another database
            check_output_path(csv_path, "--csv", con)
        df = run_query(con, query)
    echo_df(df)
    if csv_path:
        tmp = Path(csv_path).with_name(f".{Path(csv_path).name}.tmp{os.getpid()}")
        try:  # whole or not at all: a failed write leaves the file as it was
            write_frame_csv(df, tmp)  # cells and column names guarded against spreadsheet formulas
            os.replace(tmp, csv_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"Cannot write --csv {csv_path}: {exc.strerror or exc}.") from None
        click.echo(f"Wrote {len(df)} rows to {csv_path}.")


def main():
    cli(prog_name="clipfail")


if __name__ == "__main__":
    sys.exit(main())
