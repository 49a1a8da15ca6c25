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

7. Extended positives (issue 27). When the retrieval run's subset has imported positives (ECCV Caption, CxC:
   `clipfail positives import`), the same scores also rank every extended positive of each caption, with the same
   `pooling.gt_rank_counts`, into `improvement_positive_ranks`, and the paired statistics of the hits with them
   counted go to `improvement_stats_extended` (view `improvement_recall_extended`; `toolkit.improve.extended`). A
   reused run made before the import gets them from the same call again. A subset without positives: no row.

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

Methods. ``method`` names a registered improvement method (`toolkit.improve.methods`, entry-point group
``clipfail.methods``; docs/plugins.md): "templates" (the above, the default, `methods.prompt_ensemble`);
"inverted-softmax", "qb-norm" or "query-expansion" (`toolkit.improve.transforms` on each caption's raw scores);
"templates+inverted-softmax" / "templates+qb-norm" (the templates' pooled scores normalised with the method's
normaliser, `transforms.pooled_transform`, its queries, every caption of the run or the bank, scored as
captions); or a plugin's. Every method goes through the one skeleton below: populations (step 1, the same for
all) -> units -> "already done?" -> the method's scores of each block of captions -> ranks and ties with
`pooling.gt_rank_counts` (so no method, built-in or plugin, gains from ties) -> statistics, intervals, McNemar
and controls (steps 5 and 6) -> one transaction. `improvement_runs.method` and ``method_params`` record which;
the columns a method has no value for (pooling, tau, template_set, templates_sha256, template_mode,
k_per_category, k_prompts for a method without prompts) are NULL. A plain templates run's configuration is
unchanged.
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
from toolkit.improve import extended, methods, pooling
from toolkit.labels import phrases
from toolkit.store import db
from toolkit.store.runs import resolve_retrieval_run

STAGE = "improve"
METHOD = "prompt-ensemble/v2"  # v2: distinct prompts, K chosen (v1 kept copies of the caption)
POPULATIONS = ("failures", "successes", "all")
RECALL_KS = (1, 5, 10)
DEFAULT_K = 10  # prompts per caption, the reference study's K
SEED_MAX = 2**32 - 1
SCORE_BUDGET = 8_000_000  # score elements (c captions x K prompts x M images) held at once
FIX = "Re-run clipfail embed (with --recompute) and clipfail evaluate."

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
    extended_ids: list[int] = field(default_factory=list)  # runs whose extended-positive figures this call wrote

    @property
    def is_noop(self) -> bool:
        return self.run_id is None and not self.extended_ids


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


# ------------------------------------------------------------------------------ scoring


# ------------------------------------------------------------------------------ what the sections share


@dataclass
class _Population:
    """One population of captions (the labelled failures, or a control), as every method sees it."""

    name: str
    captions: pd.DataFrame  # caption_id, sample_id, category, image_id, text, baseline_rank, baseline_n_tied
    k_per_category: dict[str, int] | None = None  # templates: {category: K asked} ('*': controls)
    templates: list[list[str]] = field(default_factory=list)  # templates: the template list of each caption
    prompts: list[list[str]] = field(default_factory=list)  # templates: the prompts of each caption


@dataclass
class Runtime:
    """What a call brings besides its options: the prompt encoder (tests pass a fake one) and the shard folder."""

    encoder: Encoder | None = None
    encoder_factory: Callable[[dict], Encoder] | None = None
    cache_dir: str | Path | None = None


@dataclass
class Run:
    """One improve call's checked settings, which the skeleton's sections and the method share."""

    method: methods.Method
    entry: methods.Entry
    params: methods.MethodParams
    rr: dict  # the retrieval_runs row
    categories: list[str]
    max_subset: int | None
    seed: int
    include_overlap: bool
    control: tuple[str, int | None] | None
    io: Runtime
    text_set: dict | None = None  # the retrieval run's text embedding set
    identity: dict | None = None  # its model_identity: the prompt cache's key
    image_sha256: str | None = None
    score_device: str = "cpu"
    recorded_device: str | None = None
    device_note: str | None = None
    method_params: str | None = None  # improvement_runs.method_params
    plan: dict = field(default_factory=dict)  # the method's own plan (template lists, a bank's normaliser)

    @property
    def rrid(self) -> int:
        return int(self.rr["retrieval_run_id"])

    @property
    def text_sha256(self) -> str:
        return str(self.text_set["sha256"])


