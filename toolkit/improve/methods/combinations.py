"""The built-in methods "templates+inverted-softmax" and "templates+qb-norm": prompt ensembling, then a normaliser.

The templates' pooled scores (one row per caption and pooling) are normalised with the method's normaliser
(`toolkit.improve.transforms.pooled_transform`), whose queries (every caption of the run, or the bank) are
scored as captions. One improvement run per (population, pooling), as for templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.improve import bank
from toolkit.improve.methods.prompt_ensemble import Templates, TemplatesParams

_BANK = bank.bank_options()


@dataclass(frozen=True)
class TemplatesInvertedSoftmaxParams(TemplatesParams):
    beta: float = bank.beta_option()


@dataclass(frozen=True)
class TemplatesQbNormParams(TemplatesParams):
    beta: float = bank.beta_option()
    k_bank: int = _BANK["k_bank"]
    bank: str | None = _BANK["bank"]
    allow_bank_overlap: bool = _BANK["allow_bank_overlap"]


class TemplatesThen(Templates):
    """Templates, then `normaliser` on the pooled scores."""

    is_combination = True
    needs_bank = True
    normaliser_name = ""

    def attach_normaliser(self, con, run, pops) -> None:
        bank.plan_for(con, run, pops, self.normaliser_name)  # before any encoding: a leaking bank is refused

    def config(self, run) -> dict:
        plan = run.plan["norm"]
        extra = {"combination": self.normaliser_name, "combination_params": plan.params} | plan.signature
        return super().config(run) | extra

    def normaliser(self, con, run, images, texts):
        from toolkit.improve.transforms import pooled_transform

        return pooled_transform(bank.bank_stats_of(con, run, images, texts), self.normaliser_name)

    def columns(self, run, pop, key) -> dict:
        return super().columns(run, pop, key) | run.plan["norm"].info


class TemplatesInvertedSoftmax(TemplatesThen):
    name = "templates+inverted-softmax"
    normaliser_name = "inverted-softmax"
    Params = TemplatesInvertedSoftmaxParams
    summary = "templates, then the inverted softmax on the pooled scores"


class TemplatesQbNorm(TemplatesThen):
    name = "templates+qb-norm"
    normaliser_name = "qb-norm"
    Params = TemplatesQbNormParams
    summary = "templates, then QB-Norm on the pooled scores"


TEMPLATES_INVERTED_SOFTMAX = TemplatesInvertedSoftmax()
TEMPLATES_QB_NORM = TemplatesQbNorm()
