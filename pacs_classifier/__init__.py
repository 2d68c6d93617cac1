"""pacs-classifier: a DICOM gateway that classifies chest radiographs and audits every step."""

__version__ = "0.1.0"
