"""C-STORE of one rendered object to one destination, with failures sorted by type.

:class:`DestinationUnavailable` (retryable): the connection was refused or timed out, the
association was aborted, the peer answered Out of Resources (PS3.4 B.2.3, 0xA7xx) or no
response came. :class:`DestinationRefused` (permanent): the peer rejected the association
or answered a failure status. The outbound queue retries the first up to
``results.max_attempts`` and the second up to ``results.refused_attempts`` times.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Final

from pacs_classifier.config import ENV_TLS_PASSPHRASE, Config, DestinationConfig
from pacs_classifier.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

# PS3.4 Annex B.2.3 and PS3.7 Annex C: C-STORE response statuses.
SUCCESS: Final = 0x0000
#: Coercion of data elements, elements discarded, data set does not match SOP class:
#: the object was stored (PS3.4 B.2.3 warnings).
WARNINGS: Final = frozenset({0xB000, 0xB006, 0xB007})
#: Refused: Out of Resources (0xA700-0xA7FF): the peer may have room later.
OUT_OF_RESOURCES_MASK: Final = 0xFF00
OUT_OF_RESOURCES: Final = 0xA700


class DestinationUnavailable(RetryableError):
    """The destination could not take the object now; trying again later may work."""


class DestinationRefused(PermanentError):
    """The destination said no: association rejected or a failure status."""


def ssl_context_for(config: Config, dest: DestinationConfig) -> ssl.SSLContext | None:
    """A client TLS context for ``dest`` (its CA, and our certificate when configured)."""
    tls = dest.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(config.path(tls.ca)) if tls.ca else None
    )
    if tls.cert:
        ctx.load_cert_chain(
            str(config.path(tls.cert)),
            str(config.path(tls.key)) if tls.key else None,
            password=os.environ.get(ENV_TLS_PASSPHRASE) or None,
        )
    return ctx


def store_file(
    path: Path,
    dest: DestinationConfig,
    *,
    calling_ae: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Send the DICOM file at ``path`` to ``dest``; return the (success or warning) status.

    Raises :class:`DestinationUnavailable` or :class:`DestinationRefused`.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    tls_args = None if ssl_context is None else (ssl_context, dest.host)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        raise DestinationRefused(f"{where}: association rejected")
    if not assoc.is_established:
        raise DestinationUnavailable(f"{where}: no association (refused, timed out or aborted)")
    try:
        response = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    status = getattr(response, "Status", None)
    if status is None:
        raise DestinationUnavailable(f"{where}: no C-STORE response (time-out or abort)")
    status = int(status)
    if status == SUCCESS or status in WARNINGS:
        if status != SUCCESS:
            log.warning("%s stored %s with warning 0x%04X", where, ds.SOPInstanceUID, status)
        return status
    if status & OUT_OF_RESOURCES_MASK == OUT_OF_RESOURCES:
        raise DestinationUnavailable(f"{where}: out of resources (0x{status:04X})")
    raise DestinationRefused(f"{where}: C-STORE failed with status 0x{status:04X}")
