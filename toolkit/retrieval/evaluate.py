"""The evaluate stage: exact retrieval ranks of a subset's cached embeddings, stored as tables.

`evaluate(con, subset_name, model=...)` finds the subset's image and text embedding sets (written
by `clipfail embed`), verifies their checksums, ranks every query against the whole gallery with
`toolkit.retrieval.ranking` and writes, in one transaction,

- a `runs` row (stage 'evaluate'),
- a `retrieval_runs` row: subset, model, the two embedding set ids, direction, tie policy, top-k,
- one `retrieval_ranks` row per query: gt_id, gt_rank, n_tied, gt_score, top1_id/top1_score and
  the top-k ids and scores as list columns.

Directions:
- text-to-image: a query is a caption (query_id = caption_id), the gallery is the subset's
  images, gt_id is the caption's image, the top-k ids are image ids.
- image-to-text: a query is an image (query_id = image_id; images without a caption in the subset
  are skipped), the gallery is the subset's captions. Its rank is the best rank among its captions
  (a hit at K if any of them is in the top K, as CLIP papers report it); gt_id is that best
  caption, the top-k ids are caption ids.

Ranks follow `toolkit.retrieval.ranking`'s tie policy ("optimistic": 1 + the number of gallery items
scoring strictly higher; `n_tied` other items have exactly the GT score, so the pessimistic rank is
gt_rank + n_tied). Recall@K, mean and median rank and the R@1 failures are read from the
`recall_summary` view, never computed on the side.

The same inputs (the same two embedding files, direction, top-k) are a no-op that returns the
existing run; device and chunk size cannot change a result (see toolkit.retrieval.ranking) and are only
recorded in the `runs` row.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit.embed.devices import resolve_device
from toolkit.errors import UserError
from toolkit.retrieval import positives
from toolkit.retrieval import ranking as R
from toolkit.store import artifacts, db
from toolkit.store import paths as study_paths

STAGE = "evaluate"
DIRECTIONS = ("text-to-image", "image-to-text")
METHOD = "v1: float32 torch.mm scores in fixed 512-row GEMM blocks; exact comparison counts; stable top-k"


@dataclass
class EvaluateResult:
    retrieval_run_id: int
    run_id: int
    is_noop: bool
    subset: str
    model: str
    direction: str
    n_queries: int
    summary: pd.DataFrame  # this run's row of the recall_summary view


def _embed_command(con, subset: str, model: str | None, pretrained: str | None, checkpoint: str | None) -> str:
    spec = model or "openai/clip-vit-base-patch32"
    cmd = f"{study_paths.clipfail_command(con)} embed --subset {shlex.quote(subset)} --model {shlex.quote(spec)}"
    if pretrained:
        cmd += f" --pretrained {shlex.quote(pretrained)}"
    if checkpoint:
        cmd += f" --checkpoint {shlex.quote(str(checkpoint))}"
    return cmd


def rebuild_embeddings_command(con, subset: str, sets: list[dict], recompute: bool = True) -> str:
    """The `embed ... --recompute` command that rebuilds these embedding sets exactly as they were made:
    the model spec, weights (--pretrained tag or --checkpoint file), precision, draft and GPU decoding
    recorded in their config, and --db. Without the weights it would embed a randomly initialised model."""
    configs = []
    for s in sets:
        row = con.execute(
            "SELECT config_json FROM embedding_sets WHERE embedding_set_id = ?", [int(s["embedding_set_id"])]
        ).fetchone()
        try:
            configs.append(json.loads(row[0]) if row and row[0] else {})
        except ValueError:
            configs.append({})
    configs.sort(key=lambda c: c.get("kind") != "image")  # the image set's config first: it records --draft-decode
    cfg = {k: v for c in reversed(configs) for k, v in c.items()}
    first = sets[0] if sets else {}
    spec = cfg.get("spec") or cfg.get("model") or first.get("model") or "openai/clip-vit-base-patch32"
    parts = [study_paths.clipfail_command(con, always=True), "embed", "--subset", shlex.quote(subset)]
    parts += ["--model", shlex.quote(str(spec))]
    checkpoint = cfg.get("checkpoint")
    pretrained = cfg.get("pretrained") or _str_or_none(first.get("pretrained"))
    if checkpoint:  # stored relative to the database's folder when it lies under it
        parts += ["--checkpoint", shlex.quote(str(study_paths.resolve(con, checkpoint)))]
    elif pretrained:
        parts += ["--pretrained", shlex.quote(str(pretrained))]
    precision = cfg.get("precision") or _str_or_none(first.get("precision"))
    if precision and precision != "fp32":
        parts += ["--precision", precision]
    if cfg.get("draft"):
        parts.append("--draft-decode")
    if cfg.get("decode") == "gpu":  # part of the image set's identity (only recorded when not cpu)
        parts += ["--decode", "gpu"]
    if recompute:
        parts.append("--recompute")
    return " ".join(p for p in parts if p)


def _resolve(model: str, pretrained: str | None = None) -> tuple[list[str], str | None]:
    """The names an embedding set may record for a model spec (the spec itself and the open_clip
    name it resolves to, with `pretrained` as embed resolved it: ViT-B-32 + openai -> ViT-B-32-quickgelu),
    and the pretrained tag the spec implies (openai/clip-vit-base-patch32 -> ViT-B-32-quickgelu with
    'openai' weights)."""
    try:
        from toolkit.embed.models import resolve_spec

        resolved = resolve_spec(model, pretrained)
    except Exception:  # not a spec this toolkit resolves: match the recorded name as given
        return [model], None
    names = [model] + ([resolved.model_name] if resolved.model_name != model else [])
    return names, resolved.pretrained if resolved.kind == "hf-name" else None


def find_embedding_sets(
    con, subset: dict, model: str | None = None, pretrained: str | None = None, checkpoint: str | None = None
) -> tuple[dict, dict]:
    """The image and text embedding sets to evaluate: the latest of each kind for one model.

    Sets belong to the same model when model, pretrained tag and checkpoint sha256 agree. Without
    `model`, the subset must have embeddings of exactly one model. If a model was embedded more
    than once (another precision, draft decoding, --recompute), the newest set of each kind with the
    precision of the newest set is used; retrieval_runs records which.
    """
    name = subset["name"]
    fix = f"Run: {_embed_command(con, name, model, pretrained, checkpoint)}"
    sets = con.execute(
        """
        SELECT embedding_set_id, kind, model, pretrained, checkpoint_sha256, precision, path, rows, sha256
        FROM embedding_sets WHERE subset_id = ? AND kind IN ('image', 'text')
        ORDER BY embedding_set_id
        """,
        [int(subset["subset_id"])],
    ).df()
    if model is not None:
        names, implied = _resolve(model, pretrained)
        sets = sets[sets["model"].isin(names)]
        pretrained = pretrained or implied
    if pretrained is not None:
        sets = sets[sets["pretrained"] == pretrained]
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"Checkpoint file {checkpoint} does not exist.")
        sets = sets[sets["checkpoint_sha256"] == artifacts.sha256_file(checkpoint)]
    what = f"subset {name!r}" + (f" and model {model!r}" if model else "")
    if sets.empty:
        raise UserError(f"No cached embeddings for {what}. Embed the subset first. {fix}")
    keys = {(r.model, _str_or_none(r.pretrained), _str_or_none(r.checkpoint_sha256)) for r in sets.itertuples()}
    if len(keys) > 1:
        options = ", ".join(sorted({_describe(r) for r in sets.itertuples()}))
        raise UserError(f"Subset {name!r} has embeddings of several models: {options}. Choose one with --model.")
    # The newest set's precision decides: an image set and a text set of two precisions are never paired
    # (embed fp16 after fp32, then fp32 --draft-decode, makes a new fp32 image set but reuses the fp32 text set).
    sets = sets[sets["precision"] == sets.iloc[-1]["precision"]]
    images = sets[sets["kind"] == "image"]
    texts = sets[sets["kind"] == "text"]
    if images.empty or texts.empty:
        missing = "image" if images.empty else "text"
        have = (texts if images.empty else images).iloc[-1].to_dict()
        fix = f"Run: {rebuild_embeddings_command(con, name, [have], recompute=False)}"  # the other kind's spec
        raise UserError(f"The {missing} embeddings for {what} are missing. {fix}")
    return images.iloc[-1].to_dict(), texts.iloc[-1].to_dict()


def embedding_sets_by_id(con, subset: dict, image_set_id: int, text_set_id: int) -> tuple[dict, dict]:
    """The image and text embedding sets with these ids, checked to be of that kind and of this subset."""
    out = []
    for set_id, kind in ((image_set_id, "image"), (text_set_id, "text")):
        rows = con.execute(
            """
            SELECT embedding_set_id, kind, model, pretrained, checkpoint_sha256, precision, path, rows, sha256,
                   subset_id
            FROM embedding_sets WHERE embedding_set_id = ?
            """,
            [int(set_id)],
        ).df()
        if rows.empty or rows.iloc[0]["kind"] != kind or int(rows.iloc[0]["subset_id"]) != int(subset["subset_id"]):
            raise UserError(f"Embedding set {set_id} is not a {kind} embedding set of subset {subset['name']!r}.")
        out.append(rows.iloc[0].drop("subset_id").to_dict())
    made = [tuple(_str_or_none(s[k]) for k in ("model", "pretrained", "checkpoint_sha256", "precision")) for s in out]
    if made[0] != made[1]:
        shown = [_describe(pd.Series(s)) + f" ({s['precision']})" for s in out]
        raise UserError(
            f"Embedding sets {image_set_id} (image: {shown[0]}) and {text_set_id} (text: {shown[1]}) were not made "
            "alike (model, weights and precision must agree); their scores cannot be compared. Name two sets of one "
            "embed run."
        )
    return out[0], out[1]


def _describe(row) -> str:
    s = str(row.model)
    if isinstance(row.pretrained, str) and row.pretrained:
        s += f" --pretrained {row.pretrained}"
    if isinstance(row.checkpoint_sha256, str) and row.checkpoint_sha256:
        s += f" (checkpoint {row.checkpoint_sha256[:12]})"
    return s


def summary(con, retrieval_run_id: int) -> pd.DataFrame:
    """This run's row of the recall_summary view."""
    return con.execute("SELECT * FROM recall_summary WHERE retrieval_run_id = ?", [int(retrieval_run_id)]).df()


