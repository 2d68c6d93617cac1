"""Ingest speed: dcmtk storescp vs a minimal pynetdicom SCP vs our listener, in one run.

Generates 2,048² 16-bit CR files (~8 MB each), then sends the same set with dcmtk's
storescu (``TCP_NODELAY=1``) to each receiver in turn and prints files/s and the ratios.
Ours runs as ``pacs-classifier serve --roles listener`` on SQLite and fsyncs and commits
every instance before answering; the baselines write the bytes and nothing more.

    .venv/bin/python scripts/bench_ingest.py --count 60 --repeat 3

``--receivers`` also takes ``ours-without-X[+Y]``: our listener with some of the pynetdicom
replacements of ``receive/transport.py`` left out (X, Y among ``pdu-reader``,
``receive-file``, ``lenient-uid``), to measure what each is worth; e.g.
``--receivers minimal,ours,ours-without-pdu-reader,ours-without-receive-file``.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs_classifier.receive.transport import PATCHES

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}

MINIMAL_SCP = """
import os, sys
from pynetdicom import AE, evt, AllStoragePresentationContexts
out = sys.argv[2]
def on_store(event):
    name = os.path.join(out, event.request.AffectedSOPInstanceUID)
    with open(name, "wb") as f:
        f.write(event.encoded_dataset())
    return 0x0000
ae = AE("MINIMAL")
ae.supported_contexts = AllStoragePresentationContexts
print("listening", flush=True)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def generate(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 2,048² 16-bit explicit VR little endian CR instances."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (2048, 2048), dtype=np.uint16)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.dcm"
        paths.append(path)
        if path.exists():
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID = ComputedRadiographyImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality, ds.BodyPartExamined = "BENCH", "CR", "CHEST"
        ds.Rows = ds.Columns = 2048
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        pixels[0, 0] = i
        ds.PixelData = pixels.tobytes()
        ds.save_as(path, enforce_file_format=True)
    return paths


def send(port: int, called: str, files: list[Path]) -> float:
    """storescu all ``files`` on one association; return files/s."""
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=ENV,
        check=True,
        capture_output=True,
    )
    return len(files) / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    files_per_s: float
    #: The receiver's own CPU per file: independent of how fast the sender can go.
    cpu_ms_per_file: float


def run_receiver(cmd: list[str], port: int, called: str, files: list[Path]) -> Run:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        before = cpu_seconds(proc.pid)
        rate = send(port, called, files)
        used = cpu_seconds(proc.pid) - before
        return Run(rate, 1000 * used / len(files))
    finally:
        proc.terminate()
        proc.wait(60)


def dcmtk_storescp(work: Path, files: list[Path]) -> Run:
    out = work / "dcmtk"
    out.mkdir()
    port = free_port()
    return run_receiver(["storescp", "-od", str(out), str(port)], port, "ANY-SCP", files)


def minimal_pynetdicom(work: Path, files: list[Path]) -> Run:
    out = work / "minimal"
    out.mkdir()
    port = free_port()
    cmd = [sys.executable, "-c", MINIMAL_SCP, str(port), str(out)]
    return run_receiver(cmd, port, "MINIMAL", files)


#: ``serve`` with some of transport.configure_pynetdicom's replacements left out.
PARTIAL_LISTENER = """
import functools, sys
from pacs_classifier.receive import transport
transport.configure_pynetdicom = functools.partial(
    transport.configure_pynetdicom, skip=sys.argv[1].split("+")
)
from pacs_classifier.cli import main
sys.exit(main(sys.argv[2:]))
"""


