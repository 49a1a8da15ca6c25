"""Improve: category-aware prompt ensembling with max/mean/logsumexp pooling, stored as runs.

Method (one `improve` invocation, `improve()` below):

1. Subset. The labelled failures of a text-to-image retrieval run (view `sample_labels`) whose
   category is one of the chosen categories; the overlap set is left out unless
   ``include_overlap`` (then its majority label counts). Candidates are ordered by the failure
   sample's draw order; when there are more than ``max_subset``, ``numpy.random.default_rng(seed)
   .choice(n, max_subset, replace=False)`` picks which, kept in draw order.
2. Prompts. Every caption is expanded with the templates of a set (`toolkit.improve.templates`): in
   ``own`` mode the list of its own category, in ``union`` mode the chosen categories' lists one
   after the other (taxonomy order, each in position order; a template text that several
   categories share is kept at its first place). `toolkit.labels.phrases.build_prompts` makes the
   caption's prompts: the caption itself once, then, in list order, each template that applies
   (all its slots found) and gives a text that differs from the caption and from the prompts
   already taken, until ``k`` prompts (``--k``, per category; 10 as in the reference study). A
   template that does not apply is skipped and the next one takes its place; a caption for which
   fewer than ``k`` apply keeps what it has. Each caption's effective K (``n_prompts``) and number
   of distinct texts are stored in `improvement_ranks`, the K asked for in `improvement_runs`
   (``k_prompts``), and view `improvement_effective_k` gives the distribution per run. A ``k``
   above the length of a list it would be cut from is refused, and so is a set that gives no
   caption of the subset a single prompt besides the caption (for ``k`` >= 2), before anything is
   encoded.
3. Embeddings. A prompt whose text is exactly its caption takes the caption's row of the retrieval
   run's text embedding set (the same model's embedding of the same text, so the identity template
   reproduces the baseline exactly). Every other prompt comes from the prompt-embedding cache,
   keyed by (model identity = model, pretrained, checkpoint sha256, precision; prompt text):
   `prompts` holds the texts, and each shard of new embeddings is an `embedding_sets` row of kind
   'prompt' (a checksummed .npy) whose `embedding_rows.item_id` are prompt ids. Only prompts not in
   the cache are encoded, through `toolkit.embed.encode.encode_texts` (the embed stage's fast path), so a
   re-run with another pooling or tau encodes nothing, and `pooling="all"` encodes once for all
   three.
4. Scores and ranks. Each prompt is scored against every image embedding of the retrieval run with
   `toolkit.retrieval.ranking.score_rows` (the very GEMM blocks that evaluate ranked with), on the device
   type the retrieval run recorded (``device`` in its config): another BLAS or GPU may round a
   score differently in the last bit. When that device is not available here, the scores are made
   on the CPU and the improve run's config says so (``score_device``, ``score_device_note``): its
   baseline and identity prompts then agree with the retrieval run within float32 rounding
   (~1e-7), not bit for bit. The K scores per image are pooled (`toolkit.improve.pooling`: max, mean, or
   tau * log-mean-exp), and the GT image's rank is 1 + the number of images with a strictly
   higher pooled score (retrieval's optimistic tie policy), with the number of other images that
   tie with it exactly (``improved_n_tied``; `pooling.gt_rank_counts`, the same count as
   `retrieval_ranks.n_tied`), so rank + n_tied is the pessimistic rank. The baseline rank is the
   retrieval run's own `gt_rank`, its ties that run's `n_tied` (``baseline_n_tied``). A pooled or
   transformed score that is not finite is refused, and nothing is written.
   Mean pooling ranks exactly as CLIP's embedding-average prompt ensemble (mean of the K
   normalised prompt embeddings, re-normalised, dotted with the image embeddings): see
   `toolkit.improve.pooling` and `tests/test_improve_core.py`.
5. Statistics (`toolkit.stats`), stored per improvement run and per category, for K in 1, 5, 10:
   a paired bootstrap 95% interval of the delta (10,000 resamples, seeded with ``seed``) and the
   exact McNemar p-value of the paired hit/miss outcomes, with the counts of fixed and broken
   captions; once on the optimistic hits (rank <= K) and once on the pessimistic hits
   (rank + n_tied <= K, baseline and improved alike: the ``*_pessimistic`` columns). No method gains
   from ties: a run whose two counts differ by more than 0.01 pp (view `improvement_ties`) is
   flagged, and the views headline its pessimistic figures (see `improvement_recall`).
6. Controls. A gain measured on R@1 failures only is biased upward (their baseline R@1 is 0, so
   R@1 can only improve). ``control=("successes", N)`` also runs the configuration on N R@1
   successes of the same retrieval run (drawn with ``default_rng(seed)`` from the caption-id-sorted
   successes), ``control=("all", None)`` on every caption of the run. Control captions have no
   failure label, so they use the union of the chosen categories' templates (the same templates as
   ``own`` when one category is chosen); their rows carry the caption's label when it has one.

Each (population, pooling) is one `improvement_runs` row with its `improvement_ranks` and
`improvement_stats`; all of an invocation's rows, new prompts and prompt shards are written in
one transaction under one `runs` row. A (population, pooling) whose full configuration (retrieval
run, categories, subset, prompts, K, model, scoring device, pooling, tau, seed, ...) was already run
is reused, not recomputed; when all were, the call is a no-op. A run stored before tie counts were
recorded (its improvement_ranks.improved_n_tied is NULL) is not reused: the configuration runs again
as a new run, with its ties counted (the old run stays, its pessimistic figures unknown).
``recompute_prompts`` drops this model's cached prompt embeddings (every prompt shard of its identity)
and encodes their texts and this call's prompts again, in the same transaction (the fix for a damaged
or missing shard file).

Methods (issue 17). ``method`` is "templates" (the above, the default); "inverted-softmax", "qb-norm"
or "query-expansion" (`improve_method` below: the same populations, statistics and tables,
with the method's ranks); or "templates+inverted-softmax" / "templates+qb-norm": the templates'
pooled scores are normalised with the method's normaliser (`toolkit.improve.transforms.pooled_transform`),
its queries (every caption of the run, or the bank) scored as captions. `improvement_runs.method`
and ``method_params`` record which; a plain templates run's configuration is unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit import stats
from toolkit.errors import UserError
from toolkit.improve import pooling, templates
from toolkit.labels import phrases
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store.runs import resolve_retrieval_run

STAGE = "improve"
METHOD = "prompt-ensemble/v2"  # v2: distinct prompts, K chosen (v1 kept copies of the caption)
POPULATIONS = ("failures", "successes", "all")
# --method: prompt ensembling, the hubness fixes and query expansion (toolkit.improve.transforms), and the combinations
METHODS = (
    "templates", "inverted-softmax", "qb-norm", "query-expansion", "templates+inverted-softmax", "templates+qb-norm",
)  # fmt: skip
RECALL_KS = (1, 5, 10)
DEFAULT_K = 10  # prompts per caption, the reference study's K
SEED_MAX = 2**32 - 1
SCORE_BUDGET = 8_000_000  # score elements (c captions x K prompts x M images) held at once

Encoder = Callable[[list[str]], np.ndarray]


@dataclass
class ImproveResult:
    run_id: int | None  # the runs row written (None when nothing new was written)
    retrieval_run_id: int
    improvement_ids: list[int]  # every improvement run of this call, new and reused, in order
    reused_ids: list[int]
    populations: dict[str, int]  # population -> number of captions
    k_per_category: dict[str, dict[str, int]]  # population -> {category: K}
    n_prompts: int = 0  # distinct prompt texts (not counting identity prompts)
    n_encoded: int = 0  # of which encoded now (the rest came from the cache)
    n_identity: int = 0  # prompts that are their caption (baseline embedding reused)
    notes: list[str] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return self.run_id is None


# ------------------------------------------------------------------------------ option parsing


def parse_poolings(value: str | Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            p = part.strip().lower()
            if not p:
                continue
            if p == "all":
                out.extend(pooling.POOLINGS)
            elif p in pooling.POOLINGS:
                out.append(p)
            else:
                raise UserError(f"Unknown pooling {part.strip()!r}; use max, mean, logsumexp or all.")
    out = list(dict.fromkeys(out))
    if not out:
        raise UserError("Give at least one pooling: max, mean, logsumexp or all.")
    return out


def parse_control(value: str | None) -> tuple[str, int | None] | None:
    """'successes:N' -> ('successes', N); 'all' -> ('all', None); None/'' /'none' -> None."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    v = str(value).strip().lower()
    if v == "all":
        return ("all", None)
    if v.startswith("successes:"):
        try:
            n = int(v.split(":", 1)[1])
        except ValueError:
            n = -1
        if n < 1:
            raise UserError(f"--control {value!r}: N must be a whole number >= 1, as in successes:100.")
        return ("successes", n)
    raise UserError(f"--control {value!r} is not understood; use successes:N or all.")


