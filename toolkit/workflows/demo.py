"""`clipfail demo`: the whole study, offline, in about a minute on two CPU cores.

1. A generated COCO-format dataset (toolkit.ingest.synthetic) in OUT/coco.
2. A small randomly initialised open_clip model (the packaged ``tiny-clip`` config), saved as a
   local checkpoint OUT/model/tiny-clip-random.safetensors, so that loading from a checkpoint is
   the path the demo exercises.
3. `clipfail run`'s stages: ingest, embed, evaluate, sample-failures (OUT/failure_analysis/).
4. SIMULATED labels (toolkit.labels.simulate): seeded annotators A, B and C fill the exported CSVs,
   with disagreement on the overlap set; they are imported with is_simulated = true, and the
   report and analyze say so.
5. improve with all three poolings on four subsets: the three actionable categories with the most
   labels (own templates) and the union of the top two, plus a control on R@1 successes for the
   largest one.
6. The report in OUT/report/report.html.
(After sample-failures, `clipfail explain` ablates each phrase of every sampled failure's caption with the same
random model, and its blame is evidence for triage; the report's section 11 shows it, labelled as made with the
demo's random model.)
(After evaluate, `clipfail triage` suggests a category for every failure from the generated
instances_val2017.json; the report's section 7 compares the suggestions with the simulated labels.)

Everything is seeded; a second run in the same folder finds every stage done and only rewrites
the report. The folder remembers the --seed and --images it was made with (OUT/demo_settings.json):
another value there is refused, since its data, model and labels would be reused and the numbers
would silently be those of the first settings. A random model's retrieval is near chance and the
labels are simulated, so the numbers show the pipeline working, not anything about CLIP.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import UserError
from toolkit.store.study import open_study

CHECKPOINT_NAME = "tiny-clip-random.safetensors"
SETTINGS_NAME = "demo_settings.json"  # the --seed and --images a demo folder was made with
DEMO_NOTE = (
    "DEMO. This report was made by `clipfail demo` on generated images with a small, randomly initialised "
    "model (tiny-clip, loaded from a local checkpoint): its retrieval is near chance. Run the study on COCO "
    "with a real model (clipfail download-coco, clipfail run) for numbers that mean something."
)


@dataclass
class DemoResult:
    out_dir: Path
    db_path: Path
    report_path: Path
    checkpoint: Path
    retrieval_run_id: int
    improvement_subsets: list[str]
    timings: list[tuple[str, float]] = field(default_factory=list)  # (step, seconds)
    recall: object = None  # recall_summary row of the run (DataFrame)


def pick_subsets(con, retrieval_run_id: int, n: int = 3) -> list[tuple[str, str]]:
    """(categories, template mode): the n actionable categories with the most labels, and the top two's union."""
    rows = con.execute(
        "SELECT category FROM taxonomy_actionable WHERE retrieval_run_id = ? AND count > 0 ORDER BY rank LIMIT ?",
        [retrieval_run_id, n],
    ).fetchall()
    cats = [r[0] for r in rows]
    if not cats:
        raise UserError("The simulated labels left no actionable category to improve; try another --seed.")
    subsets = [(c, "own") for c in cats]
    if len(cats) >= 2:
        order = {
            r[0]: r[1] for r in con.execute("SELECT name, position FROM categories").fetchall()
        }  # union runs name their categories in taxonomy order
        subsets.append((",".join(sorted(cats[:2], key=lambda c: order.get(c, 1 << 30))), "union"))
    return subsets


def run_demo(
    out_dir="demo_out",
    *,
    n_images: int = 100,
    seed: int = 0,
    device: str = "cpu",
    pictures: bool = True,
    figures: bool = True,
    n_failures: int = 200,
    overlap: int = 30,
    per_annotator: int = 50,
    control_successes: int = 50,
) -> DemoResult:
    from toolkit.embed.models import TINY_CONFIG
    from toolkit.report.page import write_report
    from toolkit.workflows.pipeline import run_pipeline

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the demo folder {out}: {exc.strerror or exc}.") from None
    _check_settings(out, {"seed": int(seed), "images": int(n_images)})
    laps = _Laps()
    coco, ckpt = _demo_inputs(out, n_images, seed, laps)
    db_path = out / "demo.duckdb"
    con = open_study(db_path)
    try:
        pipe = run_pipeline(
            con,
            coco_root=coco,
            num_images=n_images,
            captions_per_image=5,
            seed=42,
            name=f"demo-{n_images}",
            model=TINY_CONFIG,
            checkpoint=str(ckpt),
            device=device,
            n_failures=n_failures,
            failure_seed=42,
            overlap=overlap,
            per_annotator=per_annotator,
            annotators="A,B,C",
            out_dir=out / "failure_analysis",
            pictures=pictures,
        )
        laps.add_stages(pipe.stages)
        rrid = pipe.retrieval_run_id
        demo_explain(con, rrid, ckpt, device, out)
        laps("explain (phrase ablation of the failure sample)")
        demo_triage(con, rrid)
        laps("triage")
        _demo_labels(con, out, rrid, seed)
        laps("simulated labels + import-labels")
        subsets = _demo_improve(con, rrid, ckpt, device, out, control_successes)
        laps("improve (4 subsets x 3 poolings + control)")
        rep = write_report(con, out_dir=out / "report", retrieval_run_id=rrid, db_path=str(db_path), notes=[DEMO_NOTE],
                           generated_images=True, figures=figures)  # fmt: skip
        laps("report")
    finally:
        con.close()
    return DemoResult(
        out_dir=out,
        db_path=db_path,
        report_path=rep.html_path,
        checkpoint=ckpt,
        retrieval_run_id=rrid,
        improvement_subsets=[c for c, _ in subsets],
        timings=laps.timings,
        recall=pipe.summary,
    )