@dataclass
class _Unit:
    """One (population, variant): one improvement_runs row, new or reused."""

    pop: _Population
    key: object  # the method's variant (templates: the pooling; None for a method with one variant)
    config: dict
    config_hash: str


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
            row |= stats.paired_outcomes(base_r <= k, new_r <= k, n_resamples, seed)
            row |= {"ci_level": 0.95, "bootstrap_resamples": n_resamples, "bootstrap_seed": seed}
            if has_ties:
                pess = stats.paired_outcomes(base_p <= k, new_p <= k, n_resamples, seed)
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


# ------------------------------------------------------------------------------ the skeleton, section by section


def start(con, m, entry, params, categories, retrieval_run_id, max_subset, seed, include_overlap, control, io) -> Run:
    """The call's checked settings; the method's `prepare` (templates: the set and its lists) runs last."""
    if max_subset is not None and int(max_subset) < 1:
        raise UserError("--max-subset must be at least 1.")
    max_subset = None if max_subset is None else int(max_subset)
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) <= SEED_MAX:
        raise UserError(f"--seed must be a whole number from 0 to {SEED_MAX} (got {seed}).")
    ctl = parse_control(control) if not isinstance(control, tuple) else control
    cats = parse_categories(con, categories)
    rr = resolve_retrieval_run(con, retrieval_run_id, need="labels", purpose="improve")  # no labels: refused
    run = Run(m, entry, params, rr, cats, max_subset, int(seed), bool(include_overlap), ctl, io)
    run.method_params = params.text()
    m.prepare(con, run)
    return run


def select_populations(con, run: Run) -> list[_Population]:
    """Section 1: the failure subset (and the control population, if any) with their baseline ranks and texts;
    then the method's `attach` (a bank that must not leak; templates: each caption's prompts)."""
    rrid = run.rrid
    frames = [("failures", select_failures(con, rrid, run.categories, run.max_subset, run.seed, run.include_overlap))]
    if run.control is not None:
        frames.append((run.control[0], select_control(con, rrid, run.control, run.seed)))
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
        pops.append(_Population(name, df.reset_index(drop=True)))
    run.text_set = con.execute(
        "SELECT * FROM embedding_sets WHERE embedding_set_id = ?", [int(run.rr["text_embedding_set_id"])]
    ).df().iloc[0].to_dict()  # fmt: skip
    run.identity = model_identity(run.text_set)
    run.image_sha256 = str(
        con.execute(
            "SELECT sha256 FROM embedding_sets WHERE embedding_set_id = ?", [int(run.rr["image_embedding_set_id"])]
        ).fetchall()[0][0]
    )
    run.score_device, run.recorded_device, run.device_note = scoring_device(con, run.rr)
    run.method.attach(con, run, pops)
    return pops


def plan_units(run: Run, pops: list[_Population]) -> list[_Unit]:
    """One unit per (population, variant), with its full configuration and hash (the "already done?" key)."""
    common = {
        "stage": STAGE,
        "retrieval_run_id": run.rrid,
        "categories": run.categories,
        "max_subset": run.max_subset,
        "seed": run.seed,
        "include_overlap": run.include_overlap,
        "model": run.identity,
    } | run.method.config(run)
    run.plan["common"] = common
    units = []
    for pop in pops:
        sig = _sha(run.method.signature_rows(pop))
        ctl = list(run.control) if run.control and pop.name != "failures" else None
        for key, extra in run.method.variants(run):
            cfg = dict(common, population=pop.name, control=ctl, **extra, subset_sha256=sig)
            units.append(_Unit(pop, key, cfg, db.config_hash(cfg)))
    return units


def index_populations(run: Run, pops: list[_Population], images, texts) -> None:
    """Each caption's row in the text embedding set (text_row) and its GT image's row in the image set (gt_index)."""
    img_row = {int(i): r for r, i in enumerate(images.item_ids)}
    txt_row = {int(i): r for r, i in enumerate(texts.item_ids)}
    for pop in pops:
        missing = [int(i) for i in pop.captions["image_id"] if int(i) not in img_row]
        missing += [int(c) for c in pop.captions["caption_id"] if int(c) not in txt_row]
        if missing:
            raise UserError(f"Retrieval run {run.rrid}'s embedding sets lack {len(missing)} of its own items. {FIX}")
        pop.captions["gt_index"] = [img_row[int(i)] for i in pop.captions["image_id"]]
        pop.captions["text_row"] = [txt_row[int(c)] for c in pop.captions["caption_id"]]


