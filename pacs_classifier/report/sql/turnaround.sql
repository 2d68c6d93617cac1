-- title: Turnaround p50/p95 per day
-- description: Seconds from receipt to the first prediction of each instance, per day of
--   receipt (UTC): count, nearest-rank median and 95th percentile, maximum. Window
--   functions rather than percentile_cont, which SQLite lacks.
-- params: since, until
WITH t AS (
    SELECT
        r.received_day AS day,
        r.turnaround_s,
        ROW_NUMBER() OVER (PARTITION BY r.received_day ORDER BY r.turnaround_s) AS rn,
        COUNT(*) OVER (PARTITION BY r.received_day) AS n
    FROM v_results r
    WHERE r.turnaround_s IS NOT NULL
      AND r.received_at >= :since AND r.received_at < :until
)
SELECT
    day,
    MAX(n) AS classified,
    ROUND(CAST(MIN(CASE WHEN rn = (n * 50 + 99) / 100 THEN turnaround_s END) AS NUMERIC), 3)
        AS p50_s,
    ROUND(CAST(MIN(CASE WHEN rn = (n * 95 + 99) / 100 THEN turnaround_s END) AS NUMERIC), 3)
        AS p95_s,
    ROUND(CAST(MAX(turnaround_s) AS NUMERIC), 3) AS max_s
FROM t
GROUP BY day
ORDER BY day
