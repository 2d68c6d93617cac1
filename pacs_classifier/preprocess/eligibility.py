"""Is this data set a chest radiograph we should classify? Metadata only, no pixel decode.

The worker asks before paying for a decode; a refusal is a reason code (reasons.py) and the
instance ends ``not_assessed`` (SPEC §4). Rules, in order:

1. ``modality``: (0008,0060) Modality in ``rules.modalities``.
2. ``body_part``: (0018,0015) Body Part Examined in ``rules.body_parts`` ("" = absent).
3. ``view_position``: (0018,5101) View Position in ``rules.view_positions``.
4. ``not_a_chest_radiograph``: the free-text descriptions name a body region that is not the
   chest and never name the chest. Body Part Examined is optional (type 2/3) and often
   empty, so a dental panoramic sent as CR with an empty body part passes rules 1-2; its
   Study/Series Description ("MODALITYLUT - TEETH") says what it is. Descriptions are
   matched as whole words against the lists below, so "THORAX" or "[CHEST,GENERAL]" keep
   a chest film in, and a description naming nothing at all ("No Finding") decides
   nothing. Body Part Examined is one of the texts read: a coded CHEST there outweighs
   free text naming another region. Image size and aspect were considered and
   rejected: chest films come in portrait, landscape and square cassettes from
   24 x 30 cm (paediatric) upwards.
5. ``multi_frame``: more than one frame.
6. ``too_small``: the short side under ``rules.min_short_side_px``.
"""

from __future__ import annotations

import re
from typing import Final

from pydicom.dataset import Dataset

from pacs_classifier.config import EligibilityConfig
from pacs_classifier.preprocess import reasons
from pacs_classifier.preprocess.decode import number_of_frames

# Free-text elements that name what was imaged.
DESCRIPTION_KEYWORDS: Final = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "AcquisitionDeviceProcessingDescription",
    "BodyPartExamined",
)
# Words that name the chest (English, German/French "THORAX", Spanish/Portuguese "TORAX").
CHEST_WORDS: Final = frozenset(
    {"CHEST", "THORAX", "TORAX", "THORACIC", "LUNG", "LUNGS", "CXR", "PULMONARY", "THX"}
)
# Words that name another region. "SPINE" is here: a thoracic spine film is not a chest
# radiograph, but "THORACIC" keeps a description with both words in (the safer error).
OTHER_REGION_WORDS: Final = frozenset(
    {
        # dental and head
        "TEETH",
        "TOOTH",
        "DENTAL",
        "DENTITION",
        "PANORAMIC",
        "PANORAMA",
        "PANO",
        "OPG",
        "OPT",
        "ORTHOPANTOMOGRAM",
        "ORTHOPANTOMOGRAPHY",
        "MANDIBLE",
        "MAXILLA",
        "JAW",
        "SKULL",
        "HEAD",
        "SINUS",
        "SINUSES",
        "CEPH",
        "CEPHALOMETRIC",
        "FACE",
        "ORBIT",
        # limbs and joints
        "EXTREMITY",
        "LEG",
        "TIBIA",
        "FIBULA",
        "FEMUR",
        "KNEE",
        "ANKLE",
        "FOOT",
        "FEET",
        "TOE",
        "HIP",
        "ARM",
        "HUMERUS",
        "ELBOW",
        "FOREARM",
        "WRIST",
        "HAND",
        "FINGER",
        "SHOULDER",
        "CLAVICLE",
        # trunk other than the chest
        "ABDOMEN",
        "ABDOMINAL",
        "PELVIS",
        "SPINE",
        "LUMBAR",
        "CERVICAL",
        "SACRUM",
        "BREAST",
        "MAMMO",
        "MAMMOGRAPHY",
    }
)
_WORD = re.compile(r"[A-Z]+")


def check_eligibility(ds: Dataset, rules: EligibilityConfig | None = None) -> str | None:
    """None when ``ds`` should be classified, else the reason code of the first rule it fails.

    Reads only header elements (the pixel data need not even be loaded). ``rules``
    defaults to ``EligibilityConfig()``, the defaults of the ``[eligibility]`` section.
    """
    rules = rules or EligibilityConfig()
    if _text(ds, "Modality") not in _upper(rules.modalities):
        return reasons.MODALITY
    if _text(ds, "BodyPartExamined") not in _upper(rules.body_parts):
        return reasons.BODY_PART
    if _text(ds, "ViewPosition") not in _upper(rules.view_positions):
        return reasons.VIEW_POSITION
    if names_other_region(ds):
        return reasons.NOT_A_CHEST_RADIOGRAPH
    if number_of_frames(ds) > 1:
        return reasons.MULTI_FRAME
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        return reasons.BAD_DIMENSIONS
    if min(int(rows), int(cols)) < rules.min_short_side_px:
        return reasons.TOO_SMALL
    return None


def names_other_region(ds: Dataset) -> bool:
    """True when the descriptions name a non-chest region and nowhere the chest."""
    words: set[str] = set()
    for keyword in DESCRIPTION_KEYWORDS:
        words.update(_WORD.findall(_text(ds, keyword)))
    for item in ds.get("AnatomicRegionSequence") or ():
        words.update(_WORD.findall(_text(item, "CodeMeaning")))
    return bool(words & OTHER_REGION_WORDS) and not words & CHEST_WORDS


def _text(ds: Dataset, keyword: str) -> str:
    """An element's value as upper-case text; "" where absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def _upper(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(v.strip().upper() for v in values)
