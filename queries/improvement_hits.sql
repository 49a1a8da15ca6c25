-- improvement_hits: one row per (improvement run, caption, K in 1, 5, 10): whether the caption's
-- ground-truth image is within the top K before (is_baseline_hit: baseline_rank <= K) and after
-- (is_improved_hit: improved_rank <= K) the category-aware prompt ensemble. category is the
-- caption's label (NULL for unlabelled control captions).
-- Ties: the ranks are optimistic (1 + images scoring strictly higher); baseline_n_tied /
-- improved_n_tied count the other images with exactly the GT image's score (as retrieval_ranks.n_tied),
-- so the pessimistic rank is rank + n_tied and is_*_hit_pessimistic is (rank + n_tied <= K). A NULL
-- tie count (runs made before ties were recorded) means unknown, and so do the pessimistic columns.
-- The shared base of improvement_ties, improvement_recall (per run) and category_recall_delta (per
-- category), which average these hits into Recall@K.
-- Reads: improvement_ranks.
CREATE OR REPLACE VIEW improvement_hits AS
WITH improvement_ranks AS (
    SELECT
        improvement_id, caption_id, sample_id, category, baseline_rank, improved_rank, baseline_n_tied,
        improved_n_tied
    FROM improvement_ranks
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
        r.improved_rank <= ks.k AS is_improved_hit,
        r.baseline_n_tied,
        r.improved_n_tied,
        r.baseline_rank + r.baseline_n_tied AS baseline_rank_pessimistic,
        r.improved_rank + r.improved_n_tied AS improved_rank_pessimistic,
        r.baseline_rank + r.baseline_n_tied <= ks.k AS is_baseline_hit_pessimistic,
        r.improved_rank + r.improved_n_tied <= ks.k AS is_improved_hit_pessimistic
    FROM improvement_ranks r
    CROSS JOIN ks
)
SELECT * FROM final
ORDER BY improvement_id, caption_id, k
