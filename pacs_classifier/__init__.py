"""pacs-classifier: a DICOM gateway that classifies chest radiographs and audits every step."""

from pathlib import Path

__version__ = "0.1.0"

#: The reference model bundle (``models/reference`` in the repository), shipped inside the
#: package so that an installed copy can register it: ``model register --reference``.
REFERENCE_MODEL_DIR = Path(__file__).resolve().parent / "reference_model"
