-- title: Not-assessed and failed jobs by reason
-- description: Jobs that ended without a prediction, grouped by state and reason code
--   (not_assessed: e.g. body_part, modality, too_small; failed: the error after the
--   last attempt), with the first and last time each was seen.
-- params: since, until
SELECT
    j.state,
    j.reason,
    COUNT(*) AS jobs,
    MIN(j.updated_at) AS first_at,
    MAX(j.updated_at) AS last_at
FROM jobs j
WHERE j.state IN ('not_assessed', 'failed')
  AND j.created_at >= :since AND j.created_at < :until
GROUP BY j.state, j.reason
ORDER BY j.state, COUNT(*) DESC, j.reason
