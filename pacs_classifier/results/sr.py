"""The DICOM SR of one classification: a Comprehensive 3D SR with a TID 1500 report.

Content tree (PS3.16 TID 1500 → TID 1501, one image-level measurement group)::

    Imaging Measurement Report
      Language, Observation context (device observer: this product)
      Procedure reported: Plain chest X-ray (SCT 399208008)
      Imaging Measurements
        Measurement Group
          Tracking identifier / UID
          Algorithm identification (TID 4019): name, model version, parameters
              "sha256=…" and "threshold=…"
          Source image: the classified instance (also in the Current Requested
              Procedure Evidence Sequence; no image library: its projection
              radiography descriptors need Imager Pixel Spacing, often absent on CR)
          Probability of pneumonia (NUM, calibrated, unit "1")
          Decision threshold (NUM, unit "1")
          Pneumonia (SCT 233604007) = Present (SCT 52101004) | Absent (SCT 2667000)

The two NUM concepts have no standard code, so they use this product's private coding
scheme ``99PACSCLS`` (PS3.3 8.1: private schemes start with "99"), identified in the
Coding Scheme Identification Sequence. Codes are listed in ``docs/conformance.md``.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pacs_classifier.db.models import Label

PRODUCT = "pacs-classifier"
ALGORITHM_NAME = "pacs-classifier InceptionV3 pneumonia classifier"
#: A fixed UID naming this product as the SR's device observer (UUID-derived, 2.25).
DEVICE_UID = "2.25.229148722310335683297463584227442183537"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI pneumonia classification (not for diagnostic use)"

PRIVATE_SCHEME = "99PACSCLS"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = Code("PROB-PNEUMONIA", PRIVATE_SCHEME, "Probability of pneumonia")
THRESHOLD = Code("THRESHOLD", PRIVATE_SCHEME, "Decision threshold")
NO_UNITS = Code("1", "UCUM", "no units")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")
NOT_ASSESSED_REASON = Code("NOT-ASSESSED", PRIVATE_SCHEME, "Reason not assessed")

#: Type 2 attributes highdicom reads from the source image; an empty value where absent.
_PATIENT_STUDY_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class SrContent:
    """What the SR says about one prediction."""

    label: Label
    probability: float
    threshold: float
    model_version: str
    model_sha256: str


@dataclass(frozen=True)
class NotAssessedContent:
    """What the SR says about an instance the worker did not classify."""

    #: The job's reason code (``jobs.reason``: ``modality``, ``too_small``, ...).
    reason: str
    model_version: str
    model_sha256: str


def reason_code(reason: str) -> Code:
    """A not-assessed reason as a code of this product's private scheme.

    The value is the stored reason code itself (over 16 characters it becomes a Long
    Code Value, PS3.3 8.8); the meaning spells it out.
    """
    if not reason or not reason.isascii() or "\\" in reason or len(reason) > 64:
        raise ValueError(f"not a reason code: {reason!r}")
    return Code(reason, PRIVATE_SCHEME, reason.replace("_", " ").capitalize())


@dataclass(frozen=True)
class ObjectUids:
    """UIDs fixed in the database before the object is first rendered."""

    sop_instance_uid: str
    series_instance_uid: str
    instance_number: int


@dataclass(frozen=True)
class Predecessor:
    """An SR this one supersedes (PS3.3 C.17.2.1 Predecessor Documents Sequence)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def evidence_of(source: Dataset) -> Dataset:
    """The source image's header with empty Type 2 patient/study attributes where absent.

    highdicom copies these from the evidence and fails on a missing one; an empty value
    is what the standard asks for when the source did not know it.
    """
    ds = copy.copy(source)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    # Copied into our objects as found; a malformed Age String (PS3.5 6.2: "nnnD|W|M|Y")
    # would make a valid source's result invalid, so it is left out instead.
    age = str(ds.get("PatientAge", "") or "")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):
        del ds.PatientAge
    return ds


def build_sr(
    source: Dataset,
    content: SrContent,
    uids: ObjectUids,
    predecessor: Predecessor | None = None,
) -> Dataset:
    """The Comprehensive 3D SR of ``content`` about ``source`` (header only is enough)."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    if not 0.0 <= content.probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], received {content.probability!r}")
    evidence = evidence_of(source)
    algorithm = AlgorithmIdentification(
        name=ALGORITHM_NAME,
        version=content.model_version,
        parameters=[f"sha256={content.model_sha256}", f"threshold={content.threshold:.6f}"],
        manufacturer=PRODUCT,
    )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="Pneumonia classification"),
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup.from_source_image(evidence)],
        measurements=[
            Measurement(name=PROBABILITY, value=content.probability, unit=NO_UNITS),
            Measurement(name=THRESHOLD, value=content.threshold, unit=NO_UNITS),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=PNEUMONIA,
                value=PRESENT if content.label == Label.PNEUMONIA else ABSENT,
            )
        ],
    )
    return _document(evidence, group, content.model_version, uids, predecessor)


def build_not_assessed_sr(
    source: Dataset,
    content: NotAssessedContent,
    uids: ObjectUids,
    predecessor: Predecessor | None = None,
) -> Dataset:
    """The SR saying ``source`` was not assessed, and why (``[results] sr_not_assessed``).

    The same document as :func:`build_sr` with no probability and no threshold: Pneumonia
    is Undetermined (SCT 373068000) and a second evaluation, Reason not assessed, carries
    the reason code.
    """
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    evidence = evidence_of(source)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="Pneumonia classification"),
        algorithm_id=AlgorithmIdentification(
            name=ALGORITHM_NAME,
            version=content.model_version,
            parameters=[f"sha256={content.model_sha256}"],
            manufacturer=PRODUCT,
        ),
        source_images=[SourceImageForMeasurementGroup.from_source_image(evidence)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=PNEUMONIA, value=UNDETERMINED),
            QualitativeEvaluation(name=NOT_ASSESSED_REASON, value=reason_code(content.reason)),
        ],
    )
    return _document(evidence, group, content.model_version, uids, predecessor)


def _document(
    evidence: Dataset,
    group: Any,
    model_version: str,
    uids: ObjectUids,
    predecessor: Predecessor | None,
) -> Dataset:
    """The Comprehensive 3D SR around one measurement group (TID 1500)."""
    import highdicom as hd
    from highdicom.sr import (
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
    )

    observer = ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID,
            name=PRODUCT,
            manufacturer_name=PRODUCT,
            model_name=model_version,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[group],
    )
    previous = None
    if predecessor is not None:
        pre = Dataset()
        pre.SOPClassUID = predecessor.sop_class_uid
        pre.SOPInstanceUID = predecessor.sop_instance_uid
        pre.SeriesInstanceUID = predecessor.series_instance_uid
        pre.StudyInstanceUID = predecessor.study_instance_uid
        previous = [pre]
    with warnings.catch_warnings():
        # highdicom warns about single-component person names, which sites do send.
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        sr = Comprehensive3DSR(
            evidence=[evidence],
            content=report,
            series_instance_uid=uids.series_instance_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=uids.instance_number,
            manufacturer=PRODUCT,
            is_complete=True,
            previous_versions=previous,
            series_description=SR_SERIES_DESCRIPTION,
        )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "pacs-classifier local codes"
    scheme.CodingSchemeResponsibleOrganization = PRODUCT
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
