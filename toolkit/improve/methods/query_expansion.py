"""The built-in method "query-expansion": Rocchio-style pseudo-relevance feedback (alpha query expansion).

Each caption moves towards the mean of its top-`top` images under the raw scores, q' = q + alpha * mean, and
is scored again with evaluate's GEMM (`toolkit.improve.transforms.expand_queries`); alpha 0 is the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.improve import bank
from toolkit.improve.methods import Method, MethodParams, option
from toolkit.improve.pooling import ALPHA_RANGE, DEFAULT_ALPHA, DEFAULT_TOP


@dataclass(frozen=True)
class QueryExpansionParams(MethodParams):
    top: int = option("--top", "images averaged in.", DEFAULT_TOP, "count", why="images averaged into the query")
    alpha: float = option(
        "--alpha", "their weight.", DEFAULT_ALPHA, "float", lo=ALPHA_RANGE[0], hi=ALPHA_RANGE[1],
        why="0 reproduces the baseline; above the maximum the caption's own embedding is lost in float32 rounding "
        "next to the expansion (and the scores overflow near 3e38).",
    )  # fmt: skip


class QueryExpansion(Method):
    name = "query-expansion"
    version = bank.HUBNESS_METHOD_VERSION
    Params = QueryExpansionParams
    summary = "Rocchio-style query expansion towards each caption's top images"

    def score(self, block):
        from toolkit.improve.transforms import expanded_scores

        p = block.params
        return expanded_scores(block.queries, block.scores, block.images, p.top, p.alpha)


METHOD = QueryExpansion()
