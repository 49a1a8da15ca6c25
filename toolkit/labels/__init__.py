"""Labels: which failures people look at, and the categories they give them.

Reads a retrieval run's ranks; writes `failure_samples` (and the CSVs, pictures and exports that
annotators work from), `triage_runs` and `triage_suggestions`, `annotations`, and the taxonomy's
`categories` and `category_aliases`. `sample` is the `clipfail sample-failures` stage, `triage`
suggests a category per failure from evidence (`clipfail triage`), `taxonomy` holds the categories
and turns a free-text label into one, `phrases` is the lexicon-based phrase extractor that triage
and the prompt templates share, `label_import` imports filled-in label CSVs
(`clipfail import-labels`), `workbench` is the browser workbench (`clipfail annotate`),
`labelstudio` the Label Studio round trip, and `simulate` the seeded simulated annotators of the
demo.
"""
