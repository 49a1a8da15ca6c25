"""SQL views (one CREATE OR REPLACE VIEW per .sql file) and example queries (examples/).

`VIEWS` lists every view in the order it is applied: each view comes after every view it reads, so
one pass creates them all on a fresh database (no retries). A new queries/*.sql file must be added
here; toolkit.store.study.view_sql refuses a file that is missing from the list. Conventions: README.md.
"""

VIEWS = [
    # retrieval
    "recall_summary",
    "retrieval_run_provenance",  # reads retrieval_runs, subsets, embedding_sets
    # labels
    "sample_labels",  # reads failure_samples, annotations, categories
    "annotator_agreement",
    "failure_details",  # reads sample_labels
    "taxonomy_percentages",  # reads sample_labels
    "taxonomy_distribution",  # reads taxonomy_percentages
    "taxonomy_actionable",  # reads taxonomy_percentages
    "taxonomy_by_annotator",  # reads taxonomy_percentages
    "sample_label_counts",  # reads sample_labels
    # improvement
    "improvement_hits",  # reads improvement_ranks
    "improvement_ties",  # reads improvement_runs, improvement_hits
    "improvement_effective_k",  # reads improvement_ranks
    "improvement_headline",  # reads improvement_hits, improvement_stats, improvement_ties
    "improvement_recall",  # reads improvement_effective_k, improvement_headline
    "category_recall_delta",  # reads improvement_headline
    "improvement_recall_wide",  # reads improvement_recall, improvement_runs
    "improvement_subset_keys",  # reads improvement_runs, improvement_ranks
    "improvement_prompt_counts",  # reads improvement_effective_k
    # triage
    "triage_agreement",  # reads sample_labels
    "triage_confusion",  # reads sample_labels
    "triage_distribution",  # reads taxonomy_distribution
    # comparisons of two retrieval runs (issue 18)
    "run_pairs",  # reads run_comparisons, retrieval_ranks
    "run_comparison",  # reads run_pairs
    "failure_overlap_by_category",  # reads sample_labels, run_comparison
    # hubness and the methods of improve (issue 17)
    "image_hubness",  # reads retrieval_runs, embedding_rows, retrieval_ranks
    "hubness_summary",  # reads image_hubness
    "hubness_histogram",  # reads image_hubness
    "hub_ranking",  # reads image_hubness, retrieval_runs, subsets, images
    "method_comparison",  # reads improvement_runs, improvement_stats, categories, improvement_ties
    # phrase ablation (issue 28)
    "failure_blame",  # reads explain_runs, failure_ablations, retrieval_ranks, failure_samples
    "blame_by_category",  # reads explain_runs, failure_blame, sample_labels, categories
    "blame_agreement",  # reads explain_runs, failure_blame, annotations, failure_samples, sample_labels, triage_*
    "blame_examples",  # reads explain_runs, failure_ablations, failure_blame, retrieval_ranks, captions, images, ...
    # extended positives: ECCV Caption, CxC (issue 27)
    "positive_coverage",  # reads positive_sets, extra_positives, subset_captions
    "recall_extended",  # reads retrieval_runs, retrieval_ranks, subset_captions, positive_sets, extra_positives,
    # positive_ranks
    "failure_false_negatives",  # reads retrieval_runs, retrieval_ranks, subset_captions, positive_sets,
    # extra_positives, positive_ranks
    "false_negatives_by_category",  # reads sample_labels, failure_false_negatives, categories, retrieval_runs,
    # positive_sets
    "false_negatives_by_triage_rule",  # reads triage_runs, triage_suggestions, failure_false_negatives,
    # retrieval_runs, positive_sets
    "false_negatives_triage_agreement",  # reads triage_runs, triage_suggestions, annotations, failure_samples,
    # sample_labels, failure_false_negatives
    "improvement_positives",  # reads improvement_runs, retrieval_runs, improvement_ranks, positive_sets,
    # extra_positives, subset_captions
    "improvement_hits_extended",  # reads improvement_positives, improvement_ranks, improvement_positive_ranks,
    # positive_ranks
    "improvement_recall_extended",  # reads improvement_runs, positive_sets, improvement_hits_extended,
    # improvement_stats_extended, improvement_headline
    # clipfail status: one status_<stage> view per stage, all with the same columns (toolkit.report.status lists
    # every view named status_*, in stage_order, so a new stage adds its view here and nothing else)
    "runs_by_stage",  # reads runs
    "status_ingest",  # reads subsets, subset_images, subset_captions, embedding_sets
    "status_positives",  # reads positive_sets, subsets
    "status_embed",  # reads embedding_sets, subsets, retrieval_runs
    "status_evaluate",  # reads retrieval_runs, subsets, retrieval_ranks, failure_samples, triage_runs
    "status_compare",  # reads run_comparison, retrieval_runs
    "status_triage",  # reads triage_runs, triage_suggestions, retrieval_runs, subsets, failure_samples, annotations
    "status_sample_failures",  # reads failure_samples, annotations, retrieval_runs, subsets
    "status_import_labels",  # reads annotations, failure_samples, retrieval_runs, subsets, improvement_runs
    "status_explain",  # reads explain_runs, retrieval_runs, subsets
    "status_improve",  # reads improvement_runs, improvement_ranks, retrieval_runs, subsets
    "status_method_comparison",  # reads method_comparison, retrieval_runs, subsets
    "status_report",  # reads runs, retrieval_runs
]