def _checked_scores(run: Run, block: methods.Block, keys) -> dict:
    """The method's scores of a block, {variant: (n, M) array}; a plugin's failure or wrong shape is one message."""
    m, entry = run.method, run.entry
    n, M = len(block.rows), block.images.shape[0]
    try:
        got = m.score_variants(block)
    except (UserError, pooling.NonFiniteScores):
        raise
    except Exception as exc:
        if entry.is_builtin:
            raise
        raise UserError(
            f"Improvement method {m.name!r} ({entry.origin}) failed on a block of {n} captions: "
            f"{type(exc).__name__}: {exc}. Nothing was written."
        ) from None
    out = {}
    for key in keys:
        a = got.get(key) if isinstance(got, dict) else None
        a = None if a is None else np.asarray(a)
        numeric = a is not None and (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer))
        if not numeric or a.shape != (n, M):
            what = "no array" if a is None else f"an array of shape {a.shape} and dtype {a.dtype}"
            raise UserError(
                f"Improvement method {m.name!r} ({entry.origin}) returned {what} for a block of {n} captions and "
                f"{M} images; score() must return a ({n}, {M}) array of floats. Nothing was written."
            )
        out[key] = a
    return out


def compute(run: Run, state, pops_run: list[_Population], todo: list[_Unit], images, texts, ext=None) -> dict:
    """Section 4: {(population, variant): ranks frame}. Each block's scores come from the method; every method's
    improved rank and n_tied come from the one ranking, `pooling.gt_rank_counts` (NaN or inf refused). With
    extended positives (`ext.pairs`, toolkit.improve.extended), their improved ranks go to ext.ranks, the same way."""
    m = run.method
    computed = {}
    for pop in pops_run:
        caps, keys = pop.captions, [u.key for u in todo if u.pop is pop]
        n, gt = len(caps), caps["gt_index"].to_numpy(np.int64)
        cids = caps["caption_id"].to_numpy(np.int64)
        out = {k: (np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, np.int64)) for k in keys}
        Q = texts.array[caps["text_row"].to_numpy(np.int64)] if m.uses_scores else None
        pairs = None if ext is None or ext.pairs is None else ext.pairs[pop.name]
        pos = {k: extended.empty_ranks(pairs) for k in keys} if pairs is not None else {}

        def rank(rows, S, Q=Q, G=images.array, out=out, gt=gt, cids=cids, keys=keys, pop=pop, pairs=pairs, pos=pos):
            block = methods.Block(pop.name, rows, cids[rows], None if Q is None else Q[rows], G, S, state, run.params)
            for key, sc in _checked_scores(run, block, keys).items():
                out[key][0][rows], out[key][2][rows] = pooling.gt_rank_counts(sc, gt[rows])
                out[key][1][rows] = sc[np.arange(len(rows)), gt[rows]]
                if pairs is not None:
                    extended.rank_block(sc, rows, pairs, pos[key])

        if m.uses_scores and n:
            from toolkit.improve import transforms as H  # torch: only once something is scored

            Qc, Gc = H._check(Q, images.array)
            H._blocks(Qc, Gc, lambda b, e, S, Gc=Gc, rank=rank: rank(np.arange(b, e), S, G=Gc))
        else:
            for rows in m.blocks(pop, state):
                rank(rows, None)
        extra = m.caption_columns(pop, state)
        for key, ranks in pos.items():
            ext.ranks[(pop.name, key)] = extended.ranks_frame(pairs, ranks)
        for key, (r, sc, tied) in out.items():
            computed[(pop.name, key)] = pd.DataFrame(
                {
                    "caption_id": cids,
                    "sample_id": caps["sample_id"].astype("Int64"),
                    "category": caps["category"].astype(object).where(caps["category"].notna(), None),
                    "n_prompts": extra["n_prompts"],
                    "n_distinct_prompts": extra["n_distinct_prompts"],
                    "baseline_rank": caps["baseline_rank"].to_numpy(np.int64),
                    "improved_rank": r,
                    "improved_score": sc,
                    "baseline_n_tied": caps["baseline_n_tied"].to_numpy(np.int64),
                    "improved_n_tied": tied,
                }
            )
    return computed


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


