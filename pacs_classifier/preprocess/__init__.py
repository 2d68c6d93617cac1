"""Pixels to tensor: one normalisation path for training and serving (SPEC §6, §9).

``normalize_file`` turns a DICOM, JPEG or PNG file into an InceptionV3 input;
``check_eligibility`` decides from metadata alone whether a data set is a chest
radiograph to classify; ``serving_tensor`` is both in the order serving applies them
(the worker and ``classify``); ``unit_to_tensor`` is the shared tail from a [0, 1] image.
Reason codes live in ``preprocess.reasons``.
"""

from pacs_classifier.preprocess import reasons
from pacs_classifier.preprocess.eligibility import check_eligibility
from pacs_classifier.preprocess.normalize import (
    dataset_to_unit,
    file_to_unit,
    normalize_dataset,
    normalize_file,
    serving_tensor,
)
from pacs_classifier.preprocess.tensor import unit_to_tensor

__all__ = [
    "check_eligibility",
    "dataset_to_unit",
    "file_to_unit",
    "normalize_dataset",
    "normalize_file",
    "reasons",
    "serving_tensor",
    "unit_to_tensor",
]
