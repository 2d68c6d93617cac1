"""One exception tree for the whole project.

Whether a failure is worth retrying is a *type*, not a string: the queue retries
``RetryableError`` with backoff and ends a job at once on ``PermanentError``.
"""

from __future__ import annotations


class PacsClassifierError(Exception):
    """Base of every error this project raises on purpose."""


class PermanentError(PacsClassifierError):
    """Retrying will not help: bad input, bad configuration, corrupt model."""


class RetryableError(PacsClassifierError):
    """A passing condition: the database is down, the disk is full, a lease was lost."""


class ConfigError(PermanentError):
    """The configuration file or an override is wrong; the message names the key."""


class DatabaseUnavailable(RetryableError):
    """The database could not be reached or refused the transaction."""


class SchemaOutdated(PermanentError):
    """The database schema is older than this code; ``db upgrade`` fixes it."""


class StorageFull(RetryableError):
    """Free disk space under ``storage.root`` is below ``storage.min_free_mb``."""


class ModelError(PermanentError):
    """A model bundle is missing, corrupt, or does not match its recorded checksums."""


class NotAssessable(PermanentError):
    """The input cannot become a chest radiograph tensor, or is not one.

    ``reason`` is a short, stable code stored in ``jobs.reason`` (e.g. ``modality``,
    ``too_small``, ``multi_frame``); the message explains it to a person.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or reason)
