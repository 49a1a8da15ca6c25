"""`clipfail run`: ingest, embed, evaluate and sample-failures in one go, resuming what is done.

Each stage is called through its own toolkit function, which is idempotent: the same inputs
again are a no-op that reports so, and an interrupted embed resumes from its shards. So
`run_pipeline` can be started again after any failure or Ctrl-C and it carries on where the
database stands. What is left for people (labelling the exported CSVs) and the later stages
(import-labels, improve, report) are returned as next steps.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.store.study import connection

SUGGESTED_CONTROL = 200  # R@1 successes in the suggested improve control (fewer if the run has fewer)


@dataclass
class StageOutcome:
    stage: str
    status: str  # 'done' | 'already done'
    detail: str
    seconds: float


@dataclass
class PipelineResult:
    subset: str
    retrieval_run_id: int
    failures_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    summary: object = None  # the run's recall_summary row (DataFrame)
    annotators: list[str] = field(default_factory=list)


def embed_stage(database, *, subset_name, model, pretrained, checkpoint, device, batch_size, precision, cache_dir=None):
    """Call the embed stage (toolkit.embed.stage.embed) with the pipeline's options."""
    from toolkit.embed.stage import embed

    return embed(
        database,
        subset_name=subset_name,
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        batch_size=batch_size,
        precision=precision,
        cache_dir=cache_dir,
    )


def _timed(outcomes: list[StageOutcome], stage: str, fn, describe):
    t0 = time.perf_counter()
    res = fn()
    noop = bool(getattr(res, "is_noop", False))
    outcomes.append(StageOutcome(stage, "already done" if noop else "done", describe(res), time.perf_counter() - t0))
    return res


@dataclass
class PipelineOptions:
    """The options of `clipfail run` (and `run_pipeline`), travelling as one value: those of ingest, then of
    embed and evaluate, then of sample-failures (defaults as each stage's own)."""

    coco_root: object = None
    captions_json: object = None
    images_dir: object = None
    num_images: int | str | None = None  # None: ingest's default (5000)
    captions_per_image: int = 5
    seed: int = 42
    name: str | None = None
    skip_bad_images: bool = False
    coco5k_test: bool = False
    model: str = "openai/clip-vit-base-patch32"
    pretrained: str | None = None
    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "fp32"
    cache_dir: object = None
    topk: int = 10
    n_failures: int = 200
    failure_seed: int = 42
    overlap: int = 30
    per_annotator: int = 50
    annotators: str = "A,B,C"
    out_dir: object = "failure_analysis"
    pictures: bool = True


def run_pipeline(database, options: PipelineOptions | None = None, **kwargs) -> PipelineResult:
    """init + ingest + embed + evaluate (text-to-image) + sample-failures; see the module docstring.

    `database` is a path (each stage opens it and closes it again, so the long embed stage does not
    hold the database while it encodes and `clipfail status` can watch it) or an open connection.
    The options are `PipelineOptions`, given as one (`options`) or as its keywords
    (`run_pipeline(db_path, coco_root=..., model=...)`)."""
    from toolkit.errors import UserError

    opts = PipelineOptions(**kwargs) if options is None else dataclasses.replace(options, **kwargs)
    if opts.pretrained and opts.checkpoint is not None:  # refused before ingest writes anything
        raise UserError("Give either --pretrained TAG or --checkpoint PATH, not both.")

    stages: list[StageOutcome] = []
    ing = _timed(stages, "ingest", lambda: _ingest(database, opts), _describe_ingest)
    emb = _timed(
        stages,
        "embed",
        lambda: embed_stage(database, subset_name=ing.name, cache_dir=opts.cache_dir, **_embed_kw(opts)),
        lambda r: (
            f"model {opts.model}"
            + (f" ({opts.pretrained})" if opts.pretrained else "")
            + (" (checkpoint)" if opts.checkpoint else "")
        ),
    )
    ev = _timed(
        stages,
        "evaluate",
        lambda: _evaluate(database, opts, ing.name, emb),
        lambda r: f"retrieval run {r.retrieval_run_id}: {r.n_queries} captions ranked",
    )
    _timed(
        stages,
        "sample-failures",
        lambda: _sample(database, opts, ev.retrieval_run_id),
        lambda r: f"{r.n} of {r.n_failures} R@1 failures -> {r.out_dir}/",
    )
    from toolkit.labels.sample import parse_annotators

    names = parse_annotators(opts.annotators)
    out = Path(opts.out_dir)
    return PipelineResult(
        subset=ing.name,
        retrieval_run_id=ev.retrieval_run_id,
        failures_dir=out,
        stages=stages,
        next_steps=_next_steps(database, ev.retrieval_run_id, out, names),
        summary=ev.summary,
        annotators=names,
    )


