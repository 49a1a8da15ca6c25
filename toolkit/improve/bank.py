"""The normalising queries of inverted-softmax and qb-norm (and of their templates combinations).

inverted-softmax normalises over every caption of the retrieval run; qb-norm over a query bank: by default the
captions of the retrieval run's subset that the call does not evaluate, or (``--bank``) another subset's captions
of the same model, refused when they hold an evaluated caption unless ``--allow-bank-overlap`` (the run row then
has is_bank_overlap = true, and the report says so).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from toolkit.errors import UserError
from toolkit.improve.methods import Method, option, params_text
from toolkit.improve.pooling import BETA_RANGE, DEFAULT_BETA, DEFAULT_K_BANK
from toolkit.store import db


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


HUBNESS_METHOD_VERSION = "hubness/v1"  # part of the configuration of inverted-softmax, qb-norm, query-expansion runs


def _text_set_of(con, subset_id: int, identity: dict) -> dict | None:
    """The newest text embedding set of a subset made by the same model (identity as stage.model_identity)."""
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
    """Check and describe the normalising queries (see the module docstring); a UserError for a bad bank."""
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


# ------------------------------------------------------------------------------ the methods that normalise


def beta_option():
    lo, hi = BETA_RANGE
    return option(
        "--beta", "", DEFAULT_BETA, "float", lo=lo, hi=hi,
        why=f"it scales the scores before the softmax; at 0 every image would tie, and below {lo:g} distinct scores "
        f"round to the same value and tie too. The QB-Norm paper uses {DEFAULT_BETA:g}.",
    )  # fmt: skip


def bank_options() -> dict:
    """The qb-norm fields besides --beta: --k-bank, --bank, --allow-bank-overlap."""
    return {
        "k_bank": option("--k-bank", "top-k of each bank caption.", DEFAULT_K_BANK, "count"),
        "bank": option("--bank", "a subset whose captions form the bank (default: see README).", None, "text"),
        "allow_bank_overlap": option(
            "--allow-bank-overlap", "run even if the bank holds evaluated captions.", False, "flag"
        ),
    }


def normaliser_params(normaliser: str, params) -> dict:
    """The normaliser's parameters as the configuration records them (qb-norm adds the bank's name later)."""
    out = {"beta": float(params.beta)}
    if normaliser == "qb-norm":
        out["k_bank"] = int(params.k_bank)
    return out


def plan_for(con, run, pops, normaliser: str) -> NormaliserPlan:
    """Check the normalising queries of `run` (the bank refused if it leaks) and record them in the run."""
    evaluated = sorted({int(c) for pop in pops for c in pop.captions["caption_id"]})
    p = run.params
    plan = plan_normaliser(con, normaliser, run.rr, run.text_set, run.identity, evaluated,
                           normaliser_params(normaliser, p), getattr(p, "bank", None),
                           bool(getattr(p, "allow_bank_overlap", False)))  # fmt: skip
    run.plan["norm"] = plan
    run.method_params = params_text(plan.params)
    return plan


def bank_stats_of(con, run, images, texts):
    """The normaliser's `transforms.BankStats` over the images (loaded once per call)."""
    plan = run.plan["norm"]
    fix = "Re-run clipfail embed (with --recompute) and clipfail evaluate."
    return plan.load(images.array, load_bank_texts(con, plan, texts, fix))


class NormalisedMethod(Method):
    """inverted-softmax and qb-norm: a score transform whose normaliser comes from a set of captions."""

    version = HUBNESS_METHOD_VERSION
    needs_bank = True

    def attach(self, con, run, pops) -> None:
        plan_for(con, run, pops, self.name)

    def config(self, run) -> dict:
        plan = run.plan["norm"]
        return super().config(run) | {"params": plan.params} | plan.signature

    def load(self, con, run, pops, images, texts):
        return bank_stats_of(con, run, images, texts)

    def columns(self, run, pop, key) -> dict:
        return super().columns(run, pop, key) | run.plan["norm"].info

    def run_config(self, run, state) -> dict:
        return super().run_config(run, state) | {"n_bank": run.plan["norm"].info["n_bank"]}