def parse_categories(con, value: str | Sequence[str]) -> list[str]:
    """Category names (aliases and case allowed), in taxonomy order, without duplicates."""
    from toolkit.labels.taxonomy import Taxonomy, normalise_label

    items = [value] if isinstance(value, str) else list(value)
    raw = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not raw:
        raise UserError("Give at least one category, e.g. --categories Object or --categories Object,Attribute.")
    tax = Taxonomy.load(con)
    found, unknown = [], []
    for r in raw:
        cat = tax._find(normalise_label(r))
        if cat is None:
            unknown.append(r)
        else:
            found.append(cat)
    if unknown:
        raise UserError(f"Unknown categories: {', '.join(unknown)}. Known: {', '.join(tax.names)}.")
    order = {n: i for i, n in enumerate(tax.names)}
    return sorted(dict.fromkeys(found), key=lambda c: order[c])


# ------------------------------------------------------------------------------ inputs


def select_failures(
    con, retrieval_run_id: int, categories: list[str], max_subset: int | None, seed: int, include_overlap: bool
) -> pd.DataFrame:
    """caption_id, sample_id, category of the chosen labelled failures (see the module doc, step 1)."""
    df = con.execute(
        """
        SELECT caption_id, sample_id, category, is_overlap, draw_order
        FROM sample_labels
        WHERE retrieval_run_id = ? AND list_contains(?, category) AND (? OR NOT is_overlap)
        ORDER BY draw_order
        """,
        [retrieval_run_id, categories, bool(include_overlap)],
    ).df()
    if df.empty:
        have = con.execute(
            "SELECT category, count(*) FILTER (WHERE NOT is_overlap), count(*) FILTER (WHERE is_overlap) "
            "FROM sample_labels WHERE retrieval_run_id = ? GROUP BY 1 ORDER BY 1",
            [retrieval_run_id],
        ).fetchall()
        listing = ", ".join(f"{c}: {a} (+{b} overlap)" for c, a, b in have) or "none"
        raise UserError(
            f"Retrieval run {retrieval_run_id} has no labelled failures in {', '.join(categories)}"
            f"{'' if include_overlap else ' outside the overlap set'}. Labelled: {listing}."
        )
    if max_subset is not None and len(df) > max_subset:
        pick = np.sort(np.random.default_rng(seed).choice(len(df), size=max_subset, replace=False))
        df = df.iloc[pick]
    return df[["caption_id", "sample_id", "category"]].reset_index(drop=True)


def select_control(con, retrieval_run_id: int, control: tuple[str, int | None], seed: int) -> pd.DataFrame:
    kind, n = control
    where = "AND r.gt_rank = 1" if kind == "successes" else ""
    df = con.execute(
        f"""
        SELECT r.query_id AS caption_id, l.sample_id, l.category
        FROM retrieval_ranks r
        LEFT JOIN sample_labels l ON l.retrieval_run_id = r.retrieval_run_id AND l.caption_id = r.query_id
        WHERE r.retrieval_run_id = ? {where}
        ORDER BY r.query_id
        """,
        [retrieval_run_id],
    ).df()
    if kind == "successes":
        if n > len(df):
            raise UserError(
                f"--control successes:{n} asks for more than the {len(df)} R@1 successes of retrieval run "
                f"{retrieval_run_id}."
            )
        pick = np.sort(np.random.default_rng(seed).choice(len(df), size=n, replace=False))
        df = df.iloc[pick]
    return df.reset_index(drop=True)


def template_lists(
    tdf: pd.DataFrame, categories: list[str], mode: str, k: int | None = None
) -> tuple[dict[str, list[str]], list[str]]:
    """({category: template list} for `mode`, the union list: the categories' lists one after the other,
    each template text at its first place). With `k`, a K above a list it would be cut from is refused."""
    tset = tdf["template_set"].iloc[0]
    per_cat = {c: list(tdf.loc[tdf["category"] == c].sort_values("position")["template"]) for c in categories}
    missing = [c for c, ts in per_cat.items() if not ts]
    if missing:
        have = sorted(set(tdf["category"]))
        raise UserError(
            f"Template set {tset!r} has no templates for {', '.join(missing)} "
            f"(it has {', '.join(have)}). Import some with clipfail templates import FILE."
        )
    union = list(dict.fromkeys(t for c in categories for t in per_cat[c]))
    if mode not in ("own", "union"):
        raise UserError(f"Unknown template mode {mode!r}; use own or union.")
    if k is not None:
        sizes = ", ".join(f"{c} {len(per_cat[c])}" for c in categories)
        if mode == "own" and any(k > len(ts) for ts in per_cat.values()):
            raise UserError(
                f"--k {k} is more than the templates of a category in set {tset!r} (templates per category: "
                f"{sizes}). Give --k {min(len(ts) for ts in per_cat.values())} or less, or a set with more templates."
            )
        if mode == "union" and k > len(union):
            raise UserError(
                f"--k {k} is more than the {len(union)} distinct templates of {', '.join(categories)} together in "
                f"set {tset!r} (per category: {sizes}). Give --k {len(union)} or less."
            )
    if mode == "union":
        per_cat = {c: union for c in categories}
    return per_cat, union


def scoring_device(con, rr: dict) -> tuple[str, str | None, str | None]:
    """(device to re-score on, device the retrieval run recorded, a note when they differ in type).

    The retrieval run's `runs.config_json` holds the device evaluate ranked on. The same device type
    is used when this machine has it (the same GEMM there gives the same scores, bit for bit);
    otherwise the CPU, with a note that scores then agree only within float32 rounding.
    """
    import torch

    rrid = int(rr["retrieval_run_id"])
    row = con.execute("SELECT config_json FROM runs WHERE run_id = ?", [int(rr["run_id"])]).fetchall()
    try:
        recorded = json.loads(row[0][0]).get("device") if row else None
    except (TypeError, ValueError):
        recorded = None
    tolerance = (
        "so its scores may differ from the retrieval run's in the last bit (~1e-7): the baseline and identity "
        "prompts agree with it within that tolerance, not bit for bit, and images scoring that close could swap."
    )
    if not recorded:
        return "cpu", None, f"Retrieval run {rrid} did not record its device; improve re-scored on the cpu, {tolerance}"
    try:
        dev = torch.device(str(recorded))
    except (RuntimeError, ValueError):
        dev = None
    if dev is not None and dev.type == "cpu":
        return "cpu", str(recorded), None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        ok = dev.index is not None and dev.index < torch.cuda.device_count()
        return (f"cuda:{dev.index}" if ok else "cuda"), str(recorded), None
    mps = getattr(torch.backends, "mps", None)
    if dev is not None and dev.type == "mps" and mps is not None and mps.is_available():
        return "mps", str(recorded), None
    return (
        "cpu",
        str(recorded),
        f"Retrieval run {rrid} ranked on {recorded}, which this machine does not have; improve re-scored on the "
        f"cpu, {tolerance}",
    )


def database_path(con) -> str:
    """The path of the connection's database file, as DuckDB reports it."""
    rows = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return str(rows[0][0]) if rows and rows[0][0] else "clipfail.duckdb"


#: category -> the captions its coverage target is about (besides all captions): `phrases.mentions` key
COVERAGE_FOCUS = {"Attribute": "attribute", "Count": "number", "Spatial": "relation"}


