"""docs/formats.md: every JSON example decodes, and what the page states holds for the code.

The page is written from the code; these tests keep it that way. They decode each JSON
example and check the manifest example against `Manifest` (it loads, re-canonicalizes
to the same bytes, has the stated id), the channel example against the stack rule, the
stated parameters and masks against the code, and the page's FastCDC pseudocode and
whole-file rule against the chunker the publisher really uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fabric.core import chunking, digest, dtypes
from fabric.core.manifest import MAX_CHUNK_SIZE, Manifest, _NAME_RE, canonical_json
from fabric.publish import LocalTarget, chunking_params, publish
from fabric.store.registry import Channel, Registry, _channel_from
from fabric.store.store import STORE_FORMAT, open_store

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
TEXT = DOC.read_text(encoding="utf-8")
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in _FENCE.findall(TEXT) if kind == lang]


def json_examples() -> list[tuple[str, object]]:
    return [(body, json.loads(body)) for body in blocks("json")]


def manifest_examples() -> list[str]:
    return [body for body, obj in json_examples() if isinstance(obj, dict) and "files" in obj]


def stated_id() -> str:
    m = re.search(r"The id of this manifest is `(blake3:[0-9a-f]{64})`", TEXT)
    assert m, "formats.md must state the example manifest's id"
    return m.group(1)


# --- the JSON examples ------------------------------------------------------------------

def test_every_json_example_parses():
    examples = json_examples()
    assert len(examples) >= 5
    for body, _ in examples:
        json.loads(body)  # raises with the offending text in the traceback


def test_the_manifest_example_loads_recanonicalizes_and_has_the_stated_id():
    examples = manifest_examples()
    assert len(examples) == 2  # the canonical bytes and the laid-out copy
    canonical = [b for b in examples if "\n" not in b.strip()]
    assert len(canonical) == 1
    data = canonical[0].rstrip("\n").encode("utf-8")
    m = Manifest.from_bytes(data)
    assert m.canonical() == data, "the example is not in canonical form"
    assert canonical_json(json.loads(data)) == data
    assert m.id == digest.digest(data) == stated_id()
    for body in examples:  # the laid-out copy is the same manifest
        assert Manifest.from_bytes(body.encode("utf-8")).id == stated_id()


def test_the_manifest_example_matches_the_prose():
    m = Manifest.from_bytes(manifest_examples()[0].encode("utf-8"))
    assert (m.artifact, m.version, m.parent) == ("tiny", "v2", "v1")
    assert [f.path for f in m.files] == ["README.md", "model.safetensors"]
    model = next(f for f in m.files if f.path == "model.safetensors")
    assert [n for _, n in model.chunks] == [176, 16, 8] and model.size == 200
    assert {t.name: (t.offset, t.length) for t in m.tensors} == {"embed.weight": (176, 16),
                                                                "head.bias": (192, 8)}
    assert m.chunking == chunking_params()
    ref = re.search(r"```text\n(blake3:[0-9a-f]{64})\n```", TEXT)
    assert ref and ref.group(1) == stated_id()  # the version ref example


def test_the_chunking_example_is_what_publish_records():
    objs = [o for _, o in json_examples() if isinstance(o, dict) and "cdc" in o]
    assert objs == [chunking_params()]


def test_the_store_marker_example():
    objs = [o for _, o in json_examples() if isinstance(o, dict) and set(o) == {"format"}]
    assert objs == [{"format": STORE_FORMAT}]


def test_the_channel_example_follows_the_stack_rule():
    objs = [o for _, o in json_examples() if isinstance(o, dict) and "history" in o and "statement" not in o
            and "staged" not in o]
    assert len(objs) == 1
    obj = objs[0]
    ch = Channel(obj["artifact"], obj["channel"], tuple(obj["history"]))
    assert ch.version == obj["version"] == "v1"
    assert [e["action"] for e in obj["history"]] == ["promote", "promote", "rollback"]
    assert ch.to_json() == obj


def test_the_staged_channel_example_reads_back():
    objs = [o for _, o in json_examples() if isinstance(o, dict) and "staged" in o]
    assert len(objs) == 1
    ch = _channel_from("tiny", "prod", json.dumps(objs[0]).encode())
    assert (ch.version, ch.staged_version) == ("v1", "v2")  # staged is no history entry
    assert ch.to_json() == objs[0]


def test_the_signed_channel_example_reads_back_with_its_statement():
    from fabric.store.signatures import check_channel_statement
    from fabric.trust import Envelope
    (obj,) = [o for _, o in json_examples() if isinstance(o, dict) and "history" in o and "statement" in o]
    ch = _channel_from(obj["artifact"], obj["channel"], json.dumps(obj).encode())
    assert ch.to_json() == obj and ch.sequence == obj["sequence"]
    env = Envelope.from_bytes(ch.statement_bytes)  # the object's canonical bytes are the envelope
    stmt = env.statement
    assert (stmt.artifact, stmt.channel, stmt.version, stmt.manifest, stmt.sequence) == (
        "tiny", "prod", ch.version, stated_id(), ch.sequence)
    # a writer accepts it for exactly that move, after sequence 0
    check_channel_statement(obj["statement"], artifact="tiny", channel="prod", version="v2",
                            manifest_id=stated_id(), action="promote", previous=0)


def test_a_store_written_by_the_code_matches_the_example(tmp_path):
    """Rebuild the example's files and check the code writes the ids the page shows."""
    src = tmp_path / "tiny"
    src.mkdir()
    header = {"__metadata__": {"format": "pt"},
              "embed.weight": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
              "head.bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    embed = (np.arange(1, 9, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    bias = np.array([0.25, -0.25], "<f4").tobytes()
    (src / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + embed + bias)
    (src / "README.md").write_text("# tiny\nA two-tensor model for the format examples.\n")
    for f in src.iterdir():
        f.chmod(0o644)  # the example's mode 420, whatever the umask
    store = open_store(tmp_path / "store")
    r = publish(src, artifact="tiny", version="v2", target=LocalTarget(store), metadata={"step": "200"})
    ours = Registry(store).manifest("tiny", "v2")
    doc = Manifest.from_bytes(manifest_examples()[0].encode("utf-8"))
    assert ours.files == doc.files and ours.tensors == doc.tensors
    assert r.chunks == 4
    assert (tmp_path / "store" / "refs" / "tiny" / "versions" / "v2").read_text() == r.manifest_id


# --- stated rules and parameters ----------------------------------------------------------

def test_the_name_regex_is_the_code_s():
    assert "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$" in blocks("text")[0]
    assert _NAME_RE.pattern == "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def test_the_parameter_table_is_the_code_s():
    for value, name in [(chunking.SEGMENT_SIZE, "safetensors segment size"),
                        (chunking.MAX_HEADER, "safetensors header length limit"),
                        (chunking.CDC_MIN, "FastCDC minimum chunk"),
                        (chunking.CDC_AVG, "FastCDC average chunk"),
                        (chunking.CDC_MAX, "FastCDC maximum chunk"),
                        (MAX_CHUNK_SIZE, "largest chunk a manifest may list")]:
        row = next(line for line in TEXT.splitlines() if line.startswith(f"| {name}"))
        assert f"| {value} (" in row, row


def test_the_dtype_list_is_the_code_s():
    line = next(line for line in TEXT.splitlines() if "`dtype`: one of `" in line)
    listed = re.search(r"one of `([^`]*)`", line).group(1).split()
    sizes = next(line for line in TEXT.splitlines() if "(element sizes" in line)
    stated = [int(x) for x in re.search(r"element sizes ([\d ]+)\)", sizes).group(1).split()]
    assert dict(zip(listed, stated)) == {name: d.size for name, d in dtypes.DTYPES.items()}


def test_the_encoder_s_width_rule_is_the_dtype_table_s():
    rule = (DOC.parent / "encodings.md").read_text(encoding="utf-8").split("1. **Width.**", 1)[1].split("2. **", 1)[0]
    stated = {name: int(width) for width, names in re.findall(r"(\d) for ((?:`\w+`,?\s*)+)", rule)
              for name in re.findall(r"`(\w+)`", names)}
    assert stated == {name: d.planes for name, d in dtypes.DTYPES.items() if d.planes > 1}


def _masks_from_doc() -> tuple[int, int]:
    s = int(re.search(r"MASK_S = (0x[0-9a-f]+)", TEXT).group(1), 16)
    l_ = int(re.search(r"MASK_L = (0x[0-9a-f]+)", TEXT).group(1), 16)
    return s, l_


def test_the_stated_masks_are_pyfastcdc_s():
    from pyfastcdc.py.constants import MASKS

    bits = 16  # round(log2(65536)), normalization level 1
    assert _masks_from_doc() == (MASKS[bits + 1], MASKS[bits - 1])


def _doc_cut(buf: bytes, gear, gear_ls, mask_s: int, mask_l: int) -> int:
    """The page's `cut` pseudocode, transcribed."""
    M = (1 << 64) - 1
    MIN, AVG, MAX = chunking.CDC_MIN, chunking.CDC_AVG, chunking.CDC_MAX
    n = len(buf)
    if n <= MIN:
        return n
    center, limit, h = min(AVG, n), min(MAX, n), 0
    for lo, hi, mask in ((MIN // 2 * 2, center // 2 * 2, mask_s), (center // 2 * 2, limit // 2 * 2, mask_l)):
        mask_ls = (mask << 1) & M
        for i in range(lo, hi, 2):
            h = ((h << 2) + gear_ls[buf[i]]) & M
            if not h & mask_ls:
                return i
            h = (h + gear[buf[i + 1]]) & M
            if not h & mask:
                return i + 1
    return limit


def test_the_fastcdc_pseudocode_gives_the_chunker_s_cuts():
    from pyfastcdc.py.constants import GEAR

    gear_ls = [(g << 1) & ((1 << 64) - 1) for g in GEAR]
    mask_s, mask_l = _masks_from_doc()
    data = np.random.default_rng(7).integers(0, 256, 600_000, dtype=np.uint8).tobytes()
    data += b"\0" * 300_000  # a run with no cut point: exercises MAX
    ours, pos = [], 0
    while pos < len(data):
        n = _doc_cut(data[pos:pos + chunking.CDC_MAX], GEAR, gear_ls, mask_s, mask_l)
        ours.append(n)
        pos += n
    assert ours == chunking.CdcChunker().cuts(data, final=True)
    assert max(ours) == chunking.CDC_MAX


@pytest.mark.parametrize("size", [0, 1000, 20_000_000])
def test_publish_cuts_a_file_as_fastcdc_does_over_the_whole_file(tmp_path, size):
    """The page: the 8 MiB read windows never show in the cuts."""
    data = np.random.default_rng(size).bytes(size)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob.bin").write_bytes(data)
    publish(tmp_path / "src", artifact="a", version="v1", target=LocalTarget(open_store(tmp_path / "s")))
    m = Registry(open_store(tmp_path / "s")).manifest("a", "v1")
    (entry,) = m.files
    assert [n for _, n in entry.chunks] == chunking.CdcChunker().cuts(data, final=True)
    pos = 0
    for cid, n in entry.chunks:
        assert cid == digest.digest(data[pos:pos + n])
        pos += n