def write_rows(con, run: Run, state, units, existing, computed, result: ImproveResult, started, ext) -> int:
    """Sections 5 and 6: in one transaction, the runs row, the method's own rows (templates: prompt shards), and
    per new unit its improvement_runs row (the columns the method has no value for are NULL), improvement_ranks
    and improvement_stats (`compute_stats`); reused units only add their id to `result`. Then the extended
    positives' ranks and statistics (`extended.write`: new units, and reused ones that lack them). Returns the
    run id."""
    m = run.method
    run_config = dict(
        run.plan["common"],
        control=list(run.control) if run.control else None,
        units=[u.config_hash for u in units],
    ) | m.run_config(run, state)
    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, run_config, started, seed=run.seed, model=run.identity["model"])
        m.write(con, run, state, run_id, started)
        for u in units:
            h = u.config_hash
            if h in existing:
                result.improvement_ids.append(int(existing[h]))
                result.reused_ids.append(int(existing[h]))
                ext.ids[h] = int(existing[h])
                continue
            run_row = dict(
                retrieval_run_id=run.rrid,
                categories=",".join(run.categories),
                population=u.pop.name,
                n_captions=len(u.pop.captions),
                max_subset=run.max_subset,
                seed=run.seed,
                is_overlap_included=run.include_overlap,
                model=run.identity["model"],
                config_hash=h,
                run_id=run_id,
            ) | m.columns(run, u.pop, u.key)
            ext.ids[h] = store_improvement(con, run_row, computed[(u.pop.name, u.key)], run.seed)
            result.improvement_ids.append(ext.ids[h])
        result.extended_ids = extended.write(con, run.rrid, ext, units, computed, run.seed)
    return run_id


# ------------------------------------------------------------------------------ the stage


def improve(
    con,
    categories: str | Sequence[str],
    *,
    retrieval_run_id: int | None = None,
    max_subset: int | None = 200,
    poolings: str | Sequence[str] | None = None,
    tau: float | None = None,
    template_set: str | None = None,
    template_mode: str | None = None,
    seed: int = 42,
    include_overlap: bool = False,
    control: str | tuple | None = None,
    encoder: Encoder | None = None,
    encoder_factory: Callable[[dict], Encoder] | None = None,
    cache_dir: str | Path | None = None,
    k: int | None = None,
    recompute_prompts: bool = False,
    method: str = "templates",
    beta: float | None = None,
    k_bank: int | None = None,
    bank: str | None = None,
    allow_bank_overlap: bool = False,
    top: int | None = None,
    alpha: float | None = None,
    **options,
) -> ImproveResult:
    """Run (or reuse) an improvement method on a labelled failure subset; see the module docstring.

    `method`: a registered method (`toolkit.improve.methods`): "templates" (the default), "inverted-softmax"
    (`beta`), "qb-norm" (`beta`, `k_bank`, `bank`: a subset name, `allow_bank_overlap`), "query-expansion"
    (`top`, `alpha`), "templates+inverted-softmax" / "templates+qb-norm" (templates, then the method on the
    pooled scores), or a plugin's (its parameters as keyword `options`, by field name). A parameter left None
    takes the method's default; one the method does not read is refused. Templates: `poolings` (default
    logsumexp), `tau` (1), `template_set`, `template_mode` (own), `k` (10), `recompute_prompts`.

    `encoder(texts) -> (len(texts), d) float32 L2-normalised array` encodes prompts. Without one,
    `encoder_factory(identity)` (default: `model_encoder_factory()`) builds it from the model that
    made the retrieval run's text embeddings; `identity` is `model_identity` of that set plus its
    recorded config under "config". The model is built only when some prompt is not cached.
    Prompt shards go to `cache_dir` (default: `toolkit.store.paths.prompt_cache_dir`). Tests pass a fake encoder.

    The sections, in order: `start` (checks); `select_populations` (1; the method's prompts, 2);
    `plan_units` and `reusable_runs` (already done?); the method's `load` (3) and `compute` (4); `write_rows`
    (5, 6: statistics and rows, in one transaction).
    """
    started = db.now()
    m, entry = methods.get(method)
    given = dict(poolings=poolings, tau=tau, template_set=template_set, template_mode=template_mode, k=k,
                 recompute_prompts=recompute_prompts or None, beta=beta, k_bank=k_bank, bank=bank,
                 allow_bank_overlap=allow_bank_overlap or None, top=top, alpha=alpha) | options  # fmt: skip
    params = methods.make_params(m, entry, {name: v for name, v in given.items() if v is not None})
    io = Runtime(encoder, encoder_factory, cache_dir)
    run = start(con, m, entry, params, categories, retrieval_run_id, max_subset, seed, include_overlap, control, io)
    pops = select_populations(con, run)
    units = plan_units(run, pops)
    existing, untied = reusable_runs(con, [u.config_hash for u in units])
    result = ImproveResult(
        run_id=None,
        retrieval_run_id=run.rrid,
        improvement_ids=[],
        reused_ids=[],
        populations={pop.name: len(pop.captions) for pop in pops},
        k_per_category={pop.name: pop.k_per_category for pop in pops if pop.k_per_category is not None},
        notes=m.notes(run) + untied_notes(untied),
    )
    todo = [u for u in units if u.config_hash not in existing]
    ext = extended.plan(con, run.rrid, existing.values())
    ext.reused = set(existing)
    if not todo and not ext.pending and not m.must_run(con, run):
        result.improvement_ids = [int(existing[u.config_hash]) for u in units]
        result.reused_ids = list(result.improvement_ids)
        return result
    return score_and_write(con, run, pops, units, todo, existing, result, started, ext)


