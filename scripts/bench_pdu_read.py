"""The PDU read alone: pynetdicom 3.0's reader against the listener's, in one process.

Thread CPU time to read 64 P-DATA-TF PDUs of 128 KB (8 MiB, one 2,048² CR instance) from
a socket pair, fed by a sending thread: ``DULServiceProvider._read_pdu_data`` as
pynetdicom ships it (``AssociationSocket.recv``, 4 KiB per ``recv()`` into a growing
``bytearray``) against ``receive/transport._read_pdu_data`` (``recv_into`` one buffer,
bounded in length and time). PDUs are not decoded (the same for both). The two alternate,
so a noisy neighbour hurts both alike.

    .venv/bin/python scripts/bench_pdu_read.py --repeat 30
"""

from __future__ import annotations

import argparse
import queue
import socket
import statistics
import struct
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import AssociationSocket

from pacs_classifier.receive import transport

PDU_BYTES = 131072  # the listener's default maximum_pdu_size
COUNT = 64


class FakeDul:
    """What both readers touch of a DULServiceProvider: socket, association, queues."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = AssociationSocket.__new__(AssociationSocket)
        self.socket.socket = sock
        self.assoc = types.SimpleNamespace(
            network_timeout=60,
            is_acceptor=True,
            acceptor=types.SimpleNamespace(maximum_length=PDU_BYTES),
        )
        self.event_queue: queue.Queue[str] = queue.Queue()
        self._recv_pdu: queue.Queue[int] = queue.Queue()

    def _decode_pdu(self, data: bytearray) -> tuple[int, str]:
        return len(data), "Evt10"


def read_once(reader: Callable[[Any], None], pdu: bytes) -> float:
    """Milliseconds of this thread's CPU to read ``COUNT`` PDUs."""
    a, b = socket.socketpair()

    def send_all() -> None:
        for _ in range(COUNT):
            b.sendall(pdu)

    sender = threading.Thread(target=send_all)
    sender.start()
    dul = FakeDul(a)
    started = time.thread_time()
    for _ in range(COUNT):
        reader(dul)
    used = time.thread_time() - started
    sender.join()
    a.close()
    b.close()
    got = [dul._recv_pdu.get_nowait() for _ in range(dul._recv_pdu.qsize())]
    if got != [len(pdu)] * COUNT:
        raise RuntimeError(f"read {len(got)} PDUs, not {COUNT} whole ones")
    return 1000 * used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    body = bytes(PDU_BYTES - 6)
    pdu = struct.pack(">BBL", 4, 0, len(body)) + body
    stock = transport._ORIGINAL_READ_PDU_DATA
    if stock is None:
        parser.error("this pynetdicom has no DULServiceProvider._read_pdu_data")
    readers: dict[str, Callable[[Any], None]] = {
        "pynetdicom 3.0 (4 KiB recv)": stock,
        "ours (recv_into, bounded)": transport._read_pdu_data,
    }
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.repeat):
        for name, reader in readers.items():
            cpu[name].append(read_once(reader, pdu))
    mib = COUNT * PDU_BYTES / (1 << 20)
    for name, values in cpu.items():
        print(
            f"{name:30s} {statistics.median(values):6.2f} ms CPU per {mib:.0f} MiB "
            f"(median of {len(values)}; best {min(values):.2f})"
        )
    stock, ours = (statistics.median(v) for v in cpu.values())
    print(f"pynetdicom / ours = {stock / ours:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
