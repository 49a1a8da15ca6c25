"""The built-in method "inverted-softmax": each caption's scores over the normaliser of every caption of the run.

Smith et al., ICLR 2017 (see `toolkit.improve.transforms`): s'_qj = beta * s_qj - log Z_j, ranked in the log
domain; the normaliser Z_j is taken over every caption of the retrieval run (the transductive setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.improve import bank
from toolkit.improve.methods import MethodParams


@dataclass(frozen=True)
class InvertedSoftmaxParams(MethodParams):
    beta: float = bank.beta_option()


class InvertedSoftmax(bank.NormalisedMethod):
    name = "inverted-softmax"
    Params = InvertedSoftmaxParams
    summary = "inverted softmax over every caption of the retrieval run (hubness)"

    def score(self, block):
        from toolkit.improve.transforms import inverted_softmax

        return inverted_softmax(block.scores, block.state.log_norm, block.state.beta)


METHOD = InvertedSoftmax()