def prompt_coverage(
    captions: Sequence[str], tdf: pd.DataFrame, k: int = DEFAULT_K, mode: str = "own", categories=None
) -> pd.DataFrame:
    """Per category of a template set: how many captions reach k distinct prompts.

    One row per (category, captions): ``captions`` is 'all', or for Attribute/Count/Spatial also the
    captions that mention an attribute/number/relation (`phrases.mentions`). Columns: n, n_at_k,
    pct_at_k (share reaching k, in %), mean_k (mean effective K), mean_slot_prompts (mean number of
    prompts from templates that use a phrase slot, i.e. not only the caption). In ``union`` mode the
    categories' lists are joined as improve joins them.
    """
    cats = list(categories) if categories is not None else list(dict.fromkeys(tdf["category"]))
    per_cat, _union = template_lists(tdf, cats, mode, k)
    slots = {c: phrases.extract(c) for c in captions}
    focus = {c: phrases.mentions(c) for c in captions}
    rows = []
    for cat in cats:
        tl = per_cat[cat]
        by_template = {}
        for t in tl:
            by_template.setdefault(t, bool(phrases.template_slots(t) - phrases.CAPTION_FIELDS))
        made = {c: phrases.build_prompts(c, tl, k, slots[c]) for c in captions}
        n_slot = {}
        for c, prs in made.items():
            # which template made each prompt: refill in order (the same rule, so the same texts)
            got = {phrases.try_fill(t, c, slots[c]): by_template[t] for t in reversed(tl)}
            n_slot[c] = sum(bool(got.get(p)) for p in prs[1:])
        groups = [("all", list(captions))]
        if cat in COVERAGE_FOCUS:
            key = COVERAGE_FOCUS[cat]
            groups.append(
                (f"mention {'an' if key == 'attribute' else 'a'} {key}", [c for c in captions if focus[c][key]])
            )
        for label, group in groups:
            ks = np.array([len(made[c]) for c in group])
            rows.append(
                {
                    "category": cat,
                    "captions": label,
                    "n": len(group),
                    "n_at_k": int((ks >= k).sum()),
                    "pct_at_k": round(100 * float((ks >= k).mean()), 1) if len(group) else float("nan"),
                    "mean_k": round(float(ks.mean()), 2) if len(group) else float("nan"),
                    "mean_slot_prompts": round(float(np.mean([n_slot[c] for c in group])), 2)
                    if group
                    else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ prompt cache


def model_identity(text_set: dict) -> dict:
    """What makes two embeddings of the same text interchangeable: the prompt cache's model key."""

    def clean(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)

    return {k: clean(text_set[k]) for k in ("model", "pretrained", "checkpoint_sha256", "precision")}


def cached_prompts(con, identity: dict, texts: list[str]) -> pd.DataFrame:
    """text, prompt_id, embedding_set_id, row_index of the cached embeddings of `texts` (one row each)."""
    if not texts:
        return pd.DataFrame(columns=["text", "prompt_id", "embedding_set_id", "row_index"])
    wanted = pd.DataFrame({"text": texts})
    con.register("_improve_wanted", wanted)
    try:
        return con.execute(
            """
            SELECT p.text, p.prompt_id, min(es.embedding_set_id) AS embedding_set_id,
                   arg_min(er.row_index, es.embedding_set_id) AS row_index
            FROM _improve_wanted w
            JOIN prompts p ON p.text = w.text
            JOIN embedding_rows er ON er.item_id = p.prompt_id
            JOIN embedding_sets es ON es.embedding_set_id = er.embedding_set_id
            WHERE es.kind = 'prompt' AND es.model = ? AND es.precision = ?
              AND es.pretrained IS NOT DISTINCT FROM ? AND es.checkpoint_sha256 IS NOT DISTINCT FROM ?
            GROUP BY p.text, p.prompt_id
            """,
            [identity["model"], identity["precision"], identity["pretrained"], identity["checkpoint_sha256"]],
        ).df()
    finally:
        con.unregister("_improve_wanted")


def prompt_shards(con, identity: dict) -> list[int]:
    """embedding_set_id of every prompt shard of this model identity."""
    return [
        int(r[0])
        for r in con.execute(
            """
            SELECT embedding_set_id FROM embedding_sets
            WHERE kind = 'prompt' AND model = ? AND precision = ?
              AND pretrained IS NOT DISTINCT FROM ? AND checkpoint_sha256 IS NOT DISTINCT FROM ?
            ORDER BY 1
            """,
            [identity["model"], identity["precision"], identity["pretrained"], identity["checkpoint_sha256"]],
        ).fetchall()
    ]


def recompute_command(
    con, cats, retrieval_run_id, pools, tau, template_set, template_mode, k, max_subset, seed, include_overlap, ctl
) -> str:
    """The improve command line of this call with --recompute-prompts (what a damaged prompt shard needs)."""
    import shlex

    parts = [
        "clipfail",
        "--db",
        database_path(con),
        "improve",
        "--categories",
        ",".join(cats),
        "--run",
        str(retrieval_run_id),
    ]
    parts += ["--pooling", ",".join(pools)] + (["--tau", f"{tau:g}"] if "logsumexp" in pools else [])
    parts += ["--template-set", template_set, "--template-mode", template_mode, "--k", str(k), "--seed", str(seed)]
    parts += ["--max-subset", str(max_subset)] if max_subset is not None else []
    parts += ["--include-overlap"] if include_overlap else []
    if ctl is not None:
        parts += ["--control", "all" if ctl[0] == "all" else f"successes:{ctl[1]}"]
    return " ".join(shlex.quote(p) for p in parts + ["--recompute-prompts"])


def default_cache_dir(con) -> Path:
    """`<database folder>/<database stem>_cache/prompts` (beside the database file)."""
    rows = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    row = rows[0] if rows else None
    dbfile = Path(row[0]) if row and row[0] else Path("clipfail.duckdb")
    return dbfile.resolve().parent / f"{dbfile.stem}_cache" / "prompts"


# ------------------------------------------------------------------------------ scoring


@dataclass
class _Population:
    name: str
    captions: pd.DataFrame  # caption_id, sample_id, category, text, gt_index, baseline_rank, text_row
    templates: list[list[str]]  # per caption
    k_per_category: dict[str, int]
    prompts: list[list[str]] = field(default_factory=list)  # per caption, filled


def _rank_population(
    pop: _Population, prompt_index, P: np.ndarray, Gt, poolings, tau, device: str = "cpu", post=None
) -> dict[str, pd.DataFrame]:
    """Improved rank and GT score per caption, for each pooling (scores made on `device`); `post`, if given,
    transforms each block of pooled scores before ranking (a templates combination, `hubness.pooled_transform`)."""
    from toolkit.retrieval import ranking as retrieval  # imports torch; only needed once there is something to score

    caps = pop.captions
    M = Gt.shape[1]
    n = len(caps)
    out = {p: (np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, np.int64)) for p in poolings}
    # group captions with the same K so that the (c, K, M) blocks are rectangular
    ks = np.array([len(p) for p in pop.prompts])
    n_distinct = np.array([len({phrases.prompt_key(t) for t in p}) for p in pop.prompts])
    for K in np.unique(ks):
        members = np.flatnonzero(ks == K)
        step = max(1, SCORE_BUDGET // (int(K) * M))
        for s in range(0, len(members), step):
            rows = members[s : s + step]
            idx = np.array([prompt_index[i] for i in rows], dtype=np.int64)  # (c, K) rows of P
            S = retrieval.score_rows(P[idx.reshape(-1)], Gt.T, device=device).reshape(len(rows), int(K), M)
            gt = caps["gt_index"].to_numpy()[rows]
            for p in poolings:
                pooled = pooling.pool_scores(S, p, tau=tau)
                if post is not None:
                    pooled = post(pooled)
                out[p][0][rows], out[p][2][rows] = pooling.gt_rank_counts(pooled, gt)  # refuses NaN / inf
                out[p][1][rows] = pooled[np.arange(len(rows)), gt]
    return {
        p: pd.DataFrame(
            {
                "caption_id": caps["caption_id"].to_numpy(np.int64),
                "sample_id": caps["sample_id"].astype("Int64"),
                "category": caps["category"].astype(object).where(caps["category"].notna(), None),
                "n_prompts": ks.astype(np.int32),
                "n_distinct_prompts": n_distinct.astype(np.int32),
                "baseline_rank": caps["baseline_rank"].to_numpy(np.int64),
                "improved_rank": r,
                "improved_score": sc,
                "baseline_n_tied": caps["baseline_n_tied"].to_numpy(np.int64),
                "improved_n_tied": tied,
            }
        )
        for p, (r, sc, tied) in out.items()
    }


def _paired_stats(b: np.ndarray, a: np.ndarray, n_resamples: int, seed: int) -> dict:
    lo, hi = stats.paired_bootstrap_ci(b, a, n_resamples=n_resamples, seed=seed)
    return {
        "baseline_hits": int(b.sum()),
        "improved_hits": int(a.sum()),
        "n_fixed": int((~b & a).sum()),
        "n_broken": int((b & ~a).sum()),
        "ci_low_pp": 100 * lo,
        "ci_high_pp": 100 * hi,
        "mcnemar_p": stats.mcnemar_exact(b, a),
    }


def compute_stats(ranks: pd.DataFrame, seed: int, n_resamples: int = stats.BOOTSTRAP_RESAMPLES) -> pd.DataFrame:
    """improvement_stats rows (without improvement_id) for the whole run ('*') and each category: the paired
    statistics of the optimistic hits (rank <= K), and, when `ranks` has the tie counts (baseline_n_tied,
    improved_n_tied), the same statistics of the pessimistic hits (rank + n_tied <= K, both sides) in the
    ``*_pessimistic`` columns (the same seed, so equal hits give equal intervals)."""
    rows = []
    groups = [("*", ranks)] + [(c, g) for c, g in ranks.groupby("category", sort=True)]
    has_ties = {"baseline_n_tied", "improved_n_tied"} <= set(ranks.columns)
    for cat, g in groups:
        base_r = g["baseline_rank"].to_numpy()
        new_r = g["improved_rank"].to_numpy()
        if has_ties:
            base_p = base_r + g["baseline_n_tied"].to_numpy()
            new_p = new_r + g["improved_n_tied"].to_numpy()
        for k in RECALL_KS:
            row = {"category": cat, "k": k, "n": len(g)}
            row |= _paired_stats(base_r <= k, new_r <= k, n_resamples, seed)
            row |= {"ci_level": 0.95, "bootstrap_resamples": n_resamples, "bootstrap_seed": seed}
            if has_ties:
                pess = _paired_stats(base_p <= k, new_p <= k, n_resamples, seed)
                row |= {f"{name}_pessimistic": v for name, v in pess.items()}
            rows.append(row)
    return pd.DataFrame(rows)


def reusable_runs(con, config_hashes: Sequence[str]) -> tuple[dict[str, int], list[int]]:
    """({config_hash: improvement_id} of the stored runs of these configurations that are reused, [ids of
    runs of them stored before tie counts were recorded]): those are not reused (see the module docstring)."""
    rows = con.execute(
        """
        SELECT u.config_hash, u.improvement_id,
               NOT EXISTS (SELECT 1 FROM improvement_ranks r
                           WHERE r.improvement_id = u.improvement_id
                             AND (r.improved_n_tied IS NULL OR r.baseline_n_tied IS NULL)) AS is_tie_recorded
        FROM improvement_runs u WHERE list_contains(?, u.config_hash) ORDER BY u.improvement_id
        """,
        [list(config_hashes)],
    ).fetchall()
    return {h: int(i) for h, i, ok in rows if ok}, [int(i) for h, i, ok in rows if not ok]


def untied_notes(ids: Sequence[int]) -> list[str]:
    if not ids:
        return []
    runs = ", ".join(map(str, ids))
    return [
        f"Improvement run(s) {runs} had this configuration but were made before tie counts were recorded, so their "
        "pessimistic figures are unknown: it runs again as a new run that records them (the old runs stay)."
    ]


def non_finite_error(exc: pooling.NonFiniteScores, method: str, params: str | None, pools=None, tau=None):
    """The UserError for scores that are NaN or infinite (`pooling.NonFiniteScores`)."""
    what = f"--method {method}" + (f" ({params})" if params else "")
    if pools is not None:
        what += f", pooling {', '.join(pools)}" + (f" (tau {tau:g})" if "logsumexp" in pools else "")
    return UserError(
        f"{what} gave scores that are not finite numbers (NaN or infinite) for {exc.n_rows} caption(s), "
        f"{exc.n_values} score(s) in all: the transform overflowed or underflowed with these parameters (or an "
        "embedding is damaged). Nothing was written. Give parameters within the ranges clipfail improve --help shows."
    )


# ------------------------------------------------------------------------------ the stage, section by section


@dataclass
class _Settings:
    """One invocation's checked settings (what its sections share)."""

    rr: dict  # the retrieval_runs row
    categories: list[str]
    poolings: list[str]
    tau: float
    template_set: str
    templates_sha256: str
    template_mode: str
    k: int
    max_subset: int | None
    seed: int
    include_overlap: bool
    control: tuple[str, int | None] | None
    text_set: dict | None = None  # the retrieval run's text embedding set (read after section 1, as before)
    method: str = "templates"  # or a templates combination, "templates+qb-norm" (issue 17)
    method_params: str | None = None  # its parameters as improvement_runs.method_params
    bank: dict | None = None  # improvement_runs bank columns (bank_subset, n_bank, is_bank_overlap)
    identity: dict | None = None  # its model_identity: the prompt cache's key

    @property
    def rrid(self) -> int:
        return int(self.rr["retrieval_run_id"])


@dataclass
class _Unit:
    """One (population, pooling): one improvement_runs row, new or reused."""

    pop: _Population
    pooling: str
    config: dict
    config_hash: str


@dataclass
class _PromptMatrix:
    """Every prompt embedding the scoring needs (section 3's result)."""

    P: np.ndarray  # the caption text rows first, then the other prompts
    pos_text: dict[int, int]  # text embedding row -> row of P
    pos_other: dict[str, int]  # prompt text (not a caption) -> row of P
    images: np.ndarray  # the retrieval run's image embeddings
    other: list[str]  # the distinct prompt texts that are not their caption
    new_texts: list[str]  # of which encoded now
    new_arr: np.ndarray | None  # their embeddings, in new_texts order
    drop_ids: list[int]  # prompt shards of this model that --recompute-prompts replaces


def check_options(poolings, tau, max_subset, seed, k, control) -> tuple:
    """The option values checked and normalised: (poolings, tau, max_subset, seed, k, control)."""
    pools = parse_poolings(poolings)
    lo, hi = pooling.TAU_RANGE
    try:
        tau_ok = not isinstance(tau, bool) and bool(np.isfinite(float(tau))) and lo <= float(tau) <= hi
    except (TypeError, ValueError, OverflowError):
        tau_ok = False
    if not tau_ok:
        raise UserError(
            f"--tau must be a number from {lo:g} to {hi:g} (got {tau}): the logsumexp temperature; near 0 it pools "
            "as max, at large values as mean, and beyond the range the pooled scores under- or overflow."
        )
    tau = float(tau)
    if max_subset is not None and int(max_subset) < 1:
        raise UserError("--max-subset must be at least 1.")
    max_subset = None if max_subset is None else int(max_subset)
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be a whole number from 0 to {SEED_MAX} (got {seed}).")
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise UserError(f"--k must be a whole number of at least 1 (got {k}): prompts per caption, itself included.")
    k = int(k)
    ctl = parse_control(control) if not isinstance(control, tuple) else control
    return pools, tau, max_subset, seed, k, ctl


def select_populations(con, s: _Settings, per_cat: dict[str, list[str]], union: list[str]) -> list[_Population]:
    """Section 1: the failure subset (and the control population, if any) with their baseline ranks, texts
    and template lists: a failure uses its category's list (per `per_cat`), a control caption the union."""
    rrid = s.rrid
    frames = [("failures", select_failures(con, rrid, s.categories, s.max_subset, s.seed, s.include_overlap))]
    if s.control is not None:
        frames.append((s.control[0], select_control(con, rrid, s.control, s.seed)))
    base = con.execute(
        """
        SELECT r.query_id AS caption_id, r.gt_rank AS baseline_rank, r.n_tied AS baseline_n_tied, r.gt_id AS image_id,
               c.text
        FROM retrieval_ranks r JOIN captions c ON c.caption_id = r.query_id
        WHERE r.retrieval_run_id = ?
        """,
        [rrid],
    ).df()
    base = base.set_index("caption_id")
    pops: list[_Population] = []
    for name, df in frames:
        df = df.join(base, on="caption_id")
        if df["baseline_rank"].isna().any():
            raise UserError(f"Some captions of the {name} subset have no rank in retrieval run {rrid}.")
        if name == "failures":
            tl = [per_cat[c] for c in df["category"]]
            kpc = {c: s.k for c in s.categories if (df["category"] == c).any()}
        else:
            tl = [union] * len(df)
            kpc = {"*": s.k}
        pops.append(_Population(name, df.reset_index(drop=True), tl, kpc))
    return pops


def build_population_prompts(pops: list[_Population], s: _Settings) -> None:
    """Section 2: fill each caption's prompts (`phrases.build_prompts`, up to K distinct texts, the caption
    first). Refuses, before anything is encoded, a set that gives no failure a prompt besides its caption."""
    slot_cache: dict[str, dict[str, str]] = {}
    for pop in pops:
        for text, tl in zip(pop.captions["text"], pop.templates):
            slots = slot_cache.get(text)
            if slots is None:
                slots = slot_cache[text] = phrases.extract(text)
            pop.prompts.append(phrases.build_prompts(text, tl, s.k, slots))
    subset = pops[0]
    if s.k >= 2 and all(len(prs) == 1 for prs in subset.prompts):
        raise UserError(
            f"Template set {s.template_set!r} ({s.template_mode} mode) gives none of the {len(subset.prompts)} "
            f"captions of the subset a prompt other than the caption itself: each template either uses a slot that "
            f"the phrase extractor finds empty in them or gives the caption's own text again (see clipfail templates "
            f"list --set {s.template_set}). Nothing was encoded or written. Use a set whose templates apply (the "
            f"default {templates.DEFAULT_SET} has templates that always do), or --k 1 for the baseline itself."
        )


def plan_units(pops: list[_Population], s: _Settings, common: dict) -> list[_Unit]:
    """One unit per (population, pooling), with its full configuration and hash (the idempotence key)."""
    units = []
    for pop in pops:
        subset_sig = _sha(
            [
                [int(c), None if pd.isna(sid) else int(sid), None if pd.isna(lab) else str(lab), p]
                for c, sid, lab, p in zip(
                    pop.captions["caption_id"], pop.captions["sample_id"], pop.captions["category"], pop.prompts
                )
            ]
        )
        for p in s.poolings:
            cfg = dict(
                common,
                population=pop.name,
                control=list(s.control) if s.control and pop.name != "failures" else None,
                pooling=p,
                tau=s.tau if p == "logsumexp" else None,
                subset_sha256=subset_sig,
            )
            units.append(_Unit(pop, p, cfg, db.config_hash(cfg)))
    return units


def encode_or_reuse_prompts(
    con,
    s: _Settings,
    pops_run: list[_Population],
    *,
    recompute_prompts: bool,
    encoder: Encoder | None,
    encoder_factory: Callable[[dict], Encoder] | None,
) -> _PromptMatrix:
    """Section 3: the embedding of every prompt of `pops_run`. A prompt that is its caption takes the caption's
    row of the text embedding set; the others come from the prompt cache, and only those not cached (all of
    this model's cached texts too, with `recompute_prompts`) are encoded. Adds gt_index and text_row to each
    population's captions."""
    from toolkit.store.artifacts import load_embedding_set

    rr, rrid, identity = s.rr, s.rrid, s.identity
    fix = "Re-run clipfail embed (with --recompute) and clipfail evaluate."
    img = load_embedding_set(con, int(rr["image_embedding_set_id"]), fix=fix)
    txt = load_embedding_set(con, int(rr["text_embedding_set_id"]), fix=fix)
    img_row = {int(i): r for r, i in enumerate(img.item_ids)}
    txt_row = {int(i): r for r, i in enumerate(txt.item_ids)}
    for pop in pops_run:
        missing = [int(i) for i in pop.captions["image_id"] if int(i) not in img_row]
        missing += [int(c) for c in pop.captions["caption_id"] if int(c) not in txt_row]
        if missing:
            raise UserError(f"Retrieval run {rrid}'s embedding sets lack {len(missing)} of its own items. {fix}")
        pop.captions["gt_index"] = [img_row[int(i)] for i in pop.captions["image_id"]]
        pop.captions["text_row"] = [txt_row[int(c)] for c in pop.captions["caption_id"]]

    other = sorted(
        {pr for pop in pops_run for text, prs in zip(pop.captions["text"], pop.prompts) for pr in prs if pr != text}
    )
    drop_ids: list[int] = []
    if recompute_prompts:
        drop_ids = prompt_shards(con, identity)
        old_texts = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT p.text FROM embedding_rows er JOIN prompts p ON p.prompt_id = er.item_id "
                "WHERE list_contains(?, er.embedding_set_id)",
                [drop_ids],
            ).fetchall()
        ]
        have = {}
        new_texts = sorted(set(other) | set(old_texts))
    else:
        cached = cached_prompts(con, identity, other)
        have = dict(zip(cached["text"], zip(cached["embedding_set_id"], cached["row_index"])))
        new_texts = [t for t in other if t not in have]
    dim = txt.array.shape[1]
    vec: dict[str, np.ndarray] = {}
    shard_fix = (
        "Encode this model's cached prompts again (the damaged shard is dropped in the same transaction) with: "
        + recompute_command(con, s.categories, rrid, s.poolings, s.tau, s.template_set, s.template_mode, s.k,
                            s.max_subset, s.seed, s.include_overlap, s.control)
    )  # fmt: skip
    for set_id, grp in pd.DataFrame(
        {"text": list(have), "set": [v[0] for v in have.values()], "row": [v[1] for v in have.values()]}
    ).groupby("set"):
        arr = load_embedding_set(con, int(set_id), fix=shard_fix).array
        for t, r in zip(grp["text"], grp["row"]):
            vec[t] = arr[int(r)]
    new_arr = None
    if new_texts:
        if encoder is None:
            make = encoder_factory or model_encoder_factory()
            set_config = study_paths.resolve_keys(con, json.loads(s.text_set["config_json"] or "{}"), ("checkpoint",))
            encoder = make(dict(identity, config=set_config))
        new_arr = np.asarray(encoder(list(new_texts)), dtype=np.float32)
        if new_arr.shape != (len(new_texts), dim):
            raise RuntimeError(f"encoder returned shape {new_arr.shape}, expected {(len(new_texts), dim)}")
        for t, v in zip(new_texts, new_arr):
            vec[t] = v

    # prompt matrix: the caption text rows first, then the other prompts
    text_rows = sorted({int(r) for pop in pops_run for r in pop.captions["text_row"]})
    pos_text = {r: i for i, r in enumerate(text_rows)}
    pos_other = {t: len(text_rows) + i for i, t in enumerate(other)}
    P = np.empty((len(text_rows) + len(other), dim), dtype=np.float32)
    P[: len(text_rows)] = txt.array[text_rows]
    for t, i in pos_other.items():
        P[i] = vec[t]
    return _PromptMatrix(P, pos_text, pos_other, img.array, other, list(new_texts), new_arr, drop_ids)


