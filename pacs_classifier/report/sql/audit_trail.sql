-- title: Audit trail of one study
-- description: Every audit event about the instances of one study (receipt, duplicates,
--   classification outcomes, retries, reclassification), oldest first. Needs --study UID.
-- params: study, since, until
SELECT
    e.id,
    e.occurred_at,
    e.actor,
    e.action,
    e.outcome,
    i.sop_instance_uid,
    e.entity_id AS instance_id
FROM audit_events e
JOIN instances i
  ON e.entity_type = 'instance' AND e.entity_id = CAST(i.id AS VARCHAR(20))
WHERE i.study_instance_uid = :study
  AND e.occurred_at >= :since AND e.occurred_at < :until
ORDER BY e.id
