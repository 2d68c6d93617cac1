"""Fuzz the listener's receive-side parser for longer than CI does.

    python scripts/fuzz_receive.py [--examples N]

Runs ``tests/test_fuzz_receive.py`` (mutated real files from ``../shared/data/dicom``
through ``receive.inspect.inspect_received``) with N examples (default 20,000; CI runs
60). A failure is printed by hypothesis with the smallest mutation that reproduces it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples)}
    test = REPO / "tests" / "test_fuzz_receive.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)]
    return subprocess.call(cmd, cwd=REPO, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