def score_and_pool(
    pops_run: list[_Population], todo: list[_Unit], m: _PromptMatrix, tau: float, score_device: str, post=None
) -> tuple[dict[tuple[str, str], pd.DataFrame], int]:
    """Section 4: ({(population, pooling): ranks frame} for the units to compute, number of identity prompts).
    Scores every prompt against every image on `score_device`, pools per pooling, ranks the GT image."""
    import torch

    Gt = torch.from_numpy(np.ascontiguousarray(m.images, dtype=np.float32)).T
    computed = {}
    n_identity = 0
    for pop in pops_run:
        index = []
        for text, row, prs in zip(pop.captions["text"], pop.captions["text_row"], pop.prompts):
            ids = [m.pos_text[int(row)] if pr == text else m.pos_other[pr] for pr in prs]
            n_identity += sum(pr == text for pr in prs)
            index.append(ids)
        wanted = [u.pooling for u in todo if u.pop is pop]
        ranks = _rank_population(pop, index, m.P, Gt, wanted, tau, device=score_device, post=post)
        for p, df in ranks.items():
            computed[(pop.name, p)] = df
    return computed, n_identity


def _write_prompt_shard(con, s: _Settings, m: _PromptMatrix, run_id: int, started, cache_dir, recompute: bool) -> None:
    """The new prompt texts (a prompts row each, unless another model cached them) and their shard file."""
    from toolkit.store.artifacts import register_embedding_set, save_array

    new_texts, identity = m.new_texts, s.identity
    con.register("_improve_new_texts", pd.DataFrame({"text": list(new_texts)}))
    try:
        con.execute(
            "INSERT INTO prompts (text) SELECT n.text FROM _improve_new_texts n "
            "ANTI JOIN prompts p ON p.text = n.text ORDER BY n.text"
        )
    finally:
        con.unregister("_improve_new_texts")
    ids = dict(
        con.execute("SELECT text, prompt_id FROM prompts WHERE list_contains(?, text)", [list(new_texts)]).fetchall()
    )
    shard_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(con)
    tag = f"-r{_sha(started.isoformat())[:8]}" if recompute else ""  # never the dropped file
    shard = shard_dir / f"prompts-{_sha(identity)[:12]}-{_sha(new_texts)[:16]}{tag}.npy"
    sha = save_array(shard, m.new_arr)
    register_embedding_set(
        con,
        kind="prompt",
        subset_id=None,
        model=identity["model"],
        pretrained=identity["pretrained"],
        checkpoint_sha256=identity["checkpoint_sha256"],
        precision=identity["precision"],
        config={"stage": STAGE, "model": identity, "n_prompts": len(new_texts)},
        path=shard,
        array=m.new_arr,
        item_ids=[ids[t] for t in new_texts],
        sha256=sha,
        run_id=run_id,
    )


