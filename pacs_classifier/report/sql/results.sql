-- title: Results per instance
-- description: Every classified instance version with its latest result: accession,
--   patient ID, study date, label, probability of pneumonia, model version, in order of
--   receipt. --label PNEUMONIA or NORMAL keeps one label.
-- params: since, until, label
SELECT
    r.received_at,
    r.accession_number,
    r.patient_id,
    r.study_date,
    r.label,
    ROUND(CAST(r.probability AS NUMERIC), 4) AS probability,
    r.model_version,
    r.sop_instance_uid
FROM v_latest_predictions r
WHERE r.received_at >= :since AND r.received_at < :until
  AND (:label = '' OR r.label = :label)
ORDER BY r.received_at, r.instance_id
