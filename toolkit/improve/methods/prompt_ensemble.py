"""The built-in method "templates": category-aware prompt ensembling with max/mean/logsumexp pooling.

Steps 2 to 4 of `toolkit.improve.stage` (see its module docstring): each caption becomes up to K distinct
prompts (its category's templates, or the union), prompt embeddings come from the cache or are encoded once,
every prompt is scored against every image with evaluate's GEMM, and the K scores per image are pooled. One
improvement run per (population, pooling). `TemplatesThen` (methods.combinations) adds a normaliser on the
pooled scores.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit.errors import UserError
from toolkit.improve import pooling, templates
from toolkit.improve import stage as S
from toolkit.improve.methods import COUNT_MAX, Method, MethodParams, option
from toolkit.labels import phrases
from toolkit.store import db
from toolkit.store import paths as study_paths


@dataclass(frozen=True)
class TemplatesParams(MethodParams):
    poolings: object = option("--pooling", "max, mean, logsumexp, or all (comma list ok).", "logsumexp", "text")
    tau: float = option(
        "--tau", "logsumexp temperature.", 1.0, "float", lo=pooling.TAU_RANGE[0], hi=pooling.TAU_RANGE[1],
        why="the logsumexp temperature; near 0 it pools as max, at large values as mean, and beyond the range the "
        "pooled scores under- or overflow.",
    )  # fmt: skip
    template_set: str = option("--template-set", "prompt-template set (see clipfail templates list).",
                               templates.DEFAULT_SET, "text")  # fmt: skip
    template_mode: str = option(
        "--template-mode",
        "own: each caption gets its category's templates; union: every chosen category's, in order, cut at --k.",
        "own", "choice", choices=("own", "union"),
    )  # fmt: skip
    k: int = option("--k", "distinct prompts per caption.", S.DEFAULT_K, "int", lo=1, hi=COUNT_MAX)
    recompute_prompts: bool = option(
        "--recompute-prompts", "drop and re-encode this model's cached prompt embeddings.", False, "flag"
    )

    def check(self) -> None:
        object.__setattr__(self, "poolings", S.parse_poolings(self.poolings))
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float, np.integer)) or int(k) != k or int(k) < 1:
            raise UserError(
                f"--k must be a whole number of at least 1 (got {k}): prompts per caption, itself included."
            )
        object.__setattr__(self, "k", int(k))


@dataclass
class PromptMatrix:
    """Every prompt embedding the scoring needs (step 3's result)."""

    P: np.ndarray  # the caption text rows first, then the other prompts
    index: dict[str, list[list[int]]]  # population -> per caption, its prompts' rows of P
    other: list[str]  # the distinct prompt texts that are not their caption
    new_texts: list[str]  # of which encoded now
    new_arr: np.ndarray | None  # their embeddings, in new_texts order
    drop_ids: list[int]  # prompt shards of this model that --recompute-prompts replaces
    n_identity: int = 0  # prompts that are their caption
    Gt: object = None  # the image embeddings as a torch tensor, transposed
    post: object = None  # a transform of the pooled scores (a combination)
    device: str = "cpu"  # where the prompts are scored (the retrieval run's device type, when this machine has it)


class Templates(Method):
    name = "templates"
    version = S.METHOD
    Params = TemplatesParams
    needs_prompts = True
    uses_scores = False
    summary = "category-aware prompt ensembling, scores pooled per image (max, mean, logsumexp)"

    def prepare(self, con, run) -> None:
        p = run.params
        tdf = templates.load_set(con, p.template_set)
        per_cat, union = S.template_lists(tdf, run.categories, p.template_mode, p.k)
        run.plan.update(per_cat=per_cat, union=union, templates_sha256=templates.templates_sha256(tdf))
        run.method_params = None  # the templates' settings have their own columns

    def attach(self, con, run, pops) -> None:
        p = run.params
        for pop in pops:
            caps = pop.captions
            if pop.name == "failures":
                pop.templates = [run.plan["per_cat"][c] for c in caps["category"]]
                pop.k_per_category = {c: p.k for c in run.categories if (caps["category"] == c).any()}
            else:
                pop.templates = [run.plan["union"]] * len(caps)
                pop.k_per_category = {"*": p.k}
        self.attach_normaliser(con, run, pops)
        build_prompts(pops, run)

    def attach_normaliser(self, con, run, pops) -> None:
        """A combination's normalising queries, checked before any encoding (TemplatesThen)."""

    def config(self, run) -> dict:
        p = run.params
        return {
            "method": S.METHOD,
            "template_set": p.template_set,
            "templates_sha256": run.plan["templates_sha256"],
            "template_mode": p.template_mode,
            "k": p.k,
            "score_device": run.score_device.split(":")[0],
        }

    def variants(self, run):
        tau = run.params.tau
        return [(pl, {"pooling": pl, "tau": tau if pl == "logsumexp" else None}) for pl in run.params.poolings]

    def signature_rows(self, pop) -> list:
        return [row + [prs] for row, prs in zip(super().signature_rows(pop), pop.prompts)]

    def notes(self, run) -> list[str]:
        return [run.device_note] if run.device_note else []

    def must_run(self, con, run) -> bool:
        return bool(run.params.recompute_prompts and S.prompt_shards(con, run.identity))

    def load(self, con, run, pops, images, texts) -> PromptMatrix:
        import torch

        m = encode_or_reuse_prompts(con, run, pops, texts)
        m.Gt = torch.from_numpy(np.ascontiguousarray(images.array, dtype=np.float32)).T
        m.device = run.score_device
        m.post = self.normaliser(con, run, images, texts)
        return m

    def normaliser(self, con, run, images, texts):
        """A transform of each block of pooled scores (TemplatesThen), or None."""
        return None

    def blocks(self, pop, state: PromptMatrix):
        """Captions with the same K together, so that the (c, K, M) score blocks are rectangular."""
        ks = np.array([len(p) for p in pop.prompts])
        step_of = {int(K): max(1, S.SCORE_BUDGET // (int(K) * state.Gt.shape[1])) for K in np.unique(ks)}
        for K, step in step_of.items():
            members = np.flatnonzero(ks == K)
            for s in range(0, len(members), step):
                yield members[s : s + step]

    def score_variants(self, block) -> dict:
        from toolkit.retrieval import ranking as retrieval  # torch: only once there is something to score

        m: PromptMatrix = block.state
        idx = np.array([m.index[block.population][i] for i in block.rows], dtype=np.int64)  # (c, K) rows of P
        n, K = idx.shape
        Sc = retrieval.score_rows(m.P[idx.reshape(-1)], m.Gt.T, device=m.device).reshape(n, K, m.Gt.shape[1])
        out = {}
        for pl in block.params.poolings:
            pooled = pooling.pool_scores(Sc, pl, tau=block.params.tau)
            out[pl] = m.post(pooled) if m.post is not None else pooled
        return out

    def caption_columns(self, pop, state) -> dict:
        ks = np.array([len(p) for p in pop.prompts])
        n_distinct = np.array([len({phrases.prompt_key(t) for t in p}) for p in pop.prompts])
        return {"n_prompts": ks.astype(np.int32), "n_distinct_prompts": n_distinct.astype(np.int32)}

    def columns(self, run, pop, key) -> dict:
        p = run.params
        return {
            "pooling": key,
            "tau": p.tau if key == "logsumexp" else None,
            "template_set": p.template_set,
            "templates_sha256": run.plan["templates_sha256"],
            "template_mode": p.template_mode,
            "k_per_category": json.dumps(pop.k_per_category),
            "k_prompts": p.k,
            "method": self.name,
            "method_params": run.method_params,
        }

    def run_config(self, run, state) -> dict:
        p = run.params
        return {
            "poolings": p.poolings,
            "tau": p.tau,
            "score_device": run.score_device,
            "retrieval_device": run.recorded_device,
            "score_device_note": run.device_note,
            "recompute_prompts": bool(p.recompute_prompts),
            "dropped_prompt_shards": state.drop_ids,
        }

    def write(self, con, run, state, run_id, started) -> None:
        if state.drop_ids:
            con.execute("DELETE FROM embedding_rows WHERE list_contains(?, embedding_set_id)", [state.drop_ids])
            con.execute("DELETE FROM embedding_sets WHERE list_contains(?, embedding_set_id)", [state.drop_ids])
        if state.new_texts:
            write_prompt_shard(con, run, state, run_id, started)

    def non_finite_context(self, run) -> tuple:
        return (run.params.poolings, run.params.tau)

    def fill_result(self, result, state) -> None:
        result.n_prompts = len(state.other)
        result.n_encoded = len(state.new_texts)
        result.n_identity = state.n_identity


METHOD = Templates()


def build_prompts(pops, run) -> None:
    """Step 2: fill each caption's prompts (`phrases.build_prompts`, up to K distinct texts, the caption first).
    Refuses, before anything is encoded, a set that gives no failure a prompt besides its caption."""
    p = run.params
    slot_cache: dict[str, dict[str, str]] = {}
    for pop in pops:
        for text, tl in zip(pop.captions["text"], pop.templates):
            slots = slot_cache.get(text)
            if slots is None:
                slots = slot_cache[text] = phrases.extract(text)
            pop.prompts.append(phrases.build_prompts(text, tl, p.k, slots))
    subset = pops[0]
    if p.k >= 2 and all(len(prs) == 1 for prs in subset.prompts):
        raise UserError(
            f"Template set {p.template_set!r} ({p.template_mode} mode) gives none of the {len(subset.prompts)} "
            f"captions of the subset a prompt other than the caption itself: each template either uses a slot that "
            f"the phrase extractor finds empty in them or gives the caption's own text again (see clipfail templates "
            f"list --set {p.template_set}). Nothing was encoded or written. Use a set whose templates apply (the "
            f"default {templates.DEFAULT_SET} has templates that always do), or --k 1 for the baseline itself."
        )


def recompute_prompts_command(con, run) -> str:
    """The improve command line of this call with --recompute-prompts (what a damaged prompt shard needs)."""
    p, ctl = run.params, run.control
    parts = ["improve", "--categories", ",".join(run.categories)]
    parts += ["--run", str(run.rrid), "--pooling", ",".join(p.poolings)]
    parts += ["--tau", f"{p.tau:g}"] if "logsumexp" in p.poolings else []
    parts += ["--template-set", p.template_set, "--template-mode", p.template_mode, "--k", str(p.k)]
    parts += ["--seed", str(run.seed)]
    parts += ["--max-subset", str(run.max_subset)] if run.max_subset is not None else []
    parts += ["--include-overlap"] if run.include_overlap else []
    if ctl is not None:
        parts += ["--control", "all" if ctl[0] == "all" else f"successes:{ctl[1]}"]
    args = " ".join(shlex.quote(x) for x in parts + ["--recompute-prompts"])
    return f"{db.clipfail_command(con, always=True)} {args}"


def _cached_vectors(con, run, have: dict) -> dict[str, np.ndarray]:
    from toolkit.store.artifacts import load_embedding_set

    shard_fix = (
        "Encode this model's cached prompts again (the damaged shard is dropped in the same transaction) with: "
        + recompute_prompts_command(con, run)
    )
    vec: dict[str, np.ndarray] = {}
    for set_id, grp in pd.DataFrame(
        {"text": list(have), "set": [v[0] for v in have.values()], "row": [v[1] for v in have.values()]}
    ).groupby("set"):
        arr = load_embedding_set(con, int(set_id), fix=shard_fix).array
        for t, r in zip(grp["text"], grp["row"]):
            vec[t] = arr[int(r)]
    return vec


def _encode(con, run, new_texts: list[str], dim: int) -> np.ndarray:
    encoder = run.io.encoder
    if encoder is None:
        make = run.io.encoder_factory or S.model_encoder_factory()
        set_config = study_paths.resolve_keys(con, json.loads(run.text_set["config_json"] or "{}"), ("checkpoint",))
        encoder = make(dict(run.identity, config=set_config))
    new_arr = np.asarray(encoder(list(new_texts)), dtype=np.float32)
    if new_arr.shape != (len(new_texts), dim):
        raise RuntimeError(f"encoder returned shape {new_arr.shape}, expected {(len(new_texts), dim)}")
    return new_arr


def encode_or_reuse_prompts(con, run, pops_run, txt) -> PromptMatrix:
    """Step 3: the embedding of every prompt of `pops_run`. A prompt that is its caption takes the caption's row
    of the text embedding set; the others come from the prompt cache, and only those not cached (all of this
    model's cached texts too, with --recompute-prompts) are encoded."""
    identity = run.identity
    other = sorted(
        {pr for pop in pops_run for text, prs in zip(pop.captions["text"], pop.prompts) for pr in prs if pr != text}
    )
    drop_ids: list[int] = []
    if run.params.recompute_prompts:
        drop_ids = S.prompt_shards(con, identity)
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
        cached = S.cached_prompts(con, identity, other)
        have = dict(zip(cached["text"], zip(cached["embedding_set_id"], cached["row_index"])))
        new_texts = [t for t in other if t not in have]
    dim = txt.array.shape[1]
    vec = _cached_vectors(con, run, have)
    new_arr = _encode(con, run, new_texts, dim) if new_texts else None
    if new_texts:
        vec.update(zip(new_texts, new_arr))

    # prompt matrix: the caption text rows first, then the other prompts
    text_rows = sorted({int(r) for pop in pops_run for r in pop.captions["text_row"]})
    pos_text = {r: i for i, r in enumerate(text_rows)}
    pos_other = {t: len(text_rows) + i for i, t in enumerate(other)}
    P = np.empty((len(text_rows) + len(other), dim), dtype=np.float32)
    P[: len(text_rows)] = txt.array[text_rows]
    for t, i in pos_other.items():
        P[i] = vec[t]
    index, n_identity = {}, 0
    for pop in pops_run:
        rows = []
        for text, row, prs in zip(pop.captions["text"], pop.captions["text_row"], pop.prompts):
            rows.append([pos_text[int(row)] if pr == text else pos_other[pr] for pr in prs])
            n_identity += sum(pr == text for pr in prs)
        index[pop.name] = rows
    return PromptMatrix(P, index, other, list(new_texts), new_arr, drop_ids, n_identity)


def write_prompt_shard(con, run, m: PromptMatrix, run_id: int, started) -> None:
    """The new prompt texts (a prompts row each, unless another model cached them) and their shard file."""
    from toolkit.store.artifacts import register_embedding_set, save_array

    new_texts, identity = m.new_texts, run.identity
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
    cache_dir = run.io.cache_dir
    shard_dir = Path(cache_dir) if cache_dir is not None else study_paths.prompt_cache_dir(con)
    tag = f"-r{S._sha(started.isoformat())[:8]}" if run.params.recompute_prompts else ""  # never the dropped file
    shard = shard_dir / f"prompts-{S._sha(identity)[:12]}-{S._sha(new_texts)[:16]}{tag}.npy"
    sha = save_array(shard, m.new_arr)
    register_embedding_set(
        con,
        kind="prompt",
        subset_id=None,
        model=identity["model"],
        pretrained=identity["pretrained"],
        checkpoint_sha256=identity["checkpoint_sha256"],
        precision=identity["precision"],
        config={"stage": getattr(run, "stage", S.STAGE), "model": identity, "n_prompts": len(new_texts)},
        path=shard,
        array=m.new_arr,
        item_ids=[ids[t] for t in new_texts],
        sha256=sha,
        run_id=run_id,
    )