def store_improvement(con, run_row: dict, ranks: pd.DataFrame, seed: int) -> int:
    """Inside the caller's transaction: one improvement_runs row (stamped created_at), its ranks, and the
    statistics computed from them (bootstrap seeded with `seed`). Returns the new improvement_id."""
    row = {**run_row, "created_at": db.now()}
    cols = ", ".join(row)  # the keys are this module's constants, never user input
    marks = ", ".join("?" for _ in row)
    imp_id = int(
        con.execute(
            f"INSERT INTO improvement_runs ({cols}) VALUES ({marks}) RETURNING improvement_id", list(row.values())
        ).fetchall()[0][0]
    )
    ranks = ranks.copy()
    ranks.insert(0, "improvement_id", imp_id)
    db.insert_df(con, "improvement_ranks", ranks)
    stats_rows = compute_stats(ranks, seed)
    stats_rows.insert(0, "improvement_id", imp_id)
    db.insert_df(con, "improvement_stats", stats_rows)
    return imp_id


def write_rows(
    con,
    s: _Settings,
    units: list[_Unit],
    existing: dict[str, int],
    computed: dict[tuple[str, str], pd.DataFrame],
    m: _PromptMatrix,
    run_config: dict,
    result: ImproveResult,
    *,
    started,
    cache_dir,
    recompute_prompts: bool,
) -> int:
    """Sections 5 and 6: in one transaction, the runs row, the dropped and new prompt shards, and per new
    unit its improvement_runs row, improvement_ranks and improvement_stats (`compute_stats`); reused units
    only add their id to `result`. Returns the runs row's id."""
    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, run_config, started, seed=s.seed, model=s.identity["model"])
        if m.drop_ids:
            con.execute("DELETE FROM embedding_rows WHERE list_contains(?, embedding_set_id)", [m.drop_ids])
            con.execute("DELETE FROM embedding_sets WHERE list_contains(?, embedding_set_id)", [m.drop_ids])
        if m.new_texts:
            _write_prompt_shard(con, s, m, run_id, started, cache_dir, recompute_prompts)
        for u in units:
            h, pop = u.config_hash, u.pop
            if h in existing:
                result.improvement_ids.append(int(existing[h]))
                result.reused_ids.append(int(existing[h]))
                continue
            bank = s.bank or {}
            run_row = dict(
                retrieval_run_id=s.rrid,
                categories=",".join(s.categories),
                population=pop.name,
                pooling=u.pooling,
                tau=u.config["tau"],
                template_set=s.template_set,
                templates_sha256=s.templates_sha256,
                template_mode=s.template_mode,
                k_per_category=json.dumps(pop.k_per_category),
                k_prompts=s.k,
                n_captions=len(pop.captions),
                max_subset=s.max_subset,
                seed=s.seed,
                is_overlap_included=bool(s.include_overlap),
                model=s.identity["model"],
                config_hash=h,
                run_id=run_id,
                method=s.method,
                method_params=s.method_params,
                bank_subset=bank.get("bank_subset"),
                n_bank=bank.get("n_bank"),
                is_bank_overlap=bank.get("is_bank_overlap"),
            )
            imp_id = store_improvement(con, run_row, computed[(pop.name, u.pooling)], s.seed)
            result.improvement_ids.append(imp_id)
    return run_id


