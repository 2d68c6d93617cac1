-- title: Results sent to the PACS, by destination
-- description: Every SR and Grad-CAM overlay queued for a destination, with its state
--   (queued, running, done, failed), attempts, the last error and when it was sent;
--   failed ones first. `send retry --failed` starts failed ones over.
-- params: since, until
SELECT
    s.destination,
    s.state,
    o.kind,
    i.accession_number,
    i.patient_id,
    o.study_instance_uid,
    o.sop_instance_uid,
    s.attempts,
    s.reason,
    s.created_at,
    s.sent_at
FROM send_jobs s
JOIN result_objects o ON o.id = s.object_id
JOIN instances i ON i.id = o.instance_id
WHERE s.created_at >= :since AND s.created_at < :until
ORDER BY CASE WHEN s.state = 'failed' THEN 0 ELSE 1 END, s.destination, s.id