def _rank(direction, images, texts, text_gt_row, topk, chunk, device, progress, name, fix) -> tuple[pd.DataFrame, int]:
    """The ranks of every query (retrieval_ranks' columns) and the top-k width they hold."""
    image_ids, caption_ids = images.item_ids, texts.item_ids
    try:
        if direction == "text-to-image":
            res = R.rank_text_to_image(
                texts.array, images.array, text_gt_row, k=topk, chunk=chunk, device=device, progress=progress
            )
            query_ids, gt_ids = caption_ids, image_ids[res.gt_index]
            topk_ids = image_ids[res.topk_indices]
        else:
            has_caption = np.bincount(text_gt_row, minlength=len(image_ids)) > 0
            keep = np.flatnonzero(has_caption)
            remap = np.full(len(image_ids), -1, dtype=np.int64)
            remap[keep] = np.arange(len(keep))
            res = R.rank_image_to_text(
                images.array[keep], texts.array, remap[text_gt_row], k=topk, chunk=chunk, device=device,
                progress=progress,
            )  # fmt: skip
            query_ids, gt_ids = image_ids[keep], caption_ids[res.gt_index]
            topk_ids = caption_ids[res.topk_indices]
    except ValueError as exc:  # bad numbers in an embedding file (NaN, wrong dim)
        raise UserError(f"Cannot rank the embeddings of subset {name!r}: {exc}. {fix}") from None
    if len(query_ids) == 0:
        raise UserError(f"Subset {name!r} has no queries for {direction}.")

    ranks = pd.DataFrame(
        {
            "query_id": np.asarray(query_ids, dtype=np.int64),
            "gt_id": np.asarray(gt_ids, dtype=np.int64),
            "gt_rank": res.gt_rank,
            "n_tied": res.n_tied,
            "gt_score": res.gt_score,
            "top1_id": topk_ids[:, 0],
            "top1_score": res.topk_scores[:, 0],
            "topk_ids": list(topk_ids),
            "topk_scores": list(res.topk_scores),
        }
    )
    return ranks, res.topk_indices.shape[1]