class _Laps:
    """The demo's timings: each call records the seconds since the previous one under a step's name."""

    def __init__(self):
        self.timings: list[tuple[str, float]] = []
        self.t0 = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.timings.append((step, now - self.t0))
        self.t0 = now

    def add_stages(self, stages) -> None:
        """The pipeline's own stage timings; the next lap starts now."""
        for s in stages:
            self.timings.append((s.stage, s.seconds))
        self.t0 = time.perf_counter()


def _demo_inputs(out: Path, n_images: int, seed: int, laps: _Laps) -> tuple[Path, Path]:
    """The synthetic COCO folder and the random tiny-clip checkpoint (kept when they are there already)."""
    from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint
    from toolkit.ingest.synthetic import make_synthetic_coco

    coco = out / "coco"
    if not (coco / "annotations" / "captions_val2017.json").exists():
        make_synthetic_coco(coco, n_images, seed=seed)
    laps("generate COCO-format data")
    ckpt = out / "model" / CHECKPOINT_NAME
    if not ckpt.exists():
        save_random_checkpoint(ckpt, spec=TINY_CONFIG, seed=seed)
    laps("save random tiny-clip checkpoint")
    return coco, ckpt


def _demo_labels(con, out: Path, rrid: int, seed: int) -> None:
    """Simulated annotators label the sample, unless it holds labels already."""
    from toolkit.labels.simulate import simulate_labels

    labelled = con.execute(
        "SELECT count(*) FROM annotations JOIN failure_samples USING (sample_id) WHERE retrieval_run_id = ?",
        [rrid],
    ).fetchone()[0]
    if not labelled:
        simulate_labels(con, out / "failure_analysis", out / "labels_simulated", seed=seed, retrieval_run_id=rrid)


def _demo_improve(con, rrid: int, ckpt: Path, device: str, out: Path, control_successes: int) -> list:
    """improve on each subset of pick_subsets (the first with a control); returns the subsets."""
    from toolkit.improve.stage import improve

    subsets = pick_subsets(con, rrid)
    n_successes = con.execute(
        "SELECT count(*) FROM retrieval_ranks WHERE retrieval_run_id = ? AND gt_rank = 1", [rrid]
    ).fetchone()[0]
    control = f"successes:{min(control_successes, n_successes)}" if n_successes else "all"
    for i, (categories, mode) in enumerate(subsets):
        improve(
            con,
            categories,
            retrieval_run_id=rrid,
            poolings="all",
            tau=1.0,
            template_mode=mode,
            k=15 if mode == "union" else 10,  # the reference study's K: 10 per category, 15 for the mixed run
            seed=42,
            control=control if i == 0 else None,
            encoder_factory=_encoder_factory(ckpt, device),
            cache_dir=out / "prompt_cache",
        )
    return subsets


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse a demo folder made with another --seed or --images (its data, model and labels would be reused);
    record the settings in a folder that has no generated data yet."""
    marker = out / SETTINGS_NAME
    if marker.exists():
        try:
            made = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            made = None
        if made != settings:
            was = f"--seed {made['seed']} --images {made['images']}" if isinstance(made, dict) and made else "?"
            raise UserError(
                f"{out} holds a demo made with {was} (see {marker.name}); this run asks for --seed {settings['seed']} "
                f"--images {settings['images']}. Its data, model and labels would be reused, so the numbers would be "
                "those of the first settings. Give another --out, or the same --seed and --images."
            )
        return
    if not (out / "coco").exists() and not (out / "model").exists():
        try:
            marker.write_text(json.dumps(settings, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"Cannot write in the demo folder {out}: {exc.strerror or exc}.") from None


def _encoder_factory(ckpt: Path, device: str):
    from toolkit.embed.models import TINY_CONFIG
    from toolkit.improve.stage import model_encoder_factory

    return model_encoder_factory(TINY_CONFIG, checkpoint=str(ckpt), device=device)


def demo_explain(con, retrieval_run_id: int, ckpt: Path, device: str, out: Path):
    """The demo's explain step: every phrase of every sampled failure's caption ablated with the demo's random model,
    through the prompt cache improve uses later (a no-op when already done)."""
    from toolkit.retrieval.explain import explain

    return explain(
        con, retrieval_run_id, scope="sample", encoder_factory=_encoder_factory(ckpt, device),
        cache_dir=out / "prompt_cache",
    )  # fmt: skip


def demo_triage(con, retrieval_run_id: int):
    """The demo's triage step: suggestions for every R@1 failure (a no-op when already done)."""
    from toolkit.labels.triage import triage

    return triage(con, retrieval_run_id)