# ------------------------------------------------------------------------------ the stage


def improve(
    con,
    categories: str | Sequence[str],
    *,
    retrieval_run_id: int | None = None,
    max_subset: int | None = 200,
    poolings: str | Sequence[str] = "logsumexp",
    tau: float = 1.0,
    template_set: str = templates.DEFAULT_SET,
    template_mode: str = "own",
    seed: int = 42,
    include_overlap: bool = False,
    control: str | tuple | None = None,
    encoder: Encoder | None = None,
    encoder_factory: Callable[[dict], Encoder] | None = None,
    cache_dir: str | Path | None = None,
    k: int = DEFAULT_K,
    recompute_prompts: bool = False,
    method: str = "templates",
    beta: float = 20.0,  # = toolkit.improve.transforms.DEFAULT_BETA (not imported here: it imports torch)
    k_bank: int = 1,
    bank: str | None = None,
    allow_bank_overlap: bool = False,
    top: int = 3,
    alpha: float = 0.5,
) -> ImproveResult:
    """Run (or reuse) prompt ensembling on a labelled failure subset; see the module docstring.

    `method` (see the module docstring, "Methods"): "templates"; "inverted-softmax" (`beta`), "qb-norm" (`beta`,
    `k_bank`, `bank`: a subset name, `allow_bank_overlap`) or "query-expansion" (`top`, `alpha`), which
    `improve_method` runs (the template and pooling arguments do not apply to them); or
    "templates+inverted-softmax" / "templates+qb-norm" (templates, then the method on the pooled scores).

    `encoder(texts) -> (len(texts), d) float32 L2-normalised array` encodes prompts. Without one,
    `encoder_factory(identity)` (default: `model_encoder_factory()`) builds it from the model that
    made the retrieval run's text embeddings; `identity` is `model_identity` of that set plus its
    recorded config under "config". The model is built only when some prompt is not cached.
    Prompt shards go to `cache_dir` (default: `default_cache_dir`). Tests pass a fake encoder.
    `k`: prompts per caption (the caption included); `recompute_prompts`: see the module docstring.

    The sections, in order: `check_options`; `select_populations` (1); `build_population_prompts` (2);
    `plan_units` (idempotence); `encode_or_reuse_prompts` (3); `score_and_pool` (4); `write_rows`
    (5, 6: statistics and rows, in one transaction).
    """
    started = db.now()
    method = str(method).strip().lower()
    if method in METHODS[1:4]:
        return improve_method(
            con, method, categories, retrieval_run_id=retrieval_run_id, max_subset=max_subset, seed=seed,
            include_overlap=include_overlap, control=control, beta=beta, k_bank=k_bank, bank=bank,
            allow_bank_overlap=allow_bank_overlap, top=top, alpha=alpha,
        )  # fmt: skip
    if method not in METHODS:
        raise UserError(f"Unknown --method {method!r}; use one of: {', '.join(METHODS)}.")
    combo = method.split("+", 1)[1] if "+" in method else None
    if bank is not None and combo != "qb-norm":
        raise UserError(f"--bank is an option of the qb-norm methods, not of {method}.")
    combo_params = None
    if combo is not None:
        from toolkit.improve import transforms as hubness

        combo_params = hubness.check_params(combo, beta, k_bank, top, alpha)
    pools, tau, max_subset, seed, k, ctl = check_options(poolings, tau, max_subset, seed, k, control)
    cats = parse_categories(con, categories)
    rr = resolve_retrieval_run(con, retrieval_run_id, need="labels", purpose="improve")
    tdf = templates.load_set(con, template_set)
    per_cat, union = template_lists(tdf, cats, template_mode, k)
    s = _Settings(
        rr=rr,
        categories=cats,
        poolings=pools,
        tau=tau,
        template_set=template_set,
        templates_sha256=templates.templates_sha256(tdf),
        template_mode=template_mode,
        k=k,
        max_subset=max_subset,
        seed=seed,
        include_overlap=bool(include_overlap),
        control=ctl,
    )
    pops = select_populations(con, s, per_cat, union)
    s.text_set = (
        con.execute("SELECT * FROM embedding_sets WHERE embedding_set_id = ?", [int(rr["text_embedding_set_id"])])
        .df()
        .iloc[0]
        .to_dict()
    )
    s.identity = model_identity(s.text_set)
    s.method = method
    plan = None
    if combo is not None:  # the normalising queries: checked (the bank refused if it leaks) before any encoding
        evaluated = sorted({int(c) for pop in pops for c in pop.captions["caption_id"]})
        plan = plan_normaliser(con, combo, rr, s.text_set, s.identity, evaluated, combo_params, bank,
                                       allow_bank_overlap)  # fmt: skip
        s.method_params, s.bank = hubness.params_text(plan.params), plan.info
    build_population_prompts(pops, s)
    score_device, recorded_device, device_note = scoring_device(con, rr)

    # --- unit configs and idempotence
    common = {
        "stage": STAGE,
        "method": METHOD,
        "retrieval_run_id": s.rrid,
        "categories": cats,
        "template_set": template_set,
        "templates_sha256": s.templates_sha256,
        "template_mode": template_mode,
        "max_subset": max_subset,
        "seed": seed,
        "include_overlap": bool(include_overlap),
        "model": s.identity,
        "k": k,
        "score_device": score_device.split(":")[0],
    }
    if plan is not None:  # a plain templates run keeps the configuration (and hash) it always had
        common |= {"combination": combo, "combination_params": plan.params} | plan.signature
    units = plan_units(pops, s, common)
    existing, untied = reusable_runs(con, [u.config_hash for u in units])
    result = ImproveResult(
        run_id=None,
        retrieval_run_id=s.rrid,
        improvement_ids=[],
        reused_ids=[],
        populations={pop.name: len(pop.captions) for pop in pops},
        k_per_category={pop.name: pop.k_per_category for pop in pops},
        notes=([device_note] if device_note else []) + untied_notes(untied),
    )
    todo = [u for u in units if u.config_hash not in existing]
    if not todo and not (recompute_prompts and prompt_shards(con, s.identity)):
        result.improvement_ids = [int(existing[u.config_hash]) for u in units]
        result.reused_ids = list(result.improvement_ids)
        return result

    todo_pops = {u.pop.name for u in todo}
    pops_run = [p for p in pops if p.name in todo_pops]
    matrix = encode_or_reuse_prompts(
        con, s, pops_run, recompute_prompts=recompute_prompts, encoder=encoder, encoder_factory=encoder_factory
    )
    result.n_prompts = len(matrix.other)
    result.n_encoded = len(matrix.new_texts)
    post = None
    if plan is not None:
        from toolkit.store.artifacts import load_embedding_set

        fix = "Re-run clipfail embed (with --recompute) and clipfail evaluate."
        txt = load_embedding_set(con, int(rr["text_embedding_set_id"]), fix=fix)
        stats_ = plan.load(matrix.images, load_bank_texts(con, plan, txt, fix))
        post = hubness.pooled_transform(stats_, combo)
    try:
        computed, result.n_identity = score_and_pool(pops_run, todo, matrix, tau, score_device, post=post)
    except pooling.NonFiniteScores as exc:
        raise non_finite_error(exc, method, s.method_params, pools, tau) from None

    run_config = dict(
        common,
        poolings=pools,
        tau=tau,
        control=list(ctl) if ctl else None,
        units=[u.config_hash for u in units],
        score_device=score_device,
        retrieval_device=recorded_device,
        score_device_note=device_note,
        recompute_prompts=bool(recompute_prompts),
        dropped_prompt_shards=matrix.drop_ids,
    )
    result.run_id = write_rows(
        con,
        s,
        units,
        existing,
        computed,
        matrix,
        run_config,
        result,
        started=started,
        cache_dir=cache_dir,
        recompute_prompts=recompute_prompts,
    )
    return result


# ------------------------------------------------------------------------------ model encoder