def evaluate(
    con,
    subset_name: str | None = None,
    model: str | None = None,
    topk: int = 10,
    device: str = "auto",
    direction: str = "text-to-image",
    chunk: int | None = None,
    *,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    progress: bool | None = None,
    embedding_set_ids: tuple[int, int] | None = None,
) -> EvaluateResult:
    """Rank the subset's queries against its gallery and store the ranks; see the module docstring.

    `embedding_set_ids=(image_set_id, text_set_id)` names the two sets exactly (as `clipfail benchmark`
    does with the sets its embed call returned) instead of finding the newest sets of `model`."""
    started = db.now()
    if direction not in DIRECTIONS:
        raise UserError(f"--direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}.")
    if topk < 1:
        raise UserError("--topk must be at least 1.")
    if chunk is not None and chunk < 1:
        raise UserError("--chunk must be at least 1.")
    # auto never picks mps for ranking (an explicit --device mps does); a bad --device is a UserError, first
    device = resolve_device(device, auto_mps=False)
    subset = db.get_subset(con, subset_name)
    subset_id, name = int(subset["subset_id"]), str(subset["name"])
    if embedding_set_ids is not None:
        img_set, txt_set = embedding_sets_by_id(con, subset, *embedding_set_ids)
    else:
        img_set, txt_set = find_embedding_sets(con, subset, model, pretrained, checkpoint)
    model_name = str(img_set["model"])
    config = {
        "subset_id": subset_id,
        "direction": direction,
        "topk": int(topk),
        "tie_policy": R.TIE_POLICY,
        "method": METHOD,
        "image_embedding_set_id": int(img_set["embedding_set_id"]),
        "text_embedding_set_id": int(txt_set["embedding_set_id"]),
        "image_sha256": img_set["sha256"],
        "text_sha256": txt_set["sha256"],
    }
    chash = db.config_hash(config)
    existing = con.execute(
        "SELECT retrieval_run_id, run_id FROM retrieval_runs WHERE config_hash = ? ORDER BY 1 LIMIT 1", [chash]
    ).fetchone()
    if existing is not None:
        n = con.execute("SELECT count(*) FROM retrieval_ranks WHERE retrieval_run_id = ?", [existing[0]]).fetchone()[0]
        return EvaluateResult(
            int(existing[0]), int(existing[1]), True, name, model_name, direction, int(n), summary(con, existing[0])
        )

    fix = f"Run: {rebuild_embeddings_command(con, name, [img_set, txt_set])}"
    images = artifacts.load_embedding_set(con, int(img_set["embedding_set_id"]), fix=fix)
    texts = artifacts.load_embedding_set(con, int(txt_set["embedding_set_id"]), fix=fix)
    image_ids, caption_ids = images.item_ids, texts.item_ids
    caption_image = _caption_images(con, subset_id, name, image_ids, caption_ids, fix)
    # text row -> image row
    order = np.argsort(image_ids, kind="stable")
    text_gt_row = order[np.searchsorted(image_ids, caption_image, sorter=order)]

    ranks, k = _rank(direction, images, texts, text_gt_row, topk, chunk, device, progress, name, fix)
    run_config = config | {"device": device, "chunk": chunk, "subset": name}
    with db.transaction(con):
        run_id = db.insert_run(
            con, STAGE, run_config, started, model=model_name, pretrained=_str_or_none(img_set["pretrained"])
        )
        rrid = con.execute(
            """
            INSERT INTO retrieval_runs (subset_id, model, text_embedding_set_id, image_embedding_set_id, direction,
                                        tie_policy, topk, config_hash, created_at, run_id)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            RETURNING retrieval_run_id
            """,
            [
                subset_id,
                model_name,
                config["text_embedding_set_id"],
                config["image_embedding_set_id"],
                direction,
                R.TIE_POLICY,
                k,
                chash,
                db.now(),
                run_id,
            ],
        ).fetchone()[0]
        db.insert_df(con, "retrieval_ranks", ranks.assign(retrieval_run_id=np.int64(rrid)))
        positives.rank_if_imported(con, int(rrid))  # the ranks recall_extended needs, once positives are imported
    return EvaluateResult(int(rrid), run_id, False, name, model_name, direction, len(ranks), summary(con, rrid))


def _str_or_none(v):
    return v if isinstance(v, str) and v else None


def _caption_images(con, subset_id: int, name: str, image_ids: np.ndarray, caption_ids: np.ndarray, fix: str):
    """Each text row's image id, checking that both sets cover exactly the subset's current members."""
    members = con.execute(
        "SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY image_id", [subset_id]
    ).fetchnumpy()["image_id"]
    caps = con.execute(
        "SELECT caption_id, image_id FROM subset_captions WHERE subset_id = ? ORDER BY caption_id", [subset_id]
    ).df()
    stale = (
        len(np.unique(image_ids)) != len(image_ids)
        or len(np.unique(caption_ids)) != len(caption_ids)
        or not np.array_equal(np.sort(image_ids), np.asarray(members, dtype=np.int64))
        or not np.array_equal(np.sort(caption_ids), caps["caption_id"].to_numpy(dtype=np.int64))
    )
    if stale:
        raise UserError(
            f"The cached embeddings do not match the current members of subset {name!r} (was it rebuilt "
            f"with --replace?). {fix}"
        )
    cap_ids = caps["caption_id"].to_numpy(dtype=np.int64)
    return caps["image_id"].to_numpy(dtype=np.int64)[np.searchsorted(cap_ids, caption_ids)]
