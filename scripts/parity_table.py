"""Export a bundle's runtimes into a scratch copy and print their parity with Keras.

    nice -n 10 .venv/bin/python scripts/parity_table.py models/reference \
        --data ../shared/data/cxr224/train [--max-images 300]

Exactly what registration does (``export_runtimes``: ONNX float32; int8 dynamic-range,
then static int8 when dynamic-range misses the probability bound), on a copy in a
temporary folder, so the bundle itself is not touched. Prints, per runtime: max and mean
|Δprobability| against Keras on the parity images, label agreement, AUC difference,
images/s (batches of 8), whether the OOD scores agree, and whether it may serve. With
``--record FILE`` the printed ``runtimes.json`` is an existing one (no export).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_classifier.model.export import export_runtimes  # noqa: E402


def rows(record: dict[str, Any]) -> list[list[str]]:
    out = [
        ["keras", "float32", "0", "0", "1", "0", str(record["keras"]["images_per_s"]), "-", "yes"]
    ]
    entries = []
    for name, entry in record["runtimes"].items():
        if "dynamic_range" in entry:
            earlier = {**entry["dynamic_range"], "quantisation": "dynamic-range", "usable": False}
            entries.append((name, earlier))
        entries.append((name, entry))
    for name, e in entries:
        p = e.get("parity", {})
        ood = e.get("ood", {})
        out.append(
            [
                name,
                str(e.get("quantisation", "float32")),
                f"{p.get('max_abs_delta_probability', float('nan')):.2e}",
                f"{p.get('mean_abs_delta_probability') or float('nan'):.2e}",
                f"{p.get('label_agreement', 1.0):.4f}",
                f"{p.get('auc_delta') or 0.0:.4f}",
                str(e.get("images_per_s", "-")),
                f"{ood['decisions_differing']} of {ood['images']}" if "images" in ood else "-",
                "yes" if e.get("usable") else f"no: {e.get('refused') or e.get('error')}",
            ]
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--data", type=Path, help="dataset root the bundle's split.json is under")
    ap.add_argument("--record", type=Path, help="print this runtimes.json instead")
    ap.add_argument("--json", type=Path, help="also write the new record here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.record:
        record = json.loads(args.record.read_text(encoding="utf-8"))
    else:
        with tempfile.TemporaryDirectory(prefix="pacs-parity-") as tmp:
            copy = Path(tmp) / args.bundle.name
            shutil.copytree(args.bundle, copy)
            record = export_runtimes(
                copy, max_images=args.max_images, force=True, data_root=args.data
            )
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"parity inputs: {record['parity_inputs']}; auto serves {record['auto']}")
    header = [
        "runtime",
        "quantisation",
        "max |Δp|",
        "mean |Δp|",
        "labels",
        "AUC Δ",
        "images/s",
        "OOD decisions differing",
        "serves",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows(record):
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