def model_encoder_factory(
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
    text_set_config: dict | None = None,
) -> Callable[[dict], Encoder]:
    """A factory that loads the model of a text embedding set and encodes with the embed fast path.

    The model spec, pretrained tag and checkpoint default to what the text embeddings recorded
    (`model_identity` plus a checkpoint path in the set's config, if the embed stage stored one);
    whatever is loaded must have the same identity (model, pretrained, checkpoint sha256), and it
    runs at the set's precision, so cached prompts and captions always come from the same model.
    """

    def factory(identity: dict) -> Encoder:
        from toolkit.embed.encode import encode_texts
        from toolkit.embed.models import load_model

        cfg = (text_set_config or {}) | dict(identity.get("config") or {})
        ckpt = checkpoint
        if ckpt is None and identity["checkpoint_sha256"]:
            for key in ("checkpoint", "checkpoint_path"):
                if cfg.get(key) and Path(str(cfg[key])).is_file():
                    ckpt = str(cfg[key])
                    break
            if ckpt is None:
                raise UserError(
                    "New prompts must be encoded with the model of the text embeddings, which came from a local "
                    f"checkpoint (sha256 {identity['checkpoint_sha256'][:12]}…). Give --checkpoint PATH."
                )
        spec = model or cfg.get("spec") or identity["model"]
        tag = pretrained if pretrained is not None else (None if ckpt else identity["pretrained"])
        bundle = load_model(spec, pretrained=tag, checkpoint=ckpt, device=device, precision=identity["precision"])
        got = (bundle.model_name, bundle.pretrained, bundle.checkpoint_sha256)
        want = (identity["model"], identity["pretrained"], identity["checkpoint_sha256"])
        if got != want:
            raise UserError(
                f"The model loaded for new prompts ({got[0]}, pretrained {got[1]}, checkpoint {str(got[2])[:12]}) is "
                f"not the one that made the text embeddings ({want[0]}, pretrained {want[1]}, checkpoint "
                f"{str(want[2])[:12]}). Give the same --model/--pretrained/--checkpoint as for clipfail embed."
            )
        return lambda texts: encode_texts(bundle, texts, batch_size=batch_size)

    return factory


def summary(con, improvement_ids: Sequence[int]) -> pd.DataFrame:
    """Rows of the view `improvement_recall` for these improvement runs (K = 1, 5, 10)."""
    return con.execute(
        "SELECT * FROM improvement_recall WHERE list_contains(?, improvement_id) ORDER BY improvement_id, k",
        [[int(i) for i in improvement_ids]],
    ).df()


def ties(con, improvement_ids: Sequence[int]) -> pd.DataFrame:
    """Rows of the view `improvement_ties` for these improvement runs: which count their figures use, and why."""
    return con.execute(
        "SELECT * FROM improvement_ties WHERE list_contains(?, improvement_id) ORDER BY improvement_id",
        [[int(i) for i in improvement_ids]],
    ).df()


def effective_k(con, improvement_ids: Sequence[int]) -> dict[str, str]:
    """population -> "10 for 58 captions, 8 for 4" (view improvement_effective_k, first run of each population)."""
    df = con.execute(
        """
        SELECT population, improvement_id, effective_k, sum(n_captions) AS n
        FROM improvement_effective_k WHERE list_contains(?, improvement_id)
        GROUP BY ALL ORDER BY improvement_id, effective_k DESC
        """,
        [[int(i) for i in improvement_ids]],
    ).df()
    out: dict[str, str] = {}
    for population, g in df.groupby("population", sort=False):
        g = g[g["improvement_id"] == g["improvement_id"].min()]
        out[population] = ", ".join(
            f"{int(r.effective_k)} for {int(r.n)} caption{'s' if r.n != 1 else ''}" for r in g.itertuples()
        )
    return out


# ------------------------------------------------------------------------------ the methods of issue 17
# (toolkit.improve.transforms holds the score transforms; it imports nothing of improve, so there is no import circle)

HUBNESS_METHOD_VERSION = "hubness/v1"


def _text_set_of(con, subset_id: int, identity: dict) -> dict | None:
    """The newest text embedding set of a subset made by the same model (identity as improve.model_identity)."""
    df = con.execute(
        """
        SELECT * FROM embedding_sets
        WHERE kind = 'text' AND subset_id = ? AND model = ? AND precision = ?
          AND pretrained IS NOT DISTINCT FROM ? AND checkpoint_sha256 IS NOT DISTINCT FROM ?
        ORDER BY embedding_set_id DESC LIMIT 1
        """,
        [subset_id, identity["model"], identity["precision"], identity["pretrained"], identity["checkpoint_sha256"]],
    ).df()
    return None if df.empty else df.iloc[0].to_dict()


@dataclass
class NormaliserPlan:
    """Which queries normalise the scores of inverted-softmax / qb-norm (and of their templates combinations)."""

    method: str
    params: dict  # the method's parameters, with the bank's subset name for qb-norm
    signature: dict  # what identifies the normaliser in a run's config (bank file, its kept caption ids)
    info: dict  # improvement_runs columns: bank_subset, n_bank, is_bank_overlap
    embedding_set_id: int | None = None  # the bank's text embedding set (qb-norm)
    keep_ids: np.ndarray | None = None  # the bank's caption ids that are used

    def load(self, image_array: np.ndarray, texts):
        """The `hubness.BankStats` over the images. `texts`: the EmbeddingSet of the normalising captions
        (`load_bank_texts`): for inverted-softmax the run's own (every caption is used), for qb-norm the bank's
        (its kept captions)."""
        from toolkit.improve import transforms as H

        if self.method == "inverted-softmax":
            return H.bank_stats(texts.array, image_array, self.params["beta"], 1)
        rows = np.isin(np.asarray(texts.item_ids), self.keep_ids)
        return H.bank_stats(texts.array[rows], image_array, self.params["beta"], self.params["k_bank"])


def plan_normaliser(con, method, rr, text_set, identity, evaluated, params, bank, allow_bank_overlap):
    """Check and describe the normalising queries (see `improve_method`); a UserError for a bad bank."""

    if method == "inverted-softmax":
        return NormaliserPlan(method, dict(params), {"normaliser": "every caption of the retrieval run"},
                              {"bank_subset": None, "n_bank": None, "is_bank_overlap": None})  # fmt: skip
    rrid = int(rr["retrieval_run_id"])
    if bank is None:
        subset_name = con.execute("SELECT name FROM subsets WHERE subset_id = ?", [int(rr["subset_id"])]).fetchall()
        bank_name, bank_set = subset_name[0][0], text_set
    else:
        bsub = db.get_subset(con, bank)
        bank_name = str(bsub["name"])
        bank_set = _text_set_of(con, int(bsub["subset_id"]), identity)
        if bank_set is None:
            raise UserError(
                f"Subset {bank_name!r} has no caption embeddings of model {identity['model']} for the bank. "
                f"Run: clipfail embed --subset {bank_name} with the model of retrieval run {rrid}."
            )
    bank_ids = con.execute(
        "SELECT item_id FROM embedding_rows WHERE embedding_set_id = ? ORDER BY row_index",
        [int(bank_set["embedding_set_id"])],
    ).fetchnumpy()["item_id"]
    overlap = np.isin(bank_ids, evaluated)
    if bank is None:
        keep = ~overlap  # the default bank: the subset's captions that this call does not evaluate
        is_overlap = False
    else:
        keep = np.ones(len(bank_ids), dtype=bool)
        is_overlap = bool(overlap.any())
        if is_overlap and not allow_bank_overlap:
            raise UserError(
                f"The bank (subset {bank_name!r}) holds {int(overlap.sum())} of the {len(evaluated)} captions "
                "this call evaluates, so their own text would normalise their scores (a leak). Name a bank "
                "subset without them, leave --bank out (the default bank is the subset's other captions), or "
                "give --allow-bank-overlap to run anyway (the report then flags the run)."
            )
    if not keep.any():
        raise UserError(
            f"The bank is empty: every caption of subset {bank_name!r} is evaluated by this call (--control "
            "all?). Name another subset's captions with --bank SUBSET, or drop --control all."
        )
    signature = {
        "bank_subset": bank_name,
        "bank_sha256": str(bank_set["sha256"]),
        "bank_ids_sha256": _sha([int(i) for i in bank_ids[keep]]),
        "allow_bank_overlap": bool(allow_bank_overlap),
    }
    info = {"bank_subset": bank_name, "n_bank": int(keep.sum()), "is_bank_overlap": is_overlap}
    return NormaliserPlan(method, dict(params) | {"bank": bank_name}, signature, info,
                          int(bank_set["embedding_set_id"]), np.asarray(bank_ids[keep]))  # fmt: skip


def load_bank_texts(con, plan: NormaliserPlan, run_texts, fix: str):
    """The EmbeddingSet holding the bank's captions (the run's own when the bank is its subset)."""
    from toolkit.store.artifacts import load_embedding_set

    if plan.embedding_set_id is None or int(plan.embedding_set_id) == int(run_texts.embedding_set_id):
        return run_texts
    return load_embedding_set(con, int(plan.embedding_set_id), fix=fix)


