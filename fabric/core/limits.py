"""Size limits that more than one layer enforces: each is defined here, once.

Pure constants. The manifest parser, the chunker, the store, the pack references and
the wire (`fabric.wire.protocol`, which re-exports them beside its own limits) all
import these names rather than repeating the numbers.
"""

from __future__ import annotations

MAX_CHUNK = 64 << 20  # the largest chunk (raw bytes) a manifest may list, a store reads or a frame carries
MAX_MANIFEST = 64 << 20  # the largest manifest (canonical JSON bytes) a patched manifest may decode to

__all__ = ["MAX_CHUNK", "MAX_MANIFEST"]
