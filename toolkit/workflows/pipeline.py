"""`clipfail run`: ingest, embed, evaluate and sample-failures in one go, resuming what is done.

Each stage is called through its own toolkit function, which is idempotent: the same inputs
again are a no-op that reports so, and an interrupted embed resumes from its shards. So
`run_pipeline` can be started again after any failure or Ctrl-C and it carries on where the
database stands. What is left for people (labelling the exported CSVs) and the later stages
(import-labels, improve, report) are returned as next steps.
"""

from __future__ import annotations

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


def run_pipeline(
    database,
    *,
    coco_root=None,
    captions_json=None,
    images_dir=None,
    num_images: int | str | None = None,  # None: ingest's default (5000)
    captions_per_image: int = 5,
    seed: int = 42,
    name: str | None = None,
    skip_bad_images: bool = False,
    model: str = "openai/clip-vit-base-patch32",
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "fp32",
    cache_dir=None,
    topk: int = 10,
    n_failures: int = 200,
    failure_seed: int = 42,
    overlap: int = 30,
    per_annotator: int = 50,
    annotators: str = "A,B,C",
    out_dir="failure_analysis",
    pictures: bool = True,
) -> PipelineResult:
    """init + ingest + embed + evaluate (text-to-image) + sample-failures; see the module docstring.

    `database` is a path (each stage opens it and closes it again, so the long embed stage does not
    hold the database while it encodes and `clipfail status` can watch it) or an open connection."""
    from toolkit.errors import UserError
    from toolkit.ingest.stage import ingest
    from toolkit.labels.sample import parse_annotators, sample_failures
    from toolkit.retrieval.evaluate import evaluate

    if pretrained and checkpoint is not None:  # refused before ingest writes anything
        raise UserError("Give either --pretrained TAG or --checkpoint PATH, not both.")

    def _in(stage_fn, *args, **kwargs):
        with connection(database) as con:
            return stage_fn(con, *args, **kwargs)

    stages: list[StageOutcome] = []
    ing = _timed(
        stages,
        "ingest",
        lambda: _in(
            ingest,
            coco_root=coco_root,
            captions_json=captions_json,
            images_dir=images_dir,
            num_images=num_images,
            captions_per_image=captions_per_image,
            seed=seed,
            name=name,
            skip_bad_images=skip_bad_images,
        ),
        lambda r: f"subset {r.name!r}: {r.num_images} images, {r.num_captions} captions",
    )
    emb_kw = dict(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, precision=precision)
    if batch_size is not None:
        emb_kw["batch_size"] = batch_size
    else:
        emb_kw["batch_size"] = None
    emb = _timed(
        stages,
        "embed",
        lambda: embed_stage(database, subset_name=ing.name, cache_dir=cache_dir, **emb_kw),
        lambda r: (
            f"model {model}" + (f" ({pretrained})" if pretrained else "") + (" (checkpoint)" if checkpoint else "")
        ),
    )
    ev = _timed(
        stages,
        "evaluate",
        lambda: _in(
            evaluate,
            ing.name,
            topk=topk,
            device=device,
            direction="text-to-image",
            # exactly the sets the embed stage made or reused: the newest sets of the model may be of another
            # --precision (an `embed --precision bf16` after an fp32 run)
            embedding_set_ids=(emb.image_set_id, emb.text_set_id),
        ),
        lambda r: f"retrieval run {r.retrieval_run_id}: {r.n_queries} captions ranked",
    )
    _timed(
        stages,
        "sample-failures",
        lambda: _in(
            sample_failures,
            retrieval_run_id=ev.retrieval_run_id,
            n=n_failures,
            seed=failure_seed,
            overlap=overlap,
            per_annotator=per_annotator,
            annotators=annotators,
            out_dir=out_dir,
            pictures=pictures,
        ),
        lambda r: f"{r.n} of {r.n_failures} R@1 failures -> {r.out_dir}/",
    )
    names = parse_annotators(annotators)
    out = Path(out_dir)
    files = " ".join(shlex.quote(str(out / f"assign_{a}.csv")) for a in names)
    # the control must fit the run: improve refuses successes:N beyond its R@1 successes
    with connection(database) as con:
        n_successes = con.execute(
            "SELECT count(*) FROM retrieval_ranks WHERE retrieval_run_id = ? AND gt_rank = 1", [ev.retrieval_run_id]
        ).fetchone()[0]
    control = f" --control successes:{min(SUGGESTED_CONTROL, n_successes)}" if n_successes else ""
    steps = [
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
    return PipelineResult(
        subset=ing.name,
        retrieval_run_id=ev.retrieval_run_id,
        failures_dir=out,
        stages=stages,
        next_steps=steps,
        summary=ev.summary,
        annotators=names,
    )
