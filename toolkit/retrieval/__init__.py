"""Retrieval: exact ranks of every query, and what they say about a model.

Reads the embedding sets that embed registered; writes `retrieval_runs` and `retrieval_ranks`
(evaluate) and `run_comparisons`, `run_comparison_stats` (compare), from which the recall and
hubness views are computed. `ranking` computes exact ranks, top-k and Recall@K in bounded memory
(the tie policy lives here), `evaluate` is the `clipfail evaluate` stage, `compare` pairs two runs
of the same subset (`clipfail compare`), and `benchmark` runs embed and evaluate for many models
and tabulates them (`clipfail benchmark`).
"""
