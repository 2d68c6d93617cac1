"""How the program speaks: log lines in UTC with the zone, and TensorFlow's native chatter
kept out of the terminal while real errors pass."""

from __future__ import annotations

import logging
import re

from pacs_classifier.logs import FORMAT, UTCFormatter, keep_native_line

#: Lines TensorFlow 2.21 and LiteRT print on a machine without a GPU, as they are.
CHATTER = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796221733.587870   19426 port.cc:153] oneDNN custom operations are on. "
    b"You may see slightly different numerical results",
    b"I0000 00:00:1796221733.589275   19426 cudart_stub.cc:31] Could not find cuda drivers "
    b"on your machine, GPU will not be used.",
    b"I0000 00:00:1796221181.767229   10339 cpu_feature_guard.cc:227] This TensorFlow binary "
    b"is optimized to use available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other "
    b"operations, rebuild TensorFlow with the appropriate compiler flags.",
    b"E0000 00:00:1796221748.009964   19426 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    b"W0000 00:00:1758131437.322781 3722519 computation_placer.cc:177] computation placer "
    b"already registered.",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
]

#: What must reach the terminal: other native errors, a fatal one, and anything else.
KEPT = [
    b"E0000 00:00:1796221748.009964   19426 bfc_allocator.cc:485] Allocator ran out of memory",
    b"F0000 00:00:1796221748.009964   19426 tensor.cc:12] Check failed: dims() == 2",
    b"Traceback (most recent call last):",
    b"Segmentation fault",
    b"",
]


def test_native_chatter_is_dropped_and_errors_are_kept() -> None:
    assert [line for line in CHATTER if keep_native_line(line)] == []
    assert all(keep_native_line(line) for line in KEPT)


def test_log_lines_carry_utc_with_its_zone() -> None:
    record = logging.LogRecord("pacs_classifier.x", logging.INFO, __file__, 1, "hi", (), None)
    record.created = 1796221733.5871
    line = UTCFormatter(FORMAT).format(record)
    assert line == "2026-12-02 14:28:53.587Z INFO pacs_classifier.x: hi"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z INFO .*", line)