def improve_method(
    con,
    method: str,
    categories,
    *,
    retrieval_run_id: int | None = None,
    max_subset: int | None = 200,
    seed: int = 42,
    include_overlap: bool = False,
    control=None,
    beta: float = 20.0,
    k_bank: int = 1,
    bank: str | None = None,
    allow_bank_overlap: bool = False,
    top: int = 3,
    alpha: float = 0.5,
):
    """`clipfail improve --method inverted-softmax|qb-norm|query-expansion`: the same populations (labelled
    failures of the chosen categories, optional controls), statistics and tables as the templates method,
    with the method's ranks (see the module docstring) as improved ranks.

    The query sets, all from the retrieval run's model:
    - inverted-softmax: the normaliser is taken over every caption of the retrieval run (its queries);
    - qb-norm: the bank is, by default, the captions of the retrieval run's subset that this call does not
      evaluate (neither the failures nor a control); `bank` names another subset, whose captions (its newest
      text embedding set of the same model) form the bank. A bank holding an evaluated caption is refused
      unless `allow_bank_overlap` (the run row then has is_bank_overlap = true, and the report says so).
    A configuration that was already run is reused (a no-op)."""
    from toolkit.improve import transforms as H
    from toolkit.store.artifacts import load_embedding_set

    started = db.now()
    params = H.check_params(method, beta, k_bank, top, alpha)
    if max_subset is not None and int(max_subset) < 1:
        raise UserError("--max-subset must be at least 1.")
    max_subset = None if max_subset is None else int(max_subset)
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be a whole number from 0 to {SEED_MAX} (got {seed}).")
    if bank is not None and method != "qb-norm":
        raise UserError(f"--bank is an option of --method qb-norm, not of {method}.")
    ctl = parse_control(control) if not isinstance(control, tuple) else control
    cats = parse_categories(con, categories)
    rr = resolve_retrieval_run(con, retrieval_run_id, need="labels", purpose="improve")  # no labels: refused
    rrid = int(rr["retrieval_run_id"])
    frames = [("failures", select_failures(con, rrid, cats, max_subset, seed, include_overlap))]
    if ctl is not None:
        frames.append((ctl[0], select_control(con, rrid, ctl, seed)))
    base = con.execute(
        "SELECT query_id AS caption_id, gt_rank AS baseline_rank, n_tied AS baseline_n_tied, gt_id AS image_id "
        "FROM retrieval_ranks WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    base = base.set_index("caption_id")
    pops = []
    for name, df in frames:
        df = df.join(base, on="caption_id")
        if df["baseline_rank"].isna().any():
            raise UserError(f"Some captions of the {name} subset have no rank in retrieval run {rrid}.")
        pops.append((name, df.reset_index(drop=True)))
    evaluated = sorted({int(c) for _, df in pops for c in df["caption_id"]})

    text_set = con.execute(
        "SELECT * FROM embedding_sets WHERE embedding_set_id = ?", [int(rr["text_embedding_set_id"])]
    ).df()
    text_set = text_set.iloc[0].to_dict()
    image_set = con.execute(
        "SELECT sha256 FROM embedding_sets WHERE embedding_set_id = ?", [int(rr["image_embedding_set_id"])]
    ).fetchall()[0]
    identity = model_identity(text_set)
    fix = "Re-run clipfail embed (with --recompute) and clipfail evaluate."

    norm = None
    bank_sig: dict = {}
    bank_info = {"bank_subset": None, "n_bank": None, "is_bank_overlap": None}
    if method != "query-expansion":
        norm = plan_normaliser(con, method, rr, text_set, identity, evaluated, params, bank, allow_bank_overlap)
        params, bank_sig, bank_info = norm.params, norm.signature, norm.info

    common = {
        "stage": STAGE,
        "method": method,
        "method_version": HUBNESS_METHOD_VERSION,
        "params": params,
        "retrieval_run_id": rrid,
        "categories": cats,
        "max_subset": max_subset,
        "seed": seed,
        "include_overlap": bool(include_overlap),
        "model": identity,
        "image_sha256": str(image_set[0]),
        "text_sha256": str(text_set["sha256"]),
    } | bank_sig
    units = []
    for name, df in pops:
        sig = _sha(
            [
                [int(c), None if pd.isna(s) else int(s), None if pd.isna(lab) else str(lab)]
                for c, s, lab in zip(df["caption_id"], df["sample_id"], df["category"])
            ]
        )
        cfg = dict(common, population=name, control=list(ctl) if ctl and name != "failures" else None,
                   subset_sha256=sig)  # fmt: skip
        units.append((name, df, cfg, db.config_hash(cfg)))
    existing, untied = reusable_runs(con, [u[3] for u in units])
    result = ImproveResult(
        run_id=None,
        retrieval_run_id=rrid,
        improvement_ids=[],
        reused_ids=[],
        populations={name: len(df) for name, df, _c, _h in units},
        k_per_category={},
        notes=untied_notes(untied),
    )
    _dev, recorded, _note = scoring_device(con, rr)
    if recorded and not str(recorded).startswith("cpu"):
        result.notes.append(
            f"Retrieval run {rrid} ranked on {recorded}; {method} scores on the cpu, so its scores may differ from "
            "the retrieval run's in the last bit (~1e-7) and images scoring that close could swap."
        )
    todo = [u for u in units if u[3] not in existing]
    if not todo:
        result.improvement_ids = [int(existing[u[3]]) for u in units]
        result.reused_ids = list(result.improvement_ids)
        return result

    img = load_embedding_set(con, int(rr["image_embedding_set_id"]), fix=fix)
    txt = load_embedding_set(con, int(rr["text_embedding_set_id"]), fix=fix)
    img_row = {int(i): r for r, i in enumerate(img.item_ids)}
    txt_row = {int(i): r for r, i in enumerate(txt.item_ids)}
    st = norm.load(img.array, load_bank_texts(con, norm, txt, fix)) if norm is not None else None

    computed = {}
    for _name, df, _cfg, h in todo:
        try:
            rows = np.array([txt_row[int(c)] for c in df["caption_id"]], dtype=np.int64)
            gt = np.array([img_row[int(i)] for i in df["image_id"]], dtype=np.int64)
        except KeyError:
            raise UserError(f"Retrieval run {rrid}'s embedding sets lack some of its own items. {fix}") from None
        Q = txt.array[rows]
        try:
            if method == "query-expansion":
                r = H.rank_query_expansion(Q, img.array, gt, params["top"], params["alpha"])
            elif method == "inverted-softmax":
                r = H._rank_with(
                    *H._check(Q, img.array), gt, lambda b, e, S: H.inverted_softmax(S, st.log_norm, st.beta)
                )
            else:
                r = H.rank_qb_norm_with(Q, img.array, gt, st)
        except pooling.NonFiniteScores as exc:
            raise non_finite_error(exc, method, H.params_text(params)) from None
        computed[h] = pd.DataFrame(
            {
                "caption_id": df["caption_id"].to_numpy(np.int64),
                "sample_id": df["sample_id"].astype("Int64"),
                "category": df["category"].astype(object).where(df["category"].notna(), None),
                "n_prompts": np.ones(len(df), dtype=np.int32),
                "n_distinct_prompts": np.ones(len(df), dtype=np.int32),
                "baseline_rank": df["baseline_rank"].to_numpy(np.int64),
                "improved_rank": r.gt_rank,
                "improved_score": r.gt_score,
                "baseline_n_tied": df["baseline_n_tied"].to_numpy(np.int64),
                "improved_n_tied": r.n_tied,
            }
        )

    run_config = dict(common, control=list(ctl) if ctl else None, units=[u[3] for u in units], score_device="cpu",
                      retrieval_device=recorded, n_bank=bank_info["n_bank"])  # fmt: skip
    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, run_config, started, seed=seed, model=identity["model"])
        for name, df, _cfg, h in units:
            if h in existing:
                result.improvement_ids.append(int(existing[h]))
                result.reused_ids.append(int(existing[h]))
                continue
            run_row = dict(
                retrieval_run_id=rrid,
                categories=",".join(cats),
                population=name,
                pooling="none",  # a score transform: no prompts, so no pooling, templates or K
                tau=None,
                template_set="",
                templates_sha256="",
                template_mode="none",
                k_per_category="{}",
                k_prompts=None,
                n_captions=len(df),
                max_subset=max_subset,
                seed=seed,
                is_overlap_included=bool(include_overlap),
                model=identity["model"],
                config_hash=h,
                run_id=run_id,
                method=method,
                method_params=H.params_text(params),
                bank_subset=bank_info["bank_subset"],
                n_bank=bank_info["n_bank"],
                is_bank_overlap=bank_info["is_bank_overlap"],
            )
            imp_id = store_improvement(con, run_row, computed[h], seed)
            result.improvement_ids.append(imp_id)
    result.run_id = run_id
    return result
