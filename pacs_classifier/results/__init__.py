"""Results back to the PACS (SPEC §11): DICOM objects made from predictions, and sending them.

``sr`` builds the Comprehensive 3D SR, ``overlay`` the Grad-CAM secondary capture,
``outbound`` plans, renders and queues them in the database, ``sender`` sends them by
C-STORE, ``role`` runs the renderer and the sender for ``serve --roles sender``.
"""
