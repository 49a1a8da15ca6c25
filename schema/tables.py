"""Every table of a clipfail database, as SQLAlchemy Core metadata.

`toolkit.store.study` compiles these definitions with the DuckDB dialect and creates
whatever is missing each time a database is opened. Adding a table or a
nullable column is an upgrade that `clipfail init` (and every other command)
applies by itself; bump SCHEMA_VERSION whenever the declared schema changes so
that an older toolkit refuses a database written by a newer one.

Naming: plural table names, keys `<thing>_id`, timestamps `<event>_at`,
booleans `is_<x>`.
"""

import sqlalchemy as sa

# 2: improvement_runs' prompt columns (pooling, template_set, templates_sha256, template_mode, k_per_category) are
# nullable, NULL for a method without prompts (they held '' / 'none' / '{}' before); `toolkit.store.study` migrates
# a version-1 file (drops NOT NULL, placeholders -> NULL) in its upgrade transaction. A clipfail of version 1 would
# write the placeholders again and its views compare them with '=': it refuses a version-2 file instead.
SCHEMA_VERSION = 2

metadata = sa.MetaData()


def _id(name: str) -> sa.Column:
    """A BIGINT primary key filled from its own sequence."""
    seq = sa.Sequence(f"{name}_seq", metadata=metadata)
    return sa.Column(name, sa.BigInteger, seq, server_default=seq.next_value(), primary_key=True)


def _run_id() -> sa.Column:
    return sa.Column("run_id", sa.BigInteger, nullable=False)


Timestamp = sa.DateTime(timezone=True)

