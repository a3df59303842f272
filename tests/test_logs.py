"""Log lines: ISO-8601 UTC timestamps, the process's component, a working debug level;
checked on the formatter and on real origin and agent processes' stderr."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime, timezone

import pytest

from agents.site.config import SiteConfig
from fabric import logs
from fabric.errors import ConfigError

from helpers.agent import SITE_TOKENS, AgentProcess
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, start_origin

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def captured():
    """`logs.setup` writing to a buffer; restores the fabric logger afterwards."""
    root = logging.getLogger("fabric")
    saved = root.handlers[:], root.level, root.propagate
    buf = io.StringIO()

    def setup(level: str) -> io.StringIO:
        logs.setup(level)
        root.handlers[0].setStream(buf)
        return buf
    yield setup
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_timestamps_are_iso_8601_utc_with_milliseconds():
    assert logs.iso_utc(1796162584.1239) == "2026-12-01T22:03:04.123Z"
    assert logs.iso_utc(0) == "1970-01-01T00:00:00.000Z"


def test_a_line_carries_ts_level_component_msg_and_fields(captured):
    buf = captured("info")
    logs.get_logger("origin").info("version committed", artifact="m", version="v2")
    [line] = _lines(buf)
    assert ISO.match(line["ts"])
    parsed = datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(parsed.timestamp() - datetime.now(timezone.utc).timestamp()) < 60
    assert (line["level"], line["component"], line["msg"], line["artifact"]) == ("info", "origin",
                                                                                "version committed", "m")


def test_bind_names_the_process_and_keeps_the_module_as_logger(captured):
    buf = captured("info")
    logs.bind("agent", site="fra-edge-1")
    logs.get_logger("pull").info("pulled", files=3)
    logs.get_logger("agent").info("version activated")
    first, second = _lines(buf)
    assert (first["component"], first["logger"], first["site"], first["files"]) == ("agent", "pull", "fra-edge-1", 3)
    assert second["component"] == "agent" and "logger" not in second


def test_debug_lines_appear_only_at_the_debug_level(captured):
    buf = captured("info")
    log = logs.get_logger("transfer")
    log.debug("fetch batch", chunks=4)
    assert buf.getvalue() == "" and not log.enabled("debug")
    buf = captured("debug")
    log.debug("fetch batch", chunks=4)
    [line] = _lines(buf)
    assert (line["level"], line["msg"], line["chunks"]) == ("debug", "fetch batch", 4)


def test_an_unknown_log_level_is_refused_naming_the_key():
    raw = {"site": "s", "data": "/tmp/x", "listen": "127.0.0.1:1", "origin": "http://o:1", "token": "t" * 20,
           "follow": ["m:prod"], "log_level": "verbose"}
    with pytest.raises(ConfigError) as e:
        SiteConfig.from_dict(raw, "site.toml")
    assert "site.toml: log_level: must be one of debug, info, warning, error" in e.value.message


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_real_processes_log_their_component_in_iso_time_and_an_agent_at_debug_logs_fetch_batches(tmp_path):
    from fabric.publish import publish
    from fabric.wire.client import RemoteTarget, SyncOrigin
    origin = start_origin(tmp_path / "origin", DEFAULT_TOKENS + SITE_TOKENS)
    agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"])
    agent.config.write_text('log_level = "debug"\n' + agent.config.read_text())
    try:
        agent.start()
        src = tmp_path / "src"
        src.mkdir()
        (src / "weights.bin").write_bytes(bytes(range(256)) * 4096)
        with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
            publish(src, artifact="m", target=RemoteTarget(so), version="v1", channel="prod")
        agent.wait_active("m", "v1")
    finally:
        agent.stop()
        origin.stop()
    agent_lines, origin_lines = _records(agent.log_text()), _records(origin.log_text())
    for line in agent_lines + origin_lines:
        assert ISO.match(line["ts"]), line
    assert {line["component"] for line in agent_lines} == {"agent"}
    assert {line.get("site") for line in agent_lines} == {"solo"}
    assert {line["component"] for line in origin_lines} == {"origin"}
    assert any(line["msg"] == "agent solo listening" for line in agent_lines)
    assert any(line["msg"] == "origin listening" for line in origin_lines)
    batches = [line for line in agent_lines if line["msg"] == "fetch batch"]
    assert batches and all(b["level"] == "debug" and b["logger"] == "transfer" and b["got"] >= 1 for b in batches)
    assert sum(b["got"] for b in batches) >= 1
    assert not any(line["level"] == "debug" for line in origin_lines)  # the origin runs at info
