"""One module per sub-command; see :mod:`pacs_classifier.cli` for the contract."""
