-- improvement_hits: one row per (improvement run, caption, K in 1, 5, 10): whether the caption's
-- ground-truth image is within the top K before (is_baseline_hit: baseline_rank <= K) and after
-- (is_improved_hit: improved_rank <= K) the category-aware prompt ensemble. category is the
-- caption's label (NULL for unlabelled control captions).
-- The shared base of improvement_recall (per run) and category_recall_delta (per category), which
-- average these hits into Recall@K.
-- Reads: improvement_ranks.
CREATE OR REPLACE VIEW improvement_hits AS
WITH improvement_ranks AS (
    SELECT improvement_id, caption_id, sample_id, category, baseline_rank, improved_rank FROM improvement_ranks
),
ks AS (
    SELECT unnest([1, 5, 10]) AS k
),
final AS (
    SELECT
        r.improvement_id,
        r.caption_id,
        r.sample_id,
        r.category,
        ks.k,
        r.baseline_rank,
        r.improved_rank,
        r.baseline_rank <= ks.k AS is_baseline_hit,
        r.improved_rank <= ks.k AS is_improved_hit
    FROM improvement_ranks r
    CROSS JOIN ks
)
SELECT * FROM final
ORDER BY improvement_id, caption_id, k
