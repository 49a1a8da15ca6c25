"""Triage: an evidence-backed category suggestion for every R@1 failure of a retrieval run.

`triage(con, retrieval_run_id=None)` writes, in one transaction, a `triage_runs` row and one
`triage_suggestions` row per R@1 failure (gt_rank > 1) of a text-to-image run. Each row holds the
evidence every rule found, the rules that fired, and the suggestion: the first rule in `PRIORITY`
that fired, with that rule's fixed score (`RULE_SCORES`: a ranking of how direct the evidence is,
not a calibrated probability). No rule firing is an honest "no suggestion" (NULL).

Evidence comes from the caption (the lexicon of `toolkit.labels.phrases`, plus the names of the ingested
COCO categories), the object instances of the ground-truth (GT) and top-1 images (`image_instances`,
written by `ingest` from instances_val2017.json; without them the three instance rules cannot fire),
the run's cached text embeddings, and the run's top-1 ids. The rules, in priority order:

- `rule_object`: a category the caption mentions is present in the GT image and absent from the
  top-1 image, or the reverse.
- `rule_count`: the caption's explicit number for a category ("two dogs", "3 cars", "a pair of
  skis"; "a"/"an" is not a number) equals the GT's non-crowd instance count and not the top-1's.
- `rule_spatial`: a left/right/above/below relation the caption states between two mentioned
  categories ("X to the left of Y", "X above Y", "X under Y"), or of one category within the frame
  ("X on the left"), holds in the GT's boxes and not in the top-1's. X is the nearest mention before
  the relation words (within 6 tokens), Y the first after them (within 4). Positions are the mean
  box centres of the category's non-crowd instances; "within the frame" compares with the image centre.
- `rule_blame` (only when an `explain` run exists for the retrieval run; the newest one is used): the model's
  own evidence. The failure's blamed phrase in `failure_blame` (the variant whose removal helps the ground truth
  most) gives its role's category (toolkit/data/blame_roles.csv), and fires only when the removal actually moves
  the ground truth up: pessimistic rank gain (rank + ties) of at least `BLAME_MIN_RANK_GAIN` (1). It comes after
  the three instance rules (what the images hold is more direct than what the model hangs on) and before
  Ambiguous and the lexicon (a caption's phrase that the model demonstrably hangs on beats a similar caption or
  a mere word). Its evidence is kept in `blame_evidence` whether or not it decides the suggestion; a suggestion
  it decides has the score `BLAME_SCORE` (0.6).
- `rule_ambiguous`: the best cosine between the query caption and the top-1 image's captions is at
  or above the best cosine between the query and its own image's other captions (text embeddings of
  the run), or the GT and the top-1 have the same non-empty set of categories.
- `rule_lexicon`: otherwise Attribute if the caption has an attribute phrase ("red bus"), else
  Action if it has an action phrase ("riding a horse") (`toolkit.labels.phrases.extract`).

Before all of them, where extended positives were imported for the subset (`clipfail positives import`):
- `Verified` (suggests Ambiguous, score 1.0): the top-1 image is a verified positive of the caption (view
  failure_false_negatives: ECCV Caption, CxC or a file), with the sources that verify it as evidence. The
  positive sets used are in the triage config, so importing positives later makes a new triage run.

`is_hub` is a flag, not a category: the top-1 image is the top-1 of at least `hub_threshold`
queries of the run, where hub_threshold = max(2, ceil(hub_factor * queries / gallery images)),
i.e. `hub_factor` times the k-occurrence an image would have if top-1s were spread evenly.

Re-running with the same inputs is a no-op; with new inputs (instances ingested since, another
hub factor) a new triage run is added, and the views use the newest one of each retrieval run.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from toolkit.errors import UserError
from toolkit.labels import phrases
from toolkit.store import artifacts, db
from toolkit.store.runs import resolve_retrieval_run

STAGE = "triage"
RULES_VERSION = "v1"
PRIORITY = ("Object", "Count", "Spatial", "Ambiguous", "Attribute", "Action")
RULE_SCORES = {"Object": 0.9, "Count": 0.8, "Spatial": 0.7, "Ambiguous": 0.5, "Attribute": 0.3, "Action": 0.3}
# issue 27: the rule before all others, once extended positives are imported (`clipfail positives import`): the
# top-1 image is a verified positive of the caption (ECCV Caption / CxC), so the miss is Ambiguous, not a model error
VERIFIED_RULE = "Verified"
VERIFIED_SCORE = 1.0
BLAME_SCORE = 0.6  # a suggestion decided by rule_blame (between Spatial and Ambiguous, like its place in the order)
BLAME_MIN_RANK_GAIN = 1  # the pessimistic rank gain a blamed phrase needs to fire
DEFAULT_HUB_FACTOR = 3.0
HUB_FACTOR_MAX = 1e6  # far beyond any use (the threshold then exceeds the run's queries), and it fits 32 bits

_PUNCT = frozenset('.,;:!?()"')
# relation phrase -> (kind, needs a second object). Longest phrases are matched first.
_PAIR_RELATIONS = {
    ("to", "the", "left", "of"): "left",
    ("on", "the", "left", "of"): "left",
    ("on", "the", "left", "side", "of"): "left",
    ("left", "of"): "left",
    ("to", "the", "right", "of"): "right",
    ("on", "the", "right", "of"): "right",
    ("on", "the", "right", "side", "of"): "right",
    ("right", "of"): "right",
    ("above",): "above",
    ("on", "top", "of"): "above",
    ("atop",): "above",
    ("below",): "below",
    ("under",): "below",
    ("underneath",): "below",
    ("beneath",): "below",
}
_FRAME_RELATIONS = {
    ("on", "the", "left"): "left",
    ("to", "the", "left"): "left",
    ("on", "the", "right"): "right",
    ("to", "the", "right"): "right",
}
_RELATION_SEQS = sorted(list(_PAIR_RELATIONS) + list(_FRAME_RELATIONS), key=len, reverse=True)
_TWO_WORD_COUNTS = {("pair", "of"): 2, ("couple", "of"): 2}


@dataclass
class TriageResult:
    retrieval_run_id: int
    triage_run_id: int | None
    run_id: int | None
    n_failures: int
    is_noop: bool = False
    is_instances_used: bool = False
    hub_threshold: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # suggestion -> failures ('(none)' for no suggestion)


# ---------------------------------------------------------------------------------------------
# Caption parsing


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def object_index(category_names=()) -> dict[tuple[str, ...], str]:
    """Surface forms -> category: the lexicon of toolkit.labels.phrases plus each given category name and its plural."""
    index = dict(phrases.OBJECT_INDEX)
    for name in category_names:
        words = tuple(phrases.tokenize(name))
        if words:
            index.setdefault(words, name)
            index.setdefault(words[:-1] + (_plural(words[-1]),), name)
    return index


def find_mentions(tokens: list[str], index: dict, longest: int | None = None) -> list[tuple[int, int, str]]:
    """(start, end, category) of each object mention, longest match first (`longest`: max words of a key).

    As in toolkit.labels.phrases, "orange" followed by a content word is a colour, not the fruit."""
    longest = longest or max((len(k) for k in index), default=1)
    out, i = [], 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            key = tuple(tokens[i : i + n])
            if key in index:
                if key == ("orange",) and i + 1 < len(tokens):
                    nxt = tokens[i + 1]
                    if nxt not in phrases.FUNCTION_WORDS and nxt not in _PUNCT:
                        continue
                out.append((i, i + n, index[key]))
                i += n
                break
        else:
            i += 1
    return out


def _number_before(tokens: list[str], start: int) -> int | None:
    """The explicit number in front of a mention, skipping up to three attribute adjectives."""
    j = start - 1
    skipped = 0
    while j >= 0 and tokens[j] in phrases.ATTRIBUTE_WORDS and skipped < 3:
        j -= 1
        skipped += 1
    if j < 0:
        return None
    tok = tokens[j]
    if tok in phrases.NUMBER_WORDS:
        return phrases.NUMBER_WORDS[tok]
    if tok.isdigit():
        return int(tok)
    if j >= 1 and (tokens[j - 1], tok) in _TWO_WORD_COUNTS:
        return _TWO_WORD_COUNTS[(tokens[j - 1], tok)]
    return None


@dataclass
class CaptionFacts:
    mentioned: list[str]  # categories in order of first mention
    counts: dict[str, int]  # category -> the first explicit number given for it
    relations: list[tuple[str, str, str | None]]  # (kind, X, Y or None for a frame relation)


def caption_facts(caption: str, index: dict, longest: int | None = None) -> CaptionFacts:
    """Objects, numbers and spatial relations a caption states."""
    tokens = phrases.tokenize(caption)
    mentions = find_mentions(tokens, index, longest)
    mentioned = list(dict.fromkeys(m[2] for m in mentions))
    counts: dict[str, int] = {}
    for start, _end, cat in mentions:
        n = _number_before(tokens, start)
        if n is not None and cat not in counts:
            counts[cat] = n
    relations = []
    i = 0
    while i < len(tokens):
        seq = next((s for s in _RELATION_SEQS if tuple(tokens[i : i + len(s)]) == s), None)
        if seq is None:
            i += 1
            continue
        before = [m for m in mentions if m[1] <= i and i - m[1] <= 6]
        after = [m for m in mentions if m[0] >= i + len(seq) and m[0] - (i + len(seq)) <= 4]
        if before:
            x = before[-1][2]
            if seq in _PAIR_RELATIONS and after and after[0][2] != x:
                relations.append((_PAIR_RELATIONS[seq], x, after[0][2]))
            elif seq in _FRAME_RELATIONS:
                relations.append((_FRAME_RELATIONS[seq], x, None))
        i += len(seq)
    return CaptionFacts(mentioned, counts, relations)


# ---------------------------------------------------------------------------------------------
# Image facts


@dataclass
class ImageFacts:
    categories: set[str]  # every annotated category (crowd included)
    counts: Counter  # non-crowd instances per category
    centres: dict[str, tuple[float, float]]  # mean non-crowd box centre per category
    width: float | None
    height: float | None


def image_facts(instances: pd.DataFrame, sizes: pd.DataFrame) -> dict[int, ImageFacts]:
    """Facts about each image of `sizes` (image_id, width, height) from its image_instances rows."""
    inst = instances.assign(
        cx=instances["bbox_x"] + instances["bbox_w"] / 2, cy=instances["bbox_y"] + instances["bbox_h"] / 2
    )
    cats: dict[int, set[str]] = defaultdict(set)
    for iid, cat in zip(inst["image_id"], inst["category_name"]):
        cats[int(iid)].add(cat)
    solid = inst.loc[~inst["is_crowd"].astype(bool)]
    agg = solid.groupby(["image_id", "category_name"]).agg(n=("cx", "size"), cx=("cx", "mean"), cy=("cy", "mean"))
    counts: dict[int, Counter] = defaultdict(Counter)
    centres: dict[int, dict] = defaultdict(dict)
    for (iid, cat), n, cx, cy in zip(agg.index, agg["n"], agg["cx"], agg["cy"]):
        counts[int(iid)][cat] = int(n)
        centres[int(iid)][cat] = (float(cx), float(cy))
    out = {}
    for iid, w, h in zip(sizes["image_id"], sizes["width"], sizes["height"]):
        iid = int(iid)
        out[iid] = ImageFacts(
            cats.get(iid, set()),
            counts.get(iid, Counter()),
            centres.get(iid, {}),
            None if w is None or pd.isna(w) else float(w),
            None if h is None or pd.isna(h) else float(h),
        )
    return out


def relation_holds(kind: str, x: str, y: str | None, img: ImageFacts) -> bool | None:
    """Whether the relation holds in the image's boxes; None when it cannot be judged (object missing)."""
    if x not in img.centres:
        return None
    ax, ay = img.centres[x]
    if y is None:
        if kind in ("left", "right") and img.width:
            return ax < img.width / 2 if kind == "left" else ax > img.width / 2
        if kind in ("above", "below") and img.height:
            return ay < img.height / 2 if kind == "above" else ay > img.height / 2
        return None
    if y not in img.centres:
        return None
    bx, by = img.centres[y]
    return {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[kind]


# ---------------------------------------------------------------------------------------------
# Rules: each returns evidence text when it fires, else None.


def rule_object(facts: CaptionFacts, gt: ImageFacts, top: ImageFacts, known: set[str]) -> str | None:
    """Object: a mentioned category is in the GT and not in the top-1, or in the top-1 and not in the GT."""
    found = []
    for cat in facts.mentioned:
        if cat not in known:
            continue
        in_gt, in_top = cat in gt.categories, cat in top.categories
        if in_gt and not in_top:
            found.append(f"{cat} in GT, not in top-1")
        elif in_top and not in_gt:
            found.append(f"{cat} in top-1, not in GT")
    return "; ".join(found) or None


def rule_count(facts: CaptionFacts, gt: ImageFacts, top: ImageFacts) -> str | None:
    """Count: the caption's number for a category equals the GT's non-crowd count and not the top-1's."""
    found = [
        f"caption says {n} {cat}: GT has {gt.counts.get(cat, 0)}, top-1 has {top.counts.get(cat, 0)}"
        for cat, n in facts.counts.items()
        if gt.counts.get(cat, 0) == n and top.counts.get(cat, 0) != n
    ]
    return "; ".join(found) or None


def rule_spatial(facts: CaptionFacts, gt: ImageFacts, top: ImageFacts) -> str | None:
    """Spatial: a stated left/right/above/below relation holds in the GT's boxes and not in the top-1's."""
    found = []
    for kind, x, y in facts.relations:
        if relation_holds(kind, x, y, gt) is True and relation_holds(kind, x, y, top) is False:
            what = f"{x} {kind} of {y}" if y else f"{x} on the {kind}" if kind in ("left", "right") else f"{x} {kind}"
            found.append(f"{what}: holds in GT, not in top-1")
    return "; ".join(found) or None


def rule_ambiguous(top1_cos: float | None, own_cos: float | None, gt: ImageFacts | None, top: ImageFacts | None):
    """Ambiguous: the top-1's captions match the query as well as its own image's other captions do,
    or the GT and the top-1 have the same non-empty category set. Returns (evidence, is_same_categories)."""
    parts = []
    same = None
    if gt is not None and top is not None:
        same = bool(gt.categories) and gt.categories == top.categories
        if same:
            parts.append("GT and top-1 have the same categories (" + ", ".join(sorted(gt.categories)) + ")")
    if top1_cos is not None and own_cos is not None and top1_cos >= own_cos:
        parts.append(f"a top-1 caption is as close to the query ({top1_cos:.3f}) as its own image's ({own_cos:.3f})")
    return ("; ".join(parts) or None), same


def rule_blame(blame) -> tuple[str, str] | None:
    """(category, evidence) when the explain run's blamed phrase moves the ground truth up by at least
    BLAME_MIN_RANK_GAIN ranks (pessimistic), else None. `blame`: the failure's failure_blame row (or None)."""
    if blame is None or blame.get("blamed_category") is None or not blame["rank_gain"] >= BLAME_MIN_RANK_GAIN:
        return None
    ev = (
        f"the model hangs on the {blame['blamed_role']} '{blame['blamed_phrase']}': without it the ground truth "
        f"moves from rank {int(blame['before'])} to {int(blame['after'])} (explain run {int(blame['explain_run_id'])})"
    )
    return str(blame["blamed_category"]), ev


def _blame(con, rrid: int) -> tuple[int | None, dict[int, dict]]:
    """(newest explain run of the retrieval run or None, caption_id -> its failure_blame row)."""
    row = con.execute("SELECT max(explain_run_id) FROM explain_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()
    if row is None or row[0] is None:
        return None, {}
    df = con.execute(
        "SELECT caption_id, explain_run_id, blamed_role, blamed_category, blamed_phrase, rank_gain, "
        "gt_rank_before_pessimistic AS before, gt_rank_after_pessimistic AS after FROM failure_blame "
        "WHERE explain_run_id = ?",
        [int(row[0])],
    ).df()
    recs = df.astype(object).where(df.notna(), None).to_dict("records")
    return int(row[0]), {int(r["caption_id"]): r for r in recs}


def rule_lexicon(caption: str) -> tuple[str, str] | None:
    """Attribute if the caption has an attribute phrase, else Action if it has an action phrase
    (the {attributes} and {actions} slots of toolkit.labels.phrases)."""
    tokens = phrases.tokenize(caption)
    attributes = phrases.extract_attributes(tokens)
    if attributes:
        return "Attribute", "attribute phrase: " + ", ".join(dict.fromkeys(attributes))
    actions = phrases.extract_actions(tokens)
    if actions:
        return "Action", "action phrase: " + ", ".join(dict.fromkeys(actions))
    return None


# ---------------------------------------------------------------------------------------------
# The stage


def _caption_cosines(con, run: dict, failures: pd.DataFrame, subset_caps: pd.DataFrame):
    """For each failure: best cosine of the query with the top-1's captions and with its own image's other captions."""
    emb = artifacts.load_embedding_set(
        con,
        int(run["text_embedding_set_id"]),
        fix="Re-create the text embeddings with clipfail embed, then clipfail evaluate, or restore the file.",
    )
    x = emb.array.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1, norms)
    row_of = {int(c): i for i, c in enumerate(emb.item_ids)}
    rows_by_image: dict[int, list[int]] = defaultdict(list)
    for cid, iid in zip(subset_caps["caption_id"], subset_caps["image_id"]):
        r = row_of.get(int(cid))
        if r is not None:
            rows_by_image[int(iid)].append(r)
    top1_cos, own_cos = [], []
    for cid, gt, top in zip(failures["query_id"], failures["gt_id"], failures["top1_id"]):
        q = row_of.get(int(cid))
        if q is None:
            top1_cos.append(None)
            own_cos.append(None)
            continue
        t_rows = rows_by_image.get(int(top), [])
        o_rows = [r for r in rows_by_image.get(int(gt), []) if r != q]
        top1_cos.append(float((x[t_rows] @ x[q]).max()) if t_rows else None)
        own_cos.append(float((x[o_rows] @ x[q]).max()) if o_rows else None)
    return top1_cos, own_cos, emb


def triage(con, retrieval_run_id: int | None = None, *, hub_factor: float = DEFAULT_HUB_FACTOR) -> TriageResult:
    """Suggest a category, with evidence, for every R@1 failure of a text-to-image retrieval run."""
    started = db.now()
    _check_hub_factor(hub_factor)
    run = resolve_retrieval_run(con, retrieval_run_id, need="ranks", purpose="triage")
    rrid = int(run["retrieval_run_id"])
    subset_id = int(run["subset_id"])
    ranks = con.execute(
        "SELECT query_id, gt_id, gt_rank, top1_id FROM retrieval_ranks WHERE retrieval_run_id = ? ORDER BY query_id",
        [rrid],
    ).df()
    failures = ranks.loc[ranks["gt_rank"] > 1].reset_index(drop=True)
    if failures.empty:
        return TriageResult(rrid, None, None, 0)
    n_gallery = con.execute("SELECT count(*) FROM subset_images WHERE subset_id = ?", [subset_id]).fetchone()[0]
    hub_threshold = max(2, math.ceil(hub_factor * len(ranks) / max(int(n_gallery), 1)))
    inst_file = con.execute("SELECT source_sha256 FROM instance_files WHERE subset_id = ?", [subset_id]).fetchone()
    text_sha = con.execute(
        "SELECT sha256 FROM embedding_sets WHERE embedding_set_id = ?", [int(run["text_embedding_set_id"])]
    ).fetchone()
    config = {
        "retrieval_run_id": rrid,
        "rules": RULES_VERSION,
        "hub_factor": hub_factor,
        "instances_sha256": inst_file[0] if inst_file else None,
        "text_embeddings_sha256": text_sha[0] if text_sha else None,
    }
    positive_sets = [
        int(r[0])
        for r in con.execute(
            "SELECT max(positive_set_id) FROM positive_sets WHERE subset_id = ? GROUP BY source ORDER BY 1", [subset_id]
        ).fetchall()
    ]
    if positive_sets:  # only then in the config: a study without extended positives keeps its triage runs
        config["verified_positive_sets"] = positive_sets
    explain_run_id, blame = _blame(con, rrid)
    if explain_run_id is not None:  # absent without one, so that older triage runs stay no-ops
        config["explain_run_id"] = explain_run_id
    chash = db.config_hash(config)
    done = con.execute(
        "SELECT triage_run_id, run_id FROM triage_runs WHERE retrieval_run_id = ? AND config_hash = ? "
        "ORDER BY triage_run_id DESC LIMIT 1",
        [rrid, chash],
    ).fetchone()
    if done:
        return _result(con, rrid, int(done[0]), int(done[1]), len(failures), True, inst_file is not None, hub_threshold)

    subset_caps = con.execute(
        "SELECT caption_id, image_id FROM subset_captions WHERE subset_id = ? ORDER BY caption_id", [subset_id]
    ).df()
    texts = dict(
        con.execute(
            "SELECT c.caption_id, c.text FROM captions c JOIN subset_captions s USING (caption_id) "
            "WHERE s.subset_id = ?",
            [subset_id],
        ).fetchall()
    )
    top1_cos, own_cos, _emb = _caption_cosines(con, run, failures, subset_caps)
    k_occ = ranks["top1_id"].value_counts()
    facts_by_image, known, index = _object_facts(con, failures, inst_file is not None)
    longest = max(len(k) for k in index)
    verified = dict(
        con.execute(
            "SELECT query_id, verifying_sources FROM failure_false_negatives "
            "WHERE retrieval_run_id = ? AND is_top1_extended_positive",
            [rrid],
        ).fetchall()
    )
    records = []
    for i, row in enumerate(failures.itertuples(index=False)):
        caption = texts.get(int(row.query_id), "")
        facts = caption_facts(caption, index, longest)
        k = int(k_occ.get(row.top1_id, 0))
        hub = k >= hub_threshold
        records.append(
            _suggestion(
                row, caption, facts, facts_by_image, known, top1_cos[i], own_cos[i], k, hub,
                verified=verified.get(int(row.query_id)), blame=blame.get(int(row.query_id)),
            )
        )  # fmt: skip
    df = _frame(records)
    with db.transaction(con):
        stage_run = db.insert_run(con, STAGE, config, started)
        triage_run_id = con.execute(
            "INSERT INTO triage_runs (retrieval_run_id, is_instances_used, hub_threshold, n_failures, config_hash, "
            "created_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING triage_run_id",
            [rrid, inst_file is not None, hub_threshold, len(df), chash, db.now(), stage_run],
        ).fetchone()[0]
        db.insert_df(con, "triage_suggestions", df.assign(triage_run_id=int(triage_run_id), retrieval_run_id=rrid))
    return _result(con, rrid, int(triage_run_id), stage_run, len(df), False, inst_file is not None, hub_threshold)


def _check_hub_factor(hub_factor) -> None:
    try:
        ok = not isinstance(hub_factor, bool) and 0 < float(hub_factor) <= HUB_FACTOR_MAX
    except (TypeError, ValueError, OverflowError):
        ok = False  # NaN compares false above
    if not ok:
        raise UserError(
            f"--hub-factor must be a number greater than 0 and at most {HUB_FACTOR_MAX:g} (got {hub_factor})."
        )


def _object_facts(con, failures: pd.DataFrame, has_instances: bool):
    """(image id -> ImageFacts of the failures' ground-truth and top-1 images, the COCO category names, the
    object index captions are matched with): empty facts and the default index without an instances file."""
    if not has_instances:
        return {}, set(), object_index()
    needed = pd.DataFrame({"image_id": pd.unique(pd.concat([failures["gt_id"], failures["top1_id"]]))})
    con.register("_triage_images", needed)
    try:
        inst = con.execute(
            "SELECT ii.image_id, ii.category_name, ii.bbox_x, ii.bbox_y, ii.bbox_w, ii.bbox_h, ii.is_crowd "
            "FROM image_instances ii JOIN _triage_images USING (image_id)"
        ).df()
        sizes = con.execute(
            "SELECT i.image_id, i.width, i.height FROM images i JOIN _triage_images USING (image_id)"
        ).df()
    finally:
        con.unregister("_triage_images")
    known = {r[0] for r in con.execute("SELECT DISTINCT name FROM coco_categories").fetchall()}
    return image_facts(inst, sizes), known, object_index(sorted(known))


def _suggestion(
    row,
    caption,
    facts,
    facts_by_image,
    known,
    top1_cos,
    own_cos,
    k: int,
    is_hub: bool,
    verified: str | None = None,
    blame=None,
) -> dict:
    """The rules on one failure: the first rule in order that fired (Object, Count, Spatial, the model's blame,
    Ambiguous, the lexicon), with the evidence (without blame: the first category in PRIORITY); before them all
    the Verified rule where `verified` names the sources that list the top-1 image as a positive."""
    gt = facts_by_image.get(int(row.gt_id))
    top = facts_by_image.get(int(row.top1_id))
    found: dict[str, str] = {}
    obj = cnt = spa = None
    if gt is not None and top is not None:
        obj = rule_object(facts, gt, top, known)
        cnt = rule_count(facts, gt, top)
        spa = rule_spatial(facts, gt, top)
        for name, ev in (("Object", obj), ("Count", cnt), ("Spatial", spa)):
            if ev:
                found[name] = ev
    amb, same = rule_ambiguous(top1_cos, own_cos, gt, top)
    if amb:
        found["Ambiguous"] = amb
    lex = rule_lexicon(caption)
    if lex:
        found[lex[0]] = lex[1]
    blamed = rule_blame(blame)
    by_rules = [c for c in PRIORITY if c in found]
    suggestion = by_rules[0] if by_rules else None
    score = RULE_SCORES[suggestion] if suggestion else None
    evidence = f"{suggestion}: {found[suggestion]}" if suggestion else "no rule fired"
    if blamed and not any(c in found for c in ("Object", "Count", "Spatial")):
        suggestion, score = blamed[0], BLAME_SCORE
        evidence = f"{suggestion}: {blamed[1]}"
    fired = [c for c in PRIORITY if c in found or (blamed and blamed[0] == c)]  # the blamed category included
    if verified:
        fired.insert(0, VERIFIED_RULE)
        suggestion, score = "Ambiguous", VERIFIED_SCORE
        evidence = f"Ambiguous: the top-1 image is a verified positive of this caption (ECCV Caption / CxC: {verified})"
    if gt is None or top is None:
        evidence += " (no object instances ingested)"
    if is_hub:
        evidence += f"; hub: top-1 is the top-1 of {k} queries"
    return {
        "caption_id": int(row.query_id),
        "gt_image_id": int(row.gt_id),
        "top1_image_id": int(row.top1_id),
        "gt_rank": int(row.gt_rank),
        "suggested_category": suggestion,
        "score": score,
        "evidence": evidence,
        "rules_fired": ",".join(fired),
        "mentioned_objects": ",".join(facts.mentioned) or None,
        "object_evidence": obj,
        "count_evidence": cnt,
        "spatial_evidence": spa,
        "top1_caption_cosine": top1_cos,
        "own_caption_cosine": own_cos,
        "is_same_categories": same,
        "top1_k_occurrence": k,
        "is_hub": is_hub,
        "blame_evidence": blamed[1] if blamed else None,
    }


def _frame(records: list[dict]) -> pd.DataFrame:
    """The suggestions as triage_suggestions' columns (nullable numbers and booleans typed as such)."""
    df = pd.DataFrame.from_records(records)
    df["score"] = df["score"].astype("float64")
    for col in ("top1_caption_cosine", "own_caption_cosine"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df["is_same_categories"] = df["is_same_categories"].astype("boolean")
    return df


def _result(con, rrid, triage_run_id, run_id, n, is_noop, used, hub_threshold) -> TriageResult:
    rows = con.execute(
        "SELECT coalesce(suggested_category, '(none)'), count(*) FROM triage_suggestions WHERE triage_run_id = ? "
        "GROUP BY 1",
        [triage_run_id],
    ).fetchall()
    order = {c: i for i, c in enumerate((*PRIORITY, "(none)"))}
    counts = dict(sorted(((c, int(k)) for c, k in rows), key=lambda t: order.get(t[0], 99)))
    return TriageResult(rrid, triage_run_id, run_id, n, is_noop, used, hub_threshold, counts)


def latest_suggestions(con, retrieval_run_id: int) -> pd.DataFrame:
    """caption_id, suggested_category, evidence, score, triage_run_id of the newest triage run of a retrieval run
    (empty if none)."""
    return con.execute(
        "SELECT caption_id, suggested_category, evidence, score, triage_run_id FROM triage_suggestions "
        "WHERE triage_run_id = "
        "(SELECT max(triage_run_id) FROM triage_runs WHERE retrieval_run_id = ?)",
        [retrieval_run_id],
    ).df()


def add_suggestions(con, retrieval_run_id: int, rows: list[dict], show_on_overlap: bool = False) -> None:
    """Fill `suggested_category` and `evidence` of exported CSV rows from the newest triage run.

    Rows of the overlap set stay blank unless `show_on_overlap`: the overlap labels measure agreement
    (between annotators, and of the suggestions with them), which a visible suggestion would bias.
    Without a triage run both columns stay blank.
    """
    found = latest_suggestions(con, retrieval_run_id)
    by_caption = {
        int(c): (s if isinstance(s, str) else "", e)
        for c, s, e in zip(found["caption_id"], found["suggested_category"], found["evidence"])
    }
    for rec in rows:
        rec["suggested_category"], rec["evidence"] = "", ""
        if rec.get("set_name") == "overlap" and not show_on_overlap:
            continue
        hit = by_caption.get(int(rec["caption_id"]))
        if hit:
            rec["suggested_category"] = hit[0]
            rec["evidence"] = hit[1] if hit[0] else ""
