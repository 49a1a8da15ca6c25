"""Explain: ask the model why it missed. Each R@1 failure's caption loses one phrase at a time, and is ranked again.

Method (one `explain` call):

1. Failures. ``scope="sample"`` (the default): the captions of the retrieval run's failure sample
   (`failure_samples`, every set: overlap, annotators, backup), labelled or not yet. ``scope="all-failures"``:
   every R@1 failure of the run (`retrieval_ranks.gt_rank > 1`). Captions in caption-id order.
2. Variants. `toolkit.labels.ablation.caption_variants` for the chosen roles (default all five): one variant per
   phrase that `toolkit.labels.phrases` finds. A variant that is empty or the caption again is skipped and
   counted; a caption where the extractor finds no phrase of the chosen roles is counted (``n_no_phrase``).
3. Embeddings. Through improve's prompt cache (`toolkit.improve.stage.cached_prompts`, the `prompts` table and
   the prompt shards keyed by the model identity of the run's text embeddings): a text that improve or an
   earlier explain already encoded with this model is read from its shard, never encoded again; the others are
   encoded once (`improve.stage.model_encoder_factory`, or the ``encoder`` a test passes) and stored as new
   prompt shards (`improve.methods.prompt_ensemble.write_prompt_shard`), which improve reuses in turn. The new
   texts are encoded in chunks of `CHUNK_TEXTS` (sorted text order); every chunk, the last one included, is
   committed as soon as it is encoded, in its own transaction (its prompt shard, its `prompts` rows and a `runs`
   row of stage "explain-prompts"), before any ranking: the cache is a cache, not a result, so a run killed
   while encoding leaves the chunks it finished in the cache, and one killed after encoding (while ranking or
   writing the results) leaves them all; the same call again encodes only what is not there.
4. Ranks. Every variant is ranked against the run's image embeddings with evaluate's own code
   (`toolkit.retrieval.ranking.rank_text_to_image`, top 2), on the device type the retrieval run recorded
   (`improve.stage.scoring_device`): ``gt_rank_after`` = 1 + the number of images scoring strictly higher than
   the ground truth, ``n_tied_after`` = the other images with exactly its score (the retrieval tie policy),
   ``top1_image_id_after`` the best image (ties broken by lower row), ``score_gap_after`` = the ground truth's
   score minus the best other image's score. The "before" columns are the retrieval run's own
   (`retrieval_ranks`: gt_rank, n_tied, gt_score - top1_score).
5. Rows. One `runs` row (stage "explain"), one `explain_runs` row and the `failure_ablations` rows, in one
   transaction (``n_encoded``: the texts this call encoded). The same call
   again (same retrieval run, scope, roles, failures, variant method, role mapping, text embeddings) is a no-op
   that returns the stored run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from toolkit.errors import UserError
from toolkit.labels import ablation
from toolkit.store import db
from toolkit.store.runs import NO_SAMPLE, resolve_retrieval_run

STAGE = "explain"
CACHE_STAGE = "explain-prompts"  # the runs row of a prompt-cache chunk committed before the results
CHUNK_TEXTS = 4096  # new texts encoded, and committed to the prompt cache, at a time
SCOPES = ("sample", "all-failures")
FIX = "Re-run clipfail embed (with --recompute) and clipfail evaluate."


@dataclass
class ExplainResult:
    explain_run_id: int
    run_id: int
    retrieval_run_id: int
    scope: str
    roles: list[str]
    is_reused: bool
    n_failures: int
    n_no_phrase: int
    n_variants: int
    n_skipped_identical: int
    n_skipped_empty: int
    n_encoded: int
    n_cached: int = 0
    variants_by_role: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_roles(value: str | Sequence[str] | None) -> list[str]:
    """The roles to ablate, in `ablation.ROLES` order; all of them for None or an empty value."""
    if value is None:
        return list(ablation.ROLES)
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip().lower() for v in items if str(v).strip()]
    unknown = sorted({v for v in items if v not in ablation.ROLES})
    if unknown:
        raise UserError(f"Unknown role(s) {', '.join(unknown)} for --roles. Known roles: {', '.join(ablation.ROLES)}.")
    return [r for r in ablation.ROLES if r in items] or list(ablation.ROLES)


def _failures(con, rrid: int, scope: str) -> pd.DataFrame:
    if scope == "sample":
        sql = """
            SELECT r.query_id AS caption_id, c.text, r.gt_id, r.gt_rank, r.n_tied, r.gt_score, r.top1_score
            FROM retrieval_ranks r JOIN captions c ON c.caption_id = r.query_id
            WHERE r.retrieval_run_id = ? AND r.gt_rank > 1
              AND r.query_id IN (SELECT caption_id FROM failure_samples WHERE retrieval_run_id = ?)
            ORDER BY r.query_id"""
        df = con.execute(sql, [rrid, rrid]).df()
    else:
        sql = """
            SELECT r.query_id AS caption_id, c.text, r.gt_id, r.gt_rank, r.n_tied, r.gt_score, r.top1_score
            FROM retrieval_ranks r JOIN captions c ON c.caption_id = r.query_id
            WHERE r.retrieval_run_id = ? AND r.gt_rank > 1 ORDER BY r.query_id"""
        df = con.execute(sql, [rrid]).df()
    if df.empty:
        if scope == "sample":
            raise UserError(
                f"Retrieval run {rrid} has no failure sample. Run clipfail sample-failures --run {rrid} first, "
                "or explain every failure with --all-failures."
            )
        raise UserError(f"Retrieval run {rrid} has no R@1 failures (every caption's image is ranked first).")
    return df


def _sha(obj) -> str:
    return hashlib.sha256(db.canonical_json(obj).encode("utf-8")).hexdigest()


def _load_cached(con, cached: pd.DataFrame) -> dict[str, np.ndarray]:
    from toolkit.store.artifacts import load_embedding_set

    vec: dict[str, np.ndarray] = {}
    for set_id, grp in cached.groupby("embedding_set_id"):
        fix = "Re-encode this model's cached prompts with clipfail improve ... --recompute-prompts."
        arr = load_embedding_set(con, int(set_id), fix=fix).array
        for t, r in zip(grp["text"], grp["row_index"]):
            vec[t] = arr[int(r)]
    return vec


def _write_shard(con, identity, cache_dir, texts, new_texts, new_arr, run_id, started) -> None:
    """`new_texts` (encoded as `new_arr`) as a prompt shard of improve's cache; call inside a transaction."""
    from toolkit.improve.methods.prompt_ensemble import PromptMatrix, write_prompt_shard

    shard_run = SimpleNamespace(
        identity=identity,
        io=SimpleNamespace(cache_dir=cache_dir),
        params=SimpleNamespace(recompute_prompts=False),
        stage=STAGE,
    )
    write_prompt_shard(con, shard_run, PromptMatrix(None, {}, texts, list(new_texts), new_arr, [], 0), run_id, started)