def ours(work: Path, files: list[Path], skip: str = "") -> Run:
    port = free_port()
    config = work / "config.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{work}/pacs.sqlite3"\n'
        f'[storage]\nroot = "{work}/dicom"\nmin_free_mb = 0\n'
        f'[listener]\nae_title = "PNEUMONIA_AI"\nport = {port}\n'
        '[logging]\nlevel = "WARNING"\n'
    )
    cli = [sys.executable, "-m", "pacs_classifier", "--config", str(config)]
    subprocess.run([*cli, "db", "upgrade"], cwd=REPO, check=True, capture_output=True)
    if skip:
        cli = [sys.executable, "-c", PARTIAL_LISTENER, skip, "--config", str(config)]
    run = run_receiver([*cli, "serve", "--roles", "listener"], port, "PNEUMONIA_AI", files)
    root = work / "dicom"  # stored instances; .tmp and .pending are dot folders
    stored = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if len(stored) != len(files):
        raise RuntimeError(f"ours ({skip or 'all patches'}): {len(stored)} of {len(files)} stored")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=60, help="files per run (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver (default 3)")
    parser.add_argument("--files", type=Path, help="where to keep the generated files")
    parser.add_argument(
        "--receivers",
        default="dcmtk,minimal,ours",
        help="comma-separated subset of dcmtk,minimal,ours (default all; ratios need all)",
    )
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("dcmtk (storescu, storescp) is required", file=sys.stderr)
        return 2
    files_dir = args.files or Path(tempfile.gettempdir()) / "pacs_bench_ingest_files"
    files = generate(files_dir, args.count)
    mb = sum(p.stat().st_size for p in files) / len(files) / 1e6
    print(f"{len(files)} files of {mb:.1f} MB; storescu with TCP_NODELAY=1; {args.repeat} runs")
    known: dict[str, tuple[str, Callable[[Path, list[Path]], Run]]] = {
        "dcmtk": ("dcmtk storescp", dcmtk_storescp),
        "minimal": ("minimal pynetdicom SCP", minimal_pynetdicom),
        "ours": ("ours (fsync + commit, SQLite)", ours),
    }
    chosen = [r.strip() for r in args.receivers.split(",") if r.strip()]
    for r in chosen:
        if r.startswith("ours-without-"):
            skip = r.removeprefix("ours-without-")
            if set(skip.split("+")) - set(PATCHES):
                parser.error(f"--receivers {r}: leave out any of {', '.join(PATCHES)}")
            known[r] = (r, functools.partial(ours, skip=skip))
    if not chosen or any(r not in known for r in chosen):
        parser.error(f"--receivers: choose from {', '.join(known)}, ours-without-PATCH")
    receivers = dict(known[r] for r in chosen)
    runs: dict[str, list[Run]] = {name: [] for name in receivers}
    # Interleave the receivers so a noisy neighbour hurts them all alike.
    for _ in range(args.repeat):
        for name, fn in receivers.items():
            with tempfile.TemporaryDirectory(dir=files_dir.parent) as work:
                runs[name].append(fn(Path(work), files))
            # The baselines leave ~500 MB of dirty pages; written back during the next
            # receiver's run they would slow whichever came next (and ours most, as it
            # fsyncs). Flush between runs, outside the timed part.
            os.sync()
    rate = {name: statistics.median(r.files_per_s for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r.cpu_ms_per_file for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        each = ", ".join(f"{r.files_per_s:.1f}" for r in rs)
        print(
            f"{name:32s} {rate[name]:6.1f} files/s (median; runs: {each}); "
            f"receiver CPU {cpu[name]:.1f} ms/file"
        )
    o, m, d = "ours (fsync + commit, SQLite)", "minimal pynetdicom SCP", "dcmtk storescp"
    if not {o, m, d} <= rate.keys():
        return 0
    print(
        f"ours / minimal pynetdicom = {rate[o] / rate[m]:.2f} files/s, "
        f"{cpu[m] / cpu[o]:.2f} by receiver CPU per file"
    )
    print(
        f"ours / dcmtk storescp     = {rate[o] / rate[d]:.2f} files/s, "
        f"{cpu[d] / cpu[o]:.2f} by receiver CPU per file"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
