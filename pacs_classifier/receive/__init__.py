"""Receiving: the DICOM listener, its status codes and the checks on what arrives."""