def _resolve(con, retrieval_run_id, scope: str):
    """The retrieval run (text-to-image) and its failures in the scope; a UserError for what cannot be explained."""
    if scope not in SCOPES:
        raise UserError(f"Unknown scope {scope!r}; use one of {', '.join(SCOPES)}.")
    if scope == "sample" and retrieval_run_id is None:
        rows = con.execute("SELECT DISTINCT retrieval_run_id FROM failure_samples ORDER BY 1").fetchall()
        if not rows:
            raise UserError(NO_SAMPLE + " Or explain every failure with --all-failures.")
    rr = resolve_retrieval_run(con, retrieval_run_id, need="sample" if scope == "sample" else "ranks", purpose=STAGE)
    if rr["direction"] != "text-to-image":
        raise UserError(f"explain needs a text-to-image retrieval run; run {rr['retrieval_run_id']} is not one.")
    rrid = int(rr["retrieval_run_id"])
    fails = _failures(con, rrid, scope)
    return rr, fails


def _encode(con, text_set, identity, texts, dim: int, chash: str, *, encoder, encoder_factory, cache_dir):
    """Every variant text's vector: improve's prompt cache first, then the encoder for the rest, in chunks whose
    shards are committed one by one, the last included, before anything is ranked (a killed run resumes).
    Returns (text -> vector, the texts encoded now)."""
    from toolkit.improve import stage as S

    cached = S.cached_prompts(con, identity, texts)
    vec = _load_cached(con, cached)
    new_texts = [t for t in texts if t not in vec]
    if new_texts:
        if encoder is None:
            import json

            from toolkit.store import paths as study_paths

            make = encoder_factory or S.model_encoder_factory()
            set_config = study_paths.resolve_keys(con, json.loads(text_set["config_json"] or "{}"), ("checkpoint",))
            encoder = make(dict(identity, config=set_config))
        chunks = [new_texts[i : i + CHUNK_TEXTS] for i in range(0, len(new_texts), CHUNK_TEXTS)]
        for j, chunk in enumerate(chunks):
            chunk_started = db.now()
            arr = np.asarray(encoder(list(chunk)), dtype=np.float32)
            if arr.shape != (len(chunk), dim):
                raise RuntimeError(f"encoder returned shape {arr.shape}, expected {(len(chunk), dim)}")
            vec.update(zip(chunk, arr))
            with db.transaction(con):
                chunk_config = {"stage": CACHE_STAGE, "explain_config_hash": chash, "chunk": j, "model": identity,
                                "texts_sha256": _sha(chunk)}  # fmt: skip
                cache_run = db.insert_run(
                    con, CACHE_STAGE, chunk_config, chunk_started,
                    model=identity["model"], pretrained=identity["pretrained"],
                )  # fmt: skip
                _write_shard(con, identity, cache_dir, texts, chunk, arr, cache_run, chunk_started)
    return vec, new_texts


