"""Improve: text-side fixes of the failures, without retraining, stored as runs.

Reads the labelled failures of a retrieval run, the text and image embedding sets and the prompt
templates; writes `prompt_templates` (import), `prompts`, `improvement_runs`, `improvement_ranks`
and `improvement_stats`, from which the improvement views are computed. `stage` is the
`clipfail improve` stage (prompt ensembling and the score-transform methods), `templates` holds
the template sets as data, `pooling` pools a caption's K prompt scores per image, and `transforms`
holds the training-free score transforms against hubness (inverted softmax, QB-Norm) and query
expansion; the hubness measurement itself is SQL (views `image_hubness`, `hubness_summary`).
"""
