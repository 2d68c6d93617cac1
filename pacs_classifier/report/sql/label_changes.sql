-- title: Label changes between the two latest models
-- description: Instances whose latest label from the newest model that made predictions
--   differs from their latest label from the model before it, with both probabilities.
-- params: since, until
WITH used AS (
    SELECT m.id FROM models m
    WHERE EXISTS (SELECT 1 FROM predictions p WHERE p.model_id = m.id)
    ORDER BY m.id DESC
    LIMIT 2
),
newer AS (SELECT MAX(id) AS id FROM used),
older AS (SELECT MIN(id) AS id FROM used WHERE id < (SELECT id FROM newer)),
a AS (
    SELECT p.instance_id, p.label, p.probability FROM predictions p
    WHERE p.id IN (
        SELECT MAX(q.id) FROM predictions q
        WHERE q.model_id = (SELECT id FROM older) GROUP BY q.instance_id
    )
),
b AS (
    SELECT p.instance_id, p.label, p.probability FROM predictions p
    WHERE p.id IN (
        SELECT MAX(q.id) FROM predictions q
        WHERE q.model_id = (SELECT id FROM newer) GROUP BY q.instance_id
    )
)
SELECT
    i.sop_instance_uid,
    i.study_instance_uid,
    i.accession_number,
    mo.version AS old_model,
    a.label AS old_label,
    ROUND(CAST(a.probability AS NUMERIC), 4) AS old_probability,
    mn.version AS new_model,
    b.label AS new_label,
    ROUND(CAST(b.probability AS NUMERIC), 4) AS new_probability
FROM a
JOIN b ON b.instance_id = a.instance_id
JOIN instances i ON i.id = a.instance_id
JOIN models mo ON mo.id = (SELECT id FROM older)
JOIN models mn ON mn.id = (SELECT id FROM newer)
WHERE a.label <> b.label
  AND i.received_at >= :since AND i.received_at < :until
ORDER BY i.received_at, i.id
