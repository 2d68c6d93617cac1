"""The model bundle: a folder that holds everything needed to serve and audit one model.

Layout (SPEC §6)::

    model.json          Keras architecture (``model.to_json()``)
    weights.npz         every weight in float16, keys w0000, w0001, … in ``model.weights`` order
    metadata.json       version, image size, preprocessing, threshold + rule, calibration,
                        data summary and split, metrics per phase, seed, library versions,
                        and ``files``: the SHA-256 of every model file
    plots/*.png         training curves, ROC, PR, confusion matrix, calibration

float16 halves the size (InceptionV3: ~44 MB instead of 87 MB). The trainer computes the
validation metrics, temperature and threshold *after* rounding the weights to float16, so
the numbers in the metadata are those of the model as stored.

:func:`read_bundle` checks every checksum before anything is loaded: a corrupt or altered
bundle is a :class:`ModelError`, never a half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pacs_classifier.errors import ModelError
from pacs_classifier.model.metadata import (
    ARCHITECTURE_FILE,
    BUNDLE_FORMAT,
    CLASS_NAMES,
    METADATA_FILE,
    MODEL_FILES,
    SPLIT_FILE,
    WEIGHTS_FILE,
    BundleMetadata,
    dump_metadata,
    parse_metadata,
)

#: The name of the InceptionV3 base inside every bundle's model (Grad-CAM and fine-tuning find it).
BASE_NAME = "inception_v3_base"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(files: Mapping[str, str]) -> str:
    """One digest for the model: SHA-256 over the sorted ``name:sha256`` lines."""
    text = "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class BundleInfo:
    """A bundle whose files were checked against its metadata."""

    path: Path
    metadata: BundleMetadata

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def image_size(self) -> int:
        return self.metadata.image_size

    @property
    def threshold(self) -> float:
        return self.metadata.threshold.value

    @property
    def temperature(self) -> float:
        return self.metadata.calibration.temperature

    @property
    def calibration(self) -> tuple[float, float]:
        """(temperature, bias) of ``sigmoid(logit(p) / T + b)``; bias 0 is plain temperature
        scaling."""
        c = self.metadata.calibration
        return c.temperature, c.bias

    @property
    def sha256(self) -> str:
        return manifest_sha256(self.metadata.files)

    @property
    def created_at(self) -> datetime:
        return self.metadata.created_at


def read_metadata(path: str | Path) -> BundleMetadata:
    """The typed ``metadata.json`` of a bundle folder, validated; no checksum is checked."""
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"{root}: not a model bundle folder")
    meta_path = root / METADATA_FILE
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{root}: {METADATA_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta_path}: unreadable metadata: {exc}") from None
    try:
        return parse_metadata(raw)
    except ModelError as exc:
        raise ModelError(f"{meta_path}: {exc}") from None


def read_bundle(path: str | Path, *, verify: bool = True) -> BundleInfo:
    """Read ``metadata.json`` and check every model file's SHA-256 against it."""
    root = Path(path)
    metadata = read_metadata(root)
    if verify:
        for name, expected in sorted(metadata.files.items()):
            file = root / name
            if not file.is_file():
                raise ModelError(f"{root}: model file {name} is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise ModelError(
                    f"{file}: sha256 {actual[:12]}… does not match the bundle's "
                    f"{expected[:12]}… (corrupt or altered)"
                )
    return BundleInfo(root, metadata)


def split_images(info: BundleInfo, data_root: Path, part: str = "val") -> list[tuple[Path, int]]:
    """(path, label) of each image the bundle's split file lists under ``part`` that
    exists under ``data_root``, sorted by path.

    Entries are paths relative to the dataset root, ``NORMAL/IM-0115-0001.jpeg``; a bare
    file name (bundles written before relative entries) is looked up in each class folder.
    An entry that would leave the dataset root, or an unreadable split file, is a
    :class:`ModelError`.
    """
    split_file = info.path / (info.metadata.data.split_file if info.metadata.data else SPLIT_FILE)
    try:
        entries = json.loads(split_file.read_text(encoding="utf-8")).get(part, [])
    except FileNotFoundError:
        raise ModelError(f"{info.path}: no {split_file.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"{split_file}: unreadable split file: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ModelError(f"{split_file}: {part!r} must be a list of file paths")
    found = []
    for entry in sorted(entries):
        rel = PurePosixPath(entry)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ModelError(f"{split_file}: {entry!r} is not a path inside the dataset root")
        if len(rel.parts) == 1:
            candidates = [(data_root / cls / entry, label) for label, cls in enumerate(CLASS_NAMES)]
        elif rel.parts[0] in CLASS_NAMES:
            candidates = [(data_root.joinpath(*rel.parts), CLASS_NAMES.index(rel.parts[0]))]
        else:
            raise ModelError(f"{split_file}: {entry!r} is not under a class folder")
        found += [c for c in candidates if c[0].is_file()][:1]
    return found


def write_model_files(model: Any, out_dir: Path) -> dict[str, str]:
    """Write the architecture and float16 weights of a Keras model; return their SHA-256."""
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ARCHITECTURE_FILE).write_text(model.to_json(), encoding="utf-8")
    arrays = {
        f"w{i:04d}": np.asarray(w.numpy(), dtype=np.float16) for i, w in enumerate(model.weights)
    }
    with (out_dir / WEIGHTS_FILE).open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return {name: sha256_file(out_dir / name) for name in MODEL_FILES}


def load_keras_model(info: BundleInfo) -> Any:
    """Build the Keras model of a checked bundle, weights cast back to float32."""
    import keras
    import numpy as np

    import pacs_classifier.model.layers  # noqa: F401 - registers the bundle's own layers

    try:
        model = keras.models.model_from_json(
            (info.path / ARCHITECTURE_FILE).read_text(encoding="utf-8")
        )
        with np.load(info.path / WEIGHTS_FILE) as npz:
            weights = [npz[f"w{i:04d}"].astype(np.float32) for i in range(len(npz.files))]
        model.set_weights(weights)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ModelError(f"{info.path}: model cannot be built: {exc}") from exc
    return model


def write_metadata(out_dir: Path, metadata: BundleMetadata) -> None:
    """Write ``metadata.json``: the one place bundle metadata is written."""
    text = json.dumps(dump_metadata(metadata), indent=2, sort_keys=True, default=_json_default)
    (out_dir / METADATA_FILE).write_text(text + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return str(value)


__all__ = [
    "ARCHITECTURE_FILE",
    "BASE_NAME",
    "BUNDLE_FORMAT",
    "CLASS_NAMES",
    "METADATA_FILE",
    "MODEL_FILES",
    "WEIGHTS_FILE",
    "BundleInfo",
    "BundleMetadata",
    "load_keras_model",
    "manifest_sha256",
    "read_bundle",
    "read_metadata",
    "sha256_file",
    "split_images",
    "write_metadata",
    "write_model_files",
]