schema_info = sa.Table(
    "schema_info",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Provenance: one row per stage invocation that wrote something.
runs = sa.Table(
    "runs",
    metadata,
    _id("run_id"),
    sa.Column("stage", sa.Text, nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),  # canonical JSON
    sa.Column("config_hash", sa.Text, nullable=False),  # sha256 of config_json
    sa.Column("seed", sa.BigInteger),
    sa.Column("model", sa.Text),
    sa.Column("pretrained", sa.Text),
    sa.Column("package_version", sa.Text, nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp),
    sa.Column("status", sa.Text, nullable=False),  # 'completed' (rows are only ever committed complete)
)

# COCO images. image_id is the COCO image id; rel_path is relative to the
# image root recorded on the subset that uses it.
images = sa.Table(
    "images",
    metadata,
    sa.Column("image_id", sa.BigInteger, primary_key=True),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("rel_path", sa.Text, nullable=False),
)

# COCO caption annotations. caption_id is the COCO annotation id (for the
# Karpathy split file: its sentid).
captions = sa.Table(
    "captions",
    metadata,
    sa.Column("caption_id", sa.BigInteger, primary_key=True),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
)

subsets = sa.Table(
    "subsets",
    metadata,
    _id("subset_id"),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("seed", sa.BigInteger),
    sa.Column("num_images", sa.Integer, nullable=False),  # images actually in the subset
    sa.Column("captions_per_image", sa.Integer, nullable=False),  # requested maximum
    sa.Column("source_file", sa.Text, nullable=False),  # absolute path of the captions JSON
    sa.Column("source_sha256", sa.Text, nullable=False),
    sa.Column("image_root", sa.Text, nullable=False),  # absolute path; images.rel_path is below it
    sa.Column("split", sa.Text),  # Karpathy split name, 'coco5k-test' (ingest --coco5k-test), else NULL
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

subset_images = sa.Table(
    "subset_images",
    metadata,
    sa.Column("subset_id", sa.BigInteger, primary_key=True),
    sa.Column("image_id", sa.BigInteger, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),  # 0.. in ascending image_id order
)

subset_captions = sa.Table(
    "subset_captions",
    metadata,
    sa.Column("subset_id", sa.BigInteger, primary_key=True),
    sa.Column("caption_id", sa.BigInteger, primary_key=True),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    # 0..captions_per_image-1 within the image, by ascending caption_id
    sa.Column("position", sa.Integer, nullable=False),
)

# Images excluded by `ingest --skip-bad-images`, with the reason.
bad_images = sa.Table(
    "bad_images",
    metadata,
    sa.Column("run_id", sa.BigInteger, primary_key=True),
    sa.Column("image_id", sa.BigInteger, primary_key=True),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

# A reference to one .npy file of embeddings (rows x dim), checksummed.
embedding_sets = sa.Table(
    "embedding_sets",
    metadata,
    _id("embedding_set_id"),
    sa.Column("kind", sa.Text, nullable=False),  # 'image' | 'text' | 'prompt'
    sa.Column("subset_id", sa.BigInteger),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("pretrained", sa.Text),
    sa.Column("checkpoint_sha256", sa.Text),
    sa.Column("precision", sa.Text, nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("dtype", sa.Text, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

# Row order of an embedding set: row_index -> image_id or caption_id.
embedding_rows = sa.Table(
    "embedding_rows",
    metadata,
    sa.Column("embedding_set_id", sa.BigInteger, primary_key=True),
    sa.Column("row_index", sa.BigInteger, primary_key=True),
    sa.Column("item_id", sa.BigInteger, nullable=False),
)

retrieval_runs = sa.Table(
    "retrieval_runs",
    metadata,
    _id("retrieval_run_id"),
    sa.Column("subset_id", sa.BigInteger, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("text_embedding_set_id", sa.BigInteger, nullable=False),
    sa.Column("image_embedding_set_id", sa.BigInteger, nullable=False),
    sa.Column("direction", sa.Text, nullable=False),  # 'text-to-image' | 'image-to-text'
    sa.Column("tie_policy", sa.Text, nullable=False),
    sa.Column("topk", sa.Integer, nullable=False),
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

# One row per query. For text-to-image: query_id = caption_id, gt_id = image_id,
# ids in top-k are image ids. For image-to-text: query_id = image_id, gt_id =
# the best-ranked of its captions, top-k ids are caption ids.
retrieval_ranks = sa.Table(
    "retrieval_ranks",
    metadata,
    sa.Column("retrieval_run_id", sa.BigInteger, primary_key=True),
    sa.Column("query_id", sa.BigInteger, primary_key=True),
    sa.Column("gt_id", sa.BigInteger, nullable=False),
    sa.Column("gt_rank", sa.BigInteger, nullable=False),
    sa.Column("n_tied", sa.BigInteger, nullable=False),
    sa.Column("gt_score", sa.REAL, nullable=False),
    sa.Column("top1_id", sa.BigInteger, nullable=False),
    sa.Column("top1_score", sa.REAL, nullable=False),
    sa.Column("topk_ids", sa.ARRAY(sa.BigInteger), nullable=False),
    sa.Column("topk_scores", sa.ARRAY(sa.REAL), nullable=False),
)

# The failure taxonomy as data.
categories = sa.Table(
    "categories",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("is_actionable", sa.Boolean, nullable=False),
    sa.Column("definition", sa.Text, nullable=False),
    sa.Column("example", sa.Text),
    sa.Column("position", sa.Integer, nullable=False),
)

category_aliases = sa.Table(
    "category_aliases",
    metadata,
    sa.Column("alias", sa.Text, primary_key=True),  # normalised: lower case, single spaces
    sa.Column("category", sa.Text, nullable=False),
)

failure_samples = sa.Table(
    "failure_samples",
    metadata,
    _id("sample_id"),
    sa.Column("retrieval_run_id", sa.BigInteger, nullable=False),
    sa.Column("caption_id", sa.BigInteger, nullable=False),
    sa.Column("draw_order", sa.Integer, nullable=False),
    sa.Column("set_name", sa.Text, nullable=False),  # 'overlap' | annotator name | 'backup'
    sa.Column("config_hash", sa.Text, nullable=False),
    _run_id(),
)

annotations = sa.Table(
    "annotations",
    metadata,
    sa.Column("sample_id", sa.BigInteger, primary_key=True),
    sa.Column("annotator", sa.Text, primary_key=True),
    sa.Column("raw_label", sa.Text, nullable=False),
    sa.Column("category", sa.Text, nullable=False),
    sa.Column("secondary_category", sa.Text),
    sa.Column("notes", sa.Text),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("is_simulated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("imported_at", Timestamp, nullable=False),
    _run_id(),
)

prompt_templates = sa.Table(
    "prompt_templates",
    metadata,
    sa.Column("template_set", sa.Text, primary_key=True),
    sa.Column("category", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("template", sa.Text, nullable=False),
)

# --- improve stage -----------------------------------------------------------------------------

# Prompt texts (any model). A prompt-embedding shard is an embedding_sets row of kind 'prompt'
# whose embedding_rows.item_id are prompt_ids; the cache key is (model identity of the set:
# model, pretrained, checkpoint_sha256, precision; prompt text).
prompts = sa.Table(
    "prompts",
    metadata,
    _id("prompt_id"),
    sa.Column("text", sa.Text, nullable=False, unique=True),
)

# One row per (population, variant) of an `improve` invocation (the variant: templates' pooling; a method without
# prompts has one); the invocation is the run_id. The prompt columns (pooling, tau, template_set, templates_sha256,
# template_mode, k_per_category, k_prompts) are NULL for a method that has no value for them (inverted-softmax,
# qb-norm, query-expansion, a plugin's): NULL means "does not apply", never a placeholder.
improvement_runs = sa.Table(
    "improvement_runs",
    metadata,
    _id("improvement_id"),
    sa.Column("retrieval_run_id", sa.BigInteger, nullable=False),
    sa.Column("categories", sa.Text, nullable=False),  # comma-separated, taxonomy order
    sa.Column("population", sa.Text, nullable=False),  # 'failures' | 'successes' | 'all'
    sa.Column("pooling", sa.Text),  # 'max' | 'mean' | 'logsumexp' (NULL: a method without prompts)
    sa.Column("tau", sa.Double),  # logsumexp only, else NULL
    sa.Column("template_set", sa.Text),  # NULL: a method without prompts
    sa.Column("templates_sha256", sa.Text),  # of the set's content when run (NULL: a method without prompts)
    sa.Column("template_mode", sa.Text),  # 'own' | 'union' (NULL: a method without prompts)
    sa.Column("k_per_category", sa.Text),  # JSON {category: K asked} ('*': controls); NULL: no prompts
    sa.Column("k_prompts", sa.Integer),  # --k asked per caption (NULL: no prompts, or runs before K was chosen)
    sa.Column("n_captions", sa.Integer, nullable=False),
    sa.Column("max_subset", sa.Integer),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("is_overlap_included", sa.Boolean, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
    # issue 17: the fix applied, a registered method's name: 'templates', 'inverted-softmax', 'qb-norm',
    # 'query-expansion', 'templates+inverted-softmax', 'templates+qb-norm' or a plugin's (NULL: templates, runs made
    # before methods); method_params: its parameters as 'name=value' pairs (NULL: none, or plain templates); the
    # query bank of qb-norm (NULL for the others)
    sa.Column("method", sa.Text),
    sa.Column("method_params", sa.Text),
    sa.Column("bank_subset", sa.Text),
    sa.Column("n_bank", sa.Integer),
    sa.Column("is_bank_overlap", sa.Boolean),  # the bank holds evaluated captions (--allow-bank-overlap)
)

improvement_ranks = sa.Table(
    "improvement_ranks",
    metadata,
    sa.Column("improvement_id", sa.BigInteger, primary_key=True),
    sa.Column("caption_id", sa.BigInteger, primary_key=True),
    sa.Column("sample_id", sa.BigInteger),  # the failure sample it came from, if any
    sa.Column("category", sa.Text),  # its label (NULL for unlabelled control captions)
    sa.Column("n_prompts", sa.Integer, nullable=False),  # effective K: prompts this caption got (itself included)
    sa.Column("n_distinct_prompts", sa.Integer),  # distinct texts among them (NULL: runs before distinct prompts)
    sa.Column("baseline_rank", sa.BigInteger, nullable=False),  # retrieval_ranks.gt_rank
    sa.Column("improved_rank", sa.BigInteger, nullable=False),  # same tie policy, pooled scores
    sa.Column("improved_score", sa.Double, nullable=False),  # pooled score of the GT image
    # ties (issue 24): other images with exactly the GT image's score, as retrieval_ranks.n_tied counts them
    # (pessimistic rank = rank + n_tied); NULL: runs made before ties were recorded (unknown, not 0)
    sa.Column("baseline_n_tied", sa.BigInteger),  # retrieval_ranks.n_tied
    sa.Column("improved_n_tied", sa.BigInteger),  # same count, on the pooled / transformed scores
)

# Paired statistics of each delta (bootstrap interval, exact McNemar), computed by toolkit.stats
# and stored; category '*' is the whole improvement run.
improvement_stats = sa.Table(
    "improvement_stats",
    metadata,
    sa.Column("improvement_id", sa.BigInteger, primary_key=True),
    sa.Column("category", sa.Text, primary_key=True),
    sa.Column("k", sa.Integer, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("baseline_hits", sa.Integer, nullable=False),
    sa.Column("improved_hits", sa.Integer, nullable=False),
    sa.Column("n_fixed", sa.Integer, nullable=False),  # baseline miss -> improved hit
    sa.Column("n_broken", sa.Integer, nullable=False),  # baseline hit -> improved miss
    sa.Column("ci_low_pp", sa.Double),
    sa.Column("ci_high_pp", sa.Double),
    sa.Column("ci_level", sa.Double, nullable=False),
    sa.Column("bootstrap_resamples", sa.Integer, nullable=False),
    sa.Column("bootstrap_seed", sa.BigInteger, nullable=False),
    sa.Column("mcnemar_p", sa.Double, nullable=False),
    # the same statistics on the pessimistic hits (rank + n_tied <= K, baseline and improved; issue 24).
    # NULL: runs made before ties were recorded
    sa.Column("baseline_hits_pessimistic", sa.Integer),
    sa.Column("improved_hits_pessimistic", sa.Integer),
    sa.Column("n_fixed_pessimistic", sa.Integer),
    sa.Column("n_broken_pessimistic", sa.Integer),
    sa.Column("ci_low_pp_pessimistic", sa.Double),
    sa.Column("ci_high_pp_pessimistic", sa.Double),
    sa.Column("mcnemar_p_pessimistic", sa.Double),
)


# --- object instances and triage (issue 16) ----------------------------------------------------

# COCO object categories of an ingested instances file (instances_val2017.json "categories").
coco_categories = sa.Table(
    "coco_categories",
    metadata,
    sa.Column("coco_category_id", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("supercategory", sa.Text),
)

# One row per object instance (COCO annotation id) of a subset's images; bbox in pixels (x, y = top left).
image_instances = sa.Table(
    "image_instances",
    metadata,
    sa.Column("instance_id", sa.BigInteger, primary_key=True),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("coco_category_id", sa.BigInteger, nullable=False),
    sa.Column("category_name", sa.Text, nullable=False),
    sa.Column("bbox_x", sa.Double, nullable=False),
    sa.Column("bbox_y", sa.Double, nullable=False),
    sa.Column("bbox_w", sa.Double, nullable=False),
    sa.Column("bbox_h", sa.Double, nullable=False),
    sa.Column("area", sa.Double),
    sa.Column("is_crowd", sa.Boolean, nullable=False),
)

# Which subsets have instance data (a subset image with no image_instances row then has no objects).
instance_files = sa.Table(
    "instance_files",
    metadata,
    sa.Column("subset_id", sa.BigInteger, primary_key=True),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_sha256", sa.Text, nullable=False),
    sa.Column("n_instances", sa.BigInteger, nullable=False),  # of the subset's images
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

# One row per `clipfail triage` of a retrieval run; views use the newest per retrieval run.
triage_runs = sa.Table(
    "triage_runs",
    metadata,
    _id("triage_run_id"),
    sa.Column("retrieval_run_id", sa.BigInteger, nullable=False),
    sa.Column("is_instances_used", sa.Boolean, nullable=False),
    sa.Column("hub_threshold", sa.Integer, nullable=False),  # k-occurrence at or above which top-1 is a hub
    sa.Column("n_failures", sa.Integer, nullable=False),
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

# One row per R@1 failure of the triaged run: the evidence of each rule and the suggestion.
triage_suggestions = sa.Table(
    "triage_suggestions",
    metadata,
    sa.Column("triage_run_id", sa.BigInteger, primary_key=True),
    sa.Column("caption_id", sa.BigInteger, primary_key=True),
    sa.Column("retrieval_run_id", sa.BigInteger, nullable=False),
    sa.Column("gt_image_id", sa.BigInteger, nullable=False),
    sa.Column("top1_image_id", sa.BigInteger, nullable=False),
    sa.Column("gt_rank", sa.BigInteger, nullable=False),
    sa.Column("suggested_category", sa.Text),  # NULL: no suggestion
    sa.Column("score", sa.Double),  # the firing rule's fixed confidence (toolkit.labels.triage.RULE_SCORES)
    sa.Column("evidence", sa.Text, nullable=False),  # short text: what each rule that fired found
    sa.Column("rules_fired", sa.Text, nullable=False),  # comma-separated, in priority order
    sa.Column("mentioned_objects", sa.Text),  # categories the caption mentions, comma-separated
    sa.Column("object_evidence", sa.Text),
    sa.Column("count_evidence", sa.Text),
    sa.Column("spatial_evidence", sa.Text),
    sa.Column("top1_caption_cosine", sa.Double),  # best query-to-top-1-caption cosine
    sa.Column("own_caption_cosine", sa.Double),  # best query-to-own-image-other-caption cosine
    sa.Column("is_same_categories", sa.Boolean),  # GT and top-1 have the same (non-empty) category set
    sa.Column("top1_k_occurrence", sa.Integer, nullable=False),  # queries of the run with this top-1
    sa.Column("is_hub", sa.Boolean, nullable=False),
    # the model's own evidence (issue 28): the newest explain run's blamed phrase, when removing it moves the GT up
    sa.Column("blame_evidence", sa.Text),
)

# --- paired comparison of two retrieval runs (issue 18) --------------------------------------------

# One row per `clipfail compare RUN_A RUN_B`: two retrieval runs of the same subset and direction.
run_comparisons = sa.Table(
    "run_comparisons",
    metadata,
    _id("run_comparison_id"),
    sa.Column("retrieval_run_a_id", sa.BigInteger, nullable=False),
    sa.Column("retrieval_run_b_id", sa.BigInteger, nullable=False),
    sa.Column("subset_id", sa.BigInteger, nullable=False),
    sa.Column("direction", sa.Text, nullable=False),
    sa.Column("n_queries", sa.BigInteger, nullable=False),
    sa.Column("ks", sa.Text, nullable=False),  # comma-separated K values, ascending
    sa.Column("is_same_run", sa.Boolean, nullable=False),
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

# Paired statistics of each ΔR@K (B minus A), computed by toolkit.stats and stored for the views.
run_comparison_stats = sa.Table(
    "run_comparison_stats",
    metadata,
    sa.Column("run_comparison_id", sa.BigInteger, primary_key=True),
    sa.Column("k", sa.Integer, primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("hits_a", sa.BigInteger, nullable=False),
    sa.Column("hits_b", sa.BigInteger, nullable=False),
    sa.Column("n_fixed", sa.BigInteger, nullable=False),  # A miss -> B hit
    sa.Column("n_broken", sa.BigInteger, nullable=False),  # A hit -> B miss
    sa.Column("ci_low_pp", sa.Double),
    sa.Column("ci_high_pp", sa.Double),
    sa.Column("ci_level", sa.Double, nullable=False),
    sa.Column("bootstrap_resamples", sa.Integer, nullable=False),
    sa.Column("bootstrap_seed", sa.BigInteger, nullable=False),
    sa.Column("mcnemar_p", sa.Double, nullable=False),
    # the same statistics on the pessimistic hits (gt_rank + n_tied <= K, both runs), so that neither run gains
    # from ties (the view run_comparison headlines them for a tie-affected comparison). NULL: comparisons stored
    # before ties were compared (the same `clipfail compare` again fills them in)
    sa.Column("hits_a_pessimistic", sa.BigInteger),
    sa.Column("hits_b_pessimistic", sa.BigInteger),
    sa.Column("n_fixed_pessimistic", sa.BigInteger),
    sa.Column("n_broken_pessimistic", sa.BigInteger),
    sa.Column("ci_low_pp_pessimistic", sa.Double),
    sa.Column("ci_high_pp_pessimistic", sa.Double),
    sa.Column("mcnemar_p_pessimistic", sa.Double),
)

# --- phrase ablation (issue 28: clipfail explain) -----------------------------------------------------

# One row per `clipfail explain` run of a retrieval run: its scope and what it found and skipped.
explain_runs = sa.Table(
    "explain_runs",
    metadata,
    _id("explain_run_id"),
    sa.Column("retrieval_run_id", sa.BigInteger, nullable=False),
    sa.Column("scope", sa.Text, nullable=False),  # 'sample' (the failure sample) | 'all-failures'
    sa.Column("roles", sa.Text, nullable=False),  # comma-separated, in toolkit.labels.ablation.ROLES order
    sa.Column("n_failures", sa.Integer, nullable=False),
    sa.Column("n_no_phrase", sa.Integer, nullable=False),  # failures where the extractor found no phrase
    sa.Column("n_variants", sa.Integer, nullable=False),  # failure_ablations rows
    sa.Column("n_skipped_identical", sa.Integer, nullable=False),
    sa.Column("n_skipped_empty", sa.Integer, nullable=False),
    sa.Column("n_encoded", sa.Integer, nullable=False),  # texts encoded by this run (the rest were cached)
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
)

# One row per caption variant: a phrase removed or neutralised (toolkit.labels.ablation), ranked again.
failure_ablations = sa.Table(
    "failure_ablations",
    metadata,
    sa.Column("explain_run_id", sa.BigInteger, primary_key=True),
    sa.Column("caption_id", sa.BigInteger, primary_key=True),
    sa.Column("variant_index", sa.Integer, primary_key=True),  # 0.. per caption, in role then caption order
    sa.Column("retrieval_run_id", sa.BigInteger, nullable=False),
    sa.Column("role", sa.Text, nullable=False),  # attribute | count | relation | action | object
    sa.Column("category", sa.Text, nullable=False),  # the role's category (toolkit/data/blame_roles.csv)
    sa.Column("phrase", sa.Text, nullable=False),
    sa.Column("ablated_text", sa.Text, nullable=False),
    sa.Column("gt_image_id", sa.BigInteger, nullable=False),
    sa.Column("gt_rank_before", sa.BigInteger, nullable=False),  # retrieval_ranks.gt_rank
    sa.Column("n_tied_before", sa.BigInteger, nullable=False),
    sa.Column("gt_rank_after", sa.BigInteger, nullable=False),  # optimistic, evaluate's tie policy
    sa.Column("n_tied_after", sa.BigInteger, nullable=False),
    sa.Column("top1_image_id_after", sa.BigInteger, nullable=False),  # ties broken by lower image row
    sa.Column("score_gap_before", sa.REAL, nullable=False),  # GT score minus the best other image's score
    sa.Column("score_gap_after", sa.REAL, nullable=False),
)

# --- extended positives: ECCV Caption, CxC (issue 27) ---------------------------------------------

# One row per `clipfail positives import`: which source, which version of it, for which subset, and what it covered.
positive_sets = sa.Table(
    "positive_sets",
    metadata,
    _id("positive_set_id"),
    sa.Column("subset_id", sa.BigInteger, nullable=False),
    sa.Column("source", sa.Text, nullable=False),  # 'eccv' | 'cxc' | 'file:<name>'
    sa.Column("source_version", sa.Text),  # eccv_caption's version for a packaged source, NULL for a file
    sa.Column("source_sha256", sa.Text, nullable=False),  # of the JSON bytes read (both files, in order)
    sa.Column("n_pairs_read", sa.BigInteger, nullable=False),  # both directions, as read
    sa.Column("n_pairs_kept", sa.BigInteger, nullable=False),  # both ends in the subset
    sa.Column("n_unknown_ids", sa.BigInteger, nullable=False),  # distinct ids read that the study does not hold
    sa.Column("n_captions", sa.BigInteger, nullable=False),  # captions of the subset
    sa.Column("n_captions_covered", sa.BigInteger, nullable=False),  # ... that are text-to-image queries here
    sa.Column("n_images", sa.BigInteger, nullable=False),
    sa.Column("n_images_covered", sa.BigInteger, nullable=False),
    sa.Column("config_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _run_id(),
    # of the subset's captions / images, those in the COCO 5k test (the split ECCV Caption and CxC extend; the
    # package's list); NULL for a --file source, and for a set imported before clipfail counted them
    sa.Column("n_captions_in_5k_test", sa.BigInteger),
    sa.Column("n_images_in_5k_test", sa.BigInteger),
)

# The verified pairs of a positive set whose two ends are in its subset. direction 'text-to-image': query_id is a
# caption id and positive_id an image id; 'image-to-text': the other way round (the two lists are separate data:
# ECCV's image queries are not its caption queries).
extra_positives = sa.Table(
    "extra_positives",
    metadata,
    sa.Column("positive_set_id", sa.BigInteger, primary_key=True),
    sa.Column("direction", sa.Text, primary_key=True),
    sa.Column("query_id", sa.BigInteger, primary_key=True),
    sa.Column("positive_id", sa.BigInteger, primary_key=True),
)

# The rank of each positive (COCO's own pairs and every extended one) of each query of a retrieval run, from the
# same float32 scores as retrieval_ranks: rank = 1 + #gallery items scoring strictly higher (the optimistic
# policy), n_tied = #other gallery items with exactly its score. Filled by `clipfail positives import` for the
# runs that exist and by `clipfail positives rank` for later ones; recall_extended reads it.
positive_ranks = sa.Table(
    "positive_ranks",
    metadata,
    sa.Column("retrieval_run_id", sa.BigInteger, primary_key=True),
    sa.Column("query_id", sa.BigInteger, primary_key=True),
    sa.Column("positive_id", sa.BigInteger, primary_key=True),
    sa.Column("rank", sa.BigInteger, nullable=False),
    sa.Column("n_tied", sa.BigInteger, nullable=False),
    sa.Column("score", sa.REAL, nullable=False),
)

# The improved rank of each extended positive of each caption of an improvement run (issue 27, part 5): the pairs
# (text-to-image) of every positive set of the run's subset other than the caption's own image, ranked on the
# method's scores exactly as improvement_ranks ranks the caption's image (rank = 1 + images scoring strictly higher,
# n_tied = other images with exactly its score). Written by `clipfail improve` when the subset has positives (and,
# for a run made before an import, by the same `clipfail improve` again); view improvement_hits_extended reads it.
improvement_positive_ranks = sa.Table(
    "improvement_positive_ranks",
    metadata,
    sa.Column("improvement_id", sa.BigInteger, primary_key=True),
    sa.Column("caption_id", sa.BigInteger, primary_key=True),
    sa.Column("positive_id", sa.BigInteger, primary_key=True),  # an image id
    sa.Column("rank", sa.BigInteger, nullable=False),
    sa.Column("n_tied", sa.BigInteger, nullable=False),
    sa.Column("score", sa.Double, nullable=False),  # the method's score of the positive
)

# Paired statistics of each improvement run's delta with the extended positives of one positive set counted as hits
# (view improvement_hits_extended), computed by toolkit.stats as improvement_stats (the whole run only), once on the
# optimistic hits and once on the pessimistic ones (the *_pessimistic columns).
improvement_stats_extended = sa.Table(
    "improvement_stats_extended",
    metadata,
    sa.Column("improvement_id", sa.BigInteger, primary_key=True),
    sa.Column("positive_set_id", sa.BigInteger, primary_key=True),
    sa.Column("k", sa.Integer, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("baseline_hits", sa.Integer, nullable=False),
    sa.Column("improved_hits", sa.Integer, nullable=False),
    sa.Column("n_fixed", sa.Integer, nullable=False),
    sa.Column("n_broken", sa.Integer, nullable=False),
    sa.Column("ci_low_pp", sa.Double),
    sa.Column("ci_high_pp", sa.Double),
    sa.Column("ci_level", sa.Double, nullable=False),
    sa.Column("bootstrap_resamples", sa.Integer, nullable=False),
    sa.Column("bootstrap_seed", sa.BigInteger, nullable=False),
    sa.Column("mcnemar_p", sa.Double, nullable=False),
    sa.Column("baseline_hits_pessimistic", sa.Integer, nullable=False),
    sa.Column("improved_hits_pessimistic", sa.Integer, nullable=False),
    sa.Column("n_fixed_pessimistic", sa.Integer, nullable=False),
    sa.Column("n_broken_pessimistic", sa.Integer, nullable=False),
    sa.Column("ci_low_pp_pessimistic", sa.Double),
    sa.Column("ci_high_pp_pessimistic", sa.Double),
    sa.Column("mcnemar_p_pessimistic", sa.Double, nullable=False),
)

# Natural keys (COCO ids, names) are given, never generated: without this, single-column
# integer keys would compile to SERIAL types that DuckDB does not have.
for _table in metadata.tables.values():
    for _col in _table.primary_key.columns:
        if _col.server_default is None:
            _col.autoincrement = False