def _in(database, stage_fn, *args, **kwargs):
    """Call a stage on a connection to `database` (opened and closed again when it is a path)."""
    with connection(database) as con:
        return stage_fn(con, *args, **kwargs)


def _ingest(database, opts: PipelineOptions):
    from toolkit.ingest.stage import ingest

    return _in(
        database,
        ingest,
        coco_root=opts.coco_root,
        captions_json=opts.captions_json,
        images_dir=opts.images_dir,
        num_images=opts.num_images,
        captions_per_image=opts.captions_per_image,
        seed=opts.seed,
        name=opts.name,
        skip_bad_images=opts.skip_bad_images,
        coco5k_test=opts.coco5k_test,
    )


def _describe_ingest(r) -> str:
    return f"subset {r.name!r}: {r.num_images} images, {r.num_captions} captions"


def _embed_kw(opts: PipelineOptions) -> dict:
    return dict(
        model=opts.model,
        pretrained=opts.pretrained,
        checkpoint=opts.checkpoint,
        device=opts.device,
        precision=opts.precision,
        batch_size=opts.batch_size,
    )


def _evaluate(database, opts: PipelineOptions, subset_name: str, emb):
    from toolkit.retrieval.evaluate import evaluate

    return _in(
        database,
        evaluate,
        subset_name,
        topk=opts.topk,
        device=opts.device,
        direction="text-to-image",
        # exactly the sets the embed stage made or reused: the newest sets of the model may be of another
        # --precision (an `embed --precision bf16` after an fp32 run)
        embedding_set_ids=(emb.image_set_id, emb.text_set_id),
    )


def _sample(database, opts: PipelineOptions, retrieval_run_id: int):
    from toolkit.labels.sample import sample_failures

    return _in(
        database,
        sample_failures,
        retrieval_run_id=retrieval_run_id,
        n=opts.n_failures,
        seed=opts.failure_seed,
        overlap=opts.overlap,
        per_annotator=opts.per_annotator,
        annotators=opts.annotators,
        out_dir=opts.out_dir,
        pictures=opts.pictures,
    )


def _next_steps(database, retrieval_run_id: int, out: Path, names: list[str]) -> list[str]:
    """What is left for people (labelling) and the later stages, as commands."""
    files = " ".join(shlex.quote(str(out / f"assign_{a}.csv")) for a in names)
    # the control must fit the run: improve refuses successes:N beyond its R@1 successes
    with connection(database) as con:
        n_successes = con.execute(
            "SELECT count(*) FROM retrieval_ranks WHERE retrieval_run_id = ? AND gt_rank = 1", [retrieval_run_id]
        ).fetchone()[0]
    control = f" --control successes:{min(SUGGESTED_CONTROL, n_successes)}" if n_successes else ""
    return [
        f"Label the failures: each annotator fills the category column of their {out}/assign_<name>.csv and of "
        f"their own copy of {out}/assign_overlap.csv, saved as assign_overlap_<name>.csv (definitions and "
        f"examples in {out}/README.txt; pictures vis_<sample_id>.png).",
        f"clipfail import-labels {files}",
        *(
            f"clipfail import-labels {shlex.quote(str(out / f'assign_overlap_{a}.csv'))} --annotator {shlex.quote(a)}"
            for a in names
        ),
        "clipfail analyze",
        f"clipfail improve --categories Object --pooling all{control}",
        "clipfail report --out report/",
    ]