def score_and_write(con, run: Run, pops, units, todo, existing, result: ImproveResult, started, ext) -> ImproveResult:
    """Sections 3-6 for the units to score: the new ones (`todo`), and the reused ones whose extended positives
    need the method's scores again (`toolkit.improve.extended`: runs made before the positives were imported).
    When only those are left, their extended ranks and statistics are written in a transaction of their own,
    without a runs row (the runs they complete are the ones that recorded the call)."""
    from toolkit.store.artifacts import load_embedding_set

    m = run.method
    scored = todo + [u for u in units if ext.needs_scores(existing.get(u.config_hash))]
    must_run = m.must_run(con, run)
    computed, state = {}, None
    if scored or must_run:
        pops_run = [p for p in pops if p.name in {u.pop.name for u in scored}]
        images = load_embedding_set(con, int(run.rr["image_embedding_set_id"]), fix=FIX)
        texts = load_embedding_set(con, int(run.rr["text_embedding_set_id"]), fix=FIX)
        index_populations(run, pops_run, images, texts)
        state = m.load(con, run, pops_run, images, texts)
        ext.pairs = extended.population_pairs(con, run.rrid, pops_run, images)
        try:
            computed = compute(run, state, pops_run, scored, images, texts, ext)
        except pooling.NonFiniteScores as exc:
            raise non_finite_error(exc, m.name, run.method_params, *m.non_finite_context(run)) from None
        m.fill_result(result, state)
    if todo or must_run:
        result.run_id = write_rows(con, run, state, units, existing, computed, result, started, ext)
        return result
    result.improvement_ids = [int(existing[u.config_hash]) for u in units]
    result.reused_ids = list(result.improvement_ids)
    ext.ids = {u.config_hash: int(existing[u.config_hash]) for u in units}
    with db.transaction(con):
        result.extended_ids = extended.write(con, run.rrid, ext, units, computed, run.seed)
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
    """population -> "10 for 58 captions, 8 for 4" (view improvement_prompt_counts, first run of each population)."""
    df = con.execute(
        """
        SELECT u.population, c.improvement_id, c.effective_k, c.n_captions AS n
        FROM improvement_prompt_counts c JOIN improvement_runs u USING (improvement_id)
        WHERE list_contains(?, c.improvement_id) ORDER BY c.improvement_id, c.effective_k DESC
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


def improve_method(con, method: str, categories, **options) -> ImproveResult:
    """`improve` with `method` first (the inverted-softmax / qb-norm / query-expansion entry of issue 17)."""
    return improve(con, categories, method=method, **options)