def _ablation_rows(con, rr, fails, rows, vec, images, mapping, result) -> pd.DataFrame:
    """failure_ablations rows (without explain_run_id): evaluate's ranking of each variant against the run's images."""
    from toolkit.improve import stage as S

    rrid = int(rr["retrieval_run_id"])
    from toolkit.retrieval import ranking as R

    img_row = {int(i): r for r, i in enumerate(images.item_ids)}
    gt_of = dict(zip(fails["caption_id"].astype(int), fails["gt_id"].astype(int)))
    missing = sorted({gt_of[c] for c, _i, _v in rows if gt_of[c] not in img_row})
    if missing:
        raise UserError(f"Retrieval run {rrid}'s image embedding set lacks {len(missing)} of its own images. {FIX}")
    gt_index = np.array([img_row[gt_of[c]] for c, _i, _v in rows], dtype=np.int64)
    Q = np.stack([vec[v.text] for _c, _i, v in rows]).astype(np.float32)
    device, _recorded, note = S.scoring_device(con, rr)
    if note:
        result.notes.append(note.replace("improve re-scored", "explain scored"))
    k = min(2, images.array.shape[0])
    res = R.rank_text_to_image(Q, images.array, gt_index, k=k, device=device)
    top = res.topk_indices
    best_other = np.where(top[:, 0] == gt_index, res.topk_scores[:, min(1, k - 1)], res.topk_scores[:, 0])
    if k == 1:
        best_other = np.where(top[:, 0] == gt_index, np.float32(np.nan), best_other)

    before = fails.set_index(fails["caption_id"].astype(int))
    cids = np.array([c for c, _i, _v in rows], dtype=np.int64)
    b = before.loc[cids]
    return pd.DataFrame(
        {
            "caption_id": cids,
            "variant_index": np.array([i for _c, i, _v in rows], dtype=np.int32),
            "retrieval_run_id": rrid,
            "role": [v.role for _c, _i, v in rows],
            "category": [mapping[v.role] for _c, _i, v in rows],
            "phrase": [v.phrase for _c, _i, v in rows],
            "ablated_text": [v.text for _c, _i, v in rows],
            "gt_image_id": b["gt_id"].to_numpy(np.int64),
            "gt_rank_before": b["gt_rank"].to_numpy(np.int64),
            "n_tied_before": b["n_tied"].to_numpy(np.int64),
            "gt_rank_after": res.gt_rank.astype(np.int64),
            "n_tied_after": res.n_tied.astype(np.int64),
            "top1_image_id_after": np.asarray(images.item_ids, dtype=np.int64)[top[:, 0]],
            "score_gap_before": (b["gt_score"] - b["top1_score"]).to_numpy(np.float32),
            "score_gap_after": (res.gt_score - best_other).astype(np.float32),
        }
    )


def _store(con, rr, config, chash, started, identity, role_list, scope, counts, abl):
    """The runs row, the explain_runs row and failure_ablations, in one transaction.
    `counts`: failures, without a phrase, variants, skipped identical, skipped empty, encoded."""
    rrid = int(rr["retrieval_run_id"])
    n_failures, n_no_phrase, n_variants, n_identical, n_empty, n_encoded = counts
    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, config, started, model=identity["model"], pretrained=identity["pretrained"])
        erid = int(
            con.execute(
                """
                INSERT INTO explain_runs (retrieval_run_id, scope, roles, n_failures, n_no_phrase, n_variants,
                    n_skipped_identical, n_skipped_empty, n_encoded, config_hash, created_at, run_id)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING explain_run_id
                """,
                [rrid, scope, ",".join(role_list), n_failures, n_no_phrase, n_variants, n_identical, n_empty,
                 n_encoded, chash, db.now(), run_id],
            ).fetchall()[0][0]
        )  # fmt: skip
        abl.insert(0, "explain_run_id", erid)
        db.insert_df(con, "failure_ablations", abl)
    return erid, run_id


