"""DIMSE status codes the listener answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
#: Refused: Out of Resources. The disk is below ``min_free_mb`` or the database is down;
#: the sender keeps the instance and retries.
OUT_OF_RESOURCES: Final = 0xA700
#: Error: Data Set does not match SOP Class.
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
#: Error: Cannot Understand (unparseable data set, invalid UIDs).
CANNOT_UNDERSTAND: Final = 0xC000

NAMES: Final = {
    SUCCESS: "success",
    OUT_OF_RESOURCES: "out_of_resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "dataset_does_not_match_sop_class",
    CANNOT_UNDERSTAND: "cannot_understand",
}


def describe(status: int) -> str:
    """``0xA700 (out_of_resources)``: how statuses appear in logs and audit details."""
    return f"0x{status:04X} ({NAMES.get(status, 'unknown')})"
