-- title: Daily volume and positive rate
-- description: Per day of receipt (UTC): instances received, classified, not assessed,
--   failed, PNEUMONIA results and the positive rate among classified instances. The
--   label is each instance's latest (after reclassification, the newest model's).
-- params: since, until
SELECT
    r.received_day AS day,
    COUNT(*) AS received,
    COUNT(r.label) AS classified,
    SUM(CASE WHEN r.label IS NULL AND r.job_state = 'not_assessed' THEN 1 ELSE 0 END)
        AS not_assessed,
    SUM(CASE WHEN r.label IS NULL AND r.job_state = 'failed' THEN 1 ELSE 0 END) AS failed,
    SUM(CASE WHEN r.label = 'PNEUMONIA' THEN 1 ELSE 0 END) AS pneumonia,
    ROUND(CAST(
        1.0 * SUM(CASE WHEN r.label = 'PNEUMONIA' THEN 1 ELSE 0 END)
        / NULLIF(COUNT(r.label), 0) AS NUMERIC), 4) AS positive_rate
FROM v_results r
WHERE r.received_at >= :since AND r.received_at < :until
GROUP BY r.received_day
ORDER BY r.received_day
