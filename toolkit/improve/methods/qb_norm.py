"""The built-in method "qb-norm": QB-Norm with the Dynamic Inverted Softmax over a query bank.

Bogolin et al., CVPR 2022 (see `toolkit.improve.transforms`): a caption whose top-1 image is in the bank's
activation set gets the inverted-softmax scores over the bank, any other keeps its raw scores. The bank is, by
default, the captions of the retrieval run's subset that the call does not evaluate (`toolkit.improve.bank`).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.improve import bank
from toolkit.improve.methods import MethodParams

_BANK = bank.bank_options()


@dataclass(frozen=True)
class QbNormParams(MethodParams):
    beta: float = bank.beta_option()
    k_bank: int = _BANK["k_bank"]
    bank: str | None = _BANK["bank"]
    allow_bank_overlap: bool = _BANK["allow_bank_overlap"]


class QbNorm(bank.NormalisedMethod):
    name = "qb-norm"
    Params = QbNormParams
    summary = "QB-Norm with the Dynamic Inverted Softmax over a query bank (hubness)"

    def score(self, block):
        from toolkit.improve.transforms import dynamic_inverted_softmax

        st = block.state
        return dynamic_inverted_softmax(block.scores, st.log_norm, st.activated, st.beta)


METHOD = QbNorm()
