"""Size limits that more than one layer enforces: each is defined here, once.

Pure constants. The manifest parser, the chunker, the store, the pack references and
the wire (`fabric.wire.protocol`, which re-exports them beside its own limits) all
import these names rather than repeating the numbers. The JSON limits bound every
JSON document read from the network or a store (`fabric.core.boundedjson`); the path
limits are the file system's (docs/formats.md "Names and paths").
"""

from __future__ import annotations

MAX_CHUNK = 64 << 20  # the largest chunk (raw bytes) a manifest may list, a store reads or a frame carries
MAX_MANIFEST = 64 << 20  # the largest manifest (canonical JSON bytes) a patched manifest may decode to

MAX_JSON_DEPTH = 32  # nesting of arrays and objects in any JSON document read (a manifest needs 5)
MAX_JSON_DIGITS = 20  # digits of a JSON integer (2^64 has 20); more is refused before Python converts it

MAX_STATEMENT_BYTES = 65536  # a signed statement's envelope (docs/formats.md "Signed statements"), canonical JSON bytes

REPORT_MAX = 256 << 10  # one site report's JSON body, and one POST of a relay's aggregated reports
RELAYED_SITES_MAX = 10000  # sites whose reports one relay holds and forwards (docs/protocol.md "Relays")

MAX_PATH_BYTES = 4096  # a file path in a manifest, UTF-8 bytes (Linux PATH_MAX)
MAX_PATH_PART_BYTES = 255  # one component of it (NAME_MAX of every common file system)
MAX_PATH_DEPTH = 64  # components of it

__all__ = ["MAX_CHUNK", "MAX_MANIFEST", "MAX_JSON_DEPTH", "MAX_JSON_DIGITS", "MAX_PATH_BYTES",
           "MAX_STATEMENT_BYTES", "REPORT_MAX", "RELAYED_SITES_MAX",
           "MAX_PATH_PART_BYTES", "MAX_PATH_DEPTH"]
