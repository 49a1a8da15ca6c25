-- blame_by_category: for each human category, the distribution of the roles the model's ablations blame.
--
-- One row per (retrieval run, explain run, human category, blamed role): the newest explain run of each
-- retrieval run (explain_runs.explain_run_id), its failures from failure_blame, and each failure's label from
-- sample_labels (an annotator's label, or the overlap set's majority). A failure without a label (backup,
-- not yet labelled, or a scope beyond the sample) is counted under category 'no labels', never dropped and
-- never a NaN share. n: failures; n_category: failures of that category; percent = 100 * n / n_category,
-- rounded to 2 decimals; is_match: the blamed role's category (toolkit/data/blame_roles.csv) is the human
-- category (NULL for 'none', 'no phrase' and 'no labels'). Rows follow the taxonomy order, 'no labels' last,
-- then the most frequent role first.
-- Reads: explain_runs, failure_blame, sample_labels, categories.
CREATE OR REPLACE VIEW blame_by_category AS
WITH explain_runs AS (
    SELECT explain_run_id, retrieval_run_id FROM explain_runs
),
failure_blame AS (
    SELECT explain_run_id, retrieval_run_id, caption_id, blamed_role, blamed_category FROM failure_blame
),
sample_labels AS (
    SELECT retrieval_run_id, caption_id, category FROM sample_labels
),
categories AS (
    SELECT name AS category, position FROM categories
),
latest AS (
    SELECT retrieval_run_id, max(explain_run_id) AS explain_run_id FROM explain_runs GROUP BY retrieval_run_id
),
labelled AS (
    SELECT b.retrieval_run_id, b.explain_run_id, b.caption_id, b.blamed_role, b.blamed_category,
           coalesce(l.category, 'no labels') AS category, l.category IS NULL AS is_unlabelled
    FROM failure_blame b
    JOIN latest USING (retrieval_run_id, explain_run_id)
    LEFT JOIN sample_labels l ON l.retrieval_run_id = b.retrieval_run_id AND l.caption_id = b.caption_id
),
counted AS (
    SELECT retrieval_run_id, explain_run_id, category, is_unlabelled, blamed_role,
           any_value(blamed_category) AS blamed_category, count(*) AS n
    FROM labelled
    GROUP BY retrieval_run_id, explain_run_id, category, is_unlabelled, blamed_role
),
final AS (
    SELECT
        c.retrieval_run_id,
        c.explain_run_id,
        c.category,
        c.blamed_role,
        c.n,
        sum(c.n) OVER (PARTITION BY c.retrieval_run_id, c.explain_run_id, c.category) AS n_category,
        round(100.0 * c.n / sum(c.n) OVER (PARTITION BY c.retrieval_run_id, c.explain_run_id, c.category), 2)
            AS percent,
        CASE WHEN NOT c.is_unlabelled AND c.blamed_category IS NOT NULL
             THEN c.blamed_category = c.category END AS is_match,
        t.position AS category_position
    FROM counted c
    LEFT JOIN categories t ON t.category = c.category
)
SELECT * EXCLUDE (category_position) FROM final
ORDER BY retrieval_run_id, explain_run_id, category_position NULLS LAST, category, n DESC, blamed_role