def explain(
    con,
    retrieval_run_id: int | None = None,
    *,
    scope: str = "sample",
    roles: str | Sequence[str] | None = None,
    encoder: Callable[[list[str]], np.ndarray] | None = None,
    encoder_factory: Callable[[dict], Callable] | None = None,
    cache_dir: str | Path | None = None,
) -> ExplainResult:
    """Rank every variant of every failure of the scope again; see the module docstring."""
    from toolkit.improve import stage as S

    started = db.now()
    role_list = parse_roles(roles)
    rr, fails = _resolve(con, retrieval_run_id, scope)
    rrid = int(rr["retrieval_run_id"])
    mapping = ablation.role_categories()

    made = [ablation.caption_variants(t, role_list) for t in fails["text"]]
    text_set = con.execute(
        "SELECT * FROM embedding_sets WHERE embedding_set_id = ?", [int(rr["text_embedding_set_id"])]
    ).df().iloc[0].to_dict()  # fmt: skip
    identity = S.model_identity(text_set)
    config = {
        "stage": STAGE,
        "retrieval_run_id": rrid,
        "scope": scope,
        "roles": role_list,
        "variants": ablation.VERSION,
        "role_categories": mapping,
        "failures_sha256": _sha([int(c) for c in fails["caption_id"]]),
        "text_embeddings_sha256": str(text_set["sha256"]),
        "model": identity,
    }
    chash = db.config_hash(config)
    n_identical = sum(m.n_identical for m in made)
    n_empty = sum(m.n_empty for m in made)
    n_no_phrase = sum(1 for m in made if not any(m.n_found.values()))
    done = con.execute(
        "SELECT explain_run_id, run_id, n_encoded FROM explain_runs WHERE config_hash = ? "
        "ORDER BY explain_run_id DESC LIMIT 1",
        [chash],
    ).fetchall()
    rows = [
        (int(cid), i, v)
        for cid, m in zip(fails["caption_id"], made)
        for i, v in enumerate(m.variants)  # noqa: B007
    ]
    by_role = {r: sum(1 for _c, _i, v in rows if v.role == r) for r in role_list}
    result = ExplainResult(
        explain_run_id=0, run_id=0, retrieval_run_id=rrid, scope=scope, roles=role_list, is_reused=False,
        n_failures=len(fails), n_no_phrase=n_no_phrase, n_variants=len(rows), n_skipped_identical=n_identical,
        n_skipped_empty=n_empty, n_encoded=0, variants_by_role=by_role,
    )  # fmt: skip
    if done:
        result.explain_run_id, result.run_id = int(done[0][0]), int(done[0][1])
        result.is_reused = True
        return result
    if not rows:
        raise UserError(
            f"The phrase extractor finds no phrase of the roles {', '.join(role_list)} in any of the {len(fails)} "
            f"failure captions of retrieval run {rrid} in scope {scope} (variants skipped: {n_identical} identical "
            f"to the caption, {n_empty} empty). Nothing was written."
        )

    texts = sorted({v.text for _c, _i, v in rows})
    from toolkit.store.artifacts import load_embedding_set

    images = load_embedding_set(con, int(rr["image_embedding_set_id"]), fix=FIX)
    vec, new_texts = _encode(con, text_set, identity, texts, images.array.shape[1], chash,
                                   encoder=encoder, encoder_factory=encoder_factory, cache_dir=cache_dir)  # fmt: skip
    result.n_encoded, result.n_cached = len(new_texts), len(texts) - len(new_texts)
    abl = _ablation_rows(con, rr, fails, rows, vec, images, mapping, result)
    counts = [len(fails), n_no_phrase, len(rows), n_identical, n_empty, len(new_texts)]
    result.explain_run_id, result.run_id = _store(con, rr, config, chash, started, identity, role_list, scope, counts,
                                                  abl)  # fmt: skip
    return result
