"""The systemd notify protocol: a real `fabric origin` tells a socket the test binds when it
is ready (only once /livez answers), that it is alive (WATCHDOG=1 at half of
WATCHDOG_USEC), and that it is stopping (on SIGTERM); and the Notifier on its own."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from fabric.config import systemd_notify_env
from fabric.wire.systemd import Notifier
from helpers.http import request
from helpers.origin import free_port, write_token_file
from helpers.process import ServerProcess


@pytest.fixture
def notify_socket():
    """An abstract AF_UNIX datagram socket, as systemd binds one; yields (NOTIFY_SOCKET value, socket)."""
    name = f"@fabric-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    yield name, sock
    sock.close()


def _receive(sock: socket.socket, timeout: float) -> list[str]:
    """The next datagram's lines, or [] after `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode().split("\n")
    except socket.timeout:
        return []


def _drain(sock: socket.socket, quiet: float = 0.3) -> list[list[str]]:
    out = []
    while msg := _receive(sock, quiet):
        out.append(msg)
    return out


def test_origin_says_ready_once_livez_answers_then_watchdog_then_stopping(tmp_path, notify_socket, monkeypatch):
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WATCHDOG=1 every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    tokens = write_token_file(tmp_path / "tokens.toml")
    port = free_port()
    origin = ServerProcess(["origin", "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{port}",
                            "--tokens", str(tokens)], port, tmp_path / "origin.log", name="origin").spawn()
    try:
        deadline = time.monotonic() + 30
        first: list[str] = []
        while not first and time.monotonic() < deadline:
            assert origin.proc.poll() is None, origin.log_text()
            first = _receive(sock, 0.5)
        assert first and first[0] == "READY=1", (first, origin.log_text())
        assert any(line.startswith("STATUS=origin listening on 127.0.0.1:") for line in first), first
        # READY=1 comes after the bind: the very first probe after it answers
        assert request(origin.url, "GET", "/livez", timeout=5).status == 200

        t0 = time.monotonic()
        beats = [m for m in (_receive(sock, 2.0) for _ in range(4)) if m]
        assert beats == [["WATCHDOG=1"]] * 4, beats
        assert time.monotonic() - t0 < 1.6  # four beats at 0.2 s, with slack for a busy machine

        origin.proc.send_signal(signal.SIGTERM)
        assert origin.proc.wait(timeout=15) == 0, origin.log_text()
        after = _drain(sock)
        assert after and after[-1] == ["STOPPING=1"], after
        assert all(m == ["WATCHDOG=1"] for m in after[:-1]), after
    finally:
        origin.stop()


def test_origin_without_notify_socket_sends_nothing_and_serves(tmp_path, notify_socket, monkeypatch):
    _, sock = notify_socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    tokens = write_token_file(tmp_path / "tokens.toml")
    port = free_port()
    with ServerProcess(["origin", "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{port}",
                        "--tokens", str(tokens)], port, tmp_path / "origin.log", name="origin") as origin:
        assert request(origin.url, "GET", "/livez", timeout=5).status == 200
        assert _receive(sock, 0.5) == []


def test_notifier_sends_to_a_path_socket(tmp_path):
    path = Path(f"/tmp/fabric-notify-{uuid.uuid4().hex[:12]}.sock")  # sun_path holds 108 bytes: keep it short
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        try:
            assert Notifier(str(path)).notify("READY=1", "STATUS=hello")
            assert _receive(sock, 2) == ["READY=1", "STATUS=hello"]
        finally:
            path.unlink()


def test_notifier_without_socket_or_with_a_dead_one_does_nothing_and_never_raises():
    assert Notifier(None).notify("READY=1") is False
    dead = Notifier(f"@fabric-test-nobody-{uuid.uuid4().hex}")
    assert dead.notify("READY=1") is False
    assert dead.notify("WATCHDOG=1") is False  # warned once, still no exception
    asyncio.run(asyncio.wait_for(Notifier(None, 1.0).watchdog(), 1))  # returns at once: nothing to do


def test_watchdog_beats_from_the_event_loop_and_a_blocked_loop_goes_silent(notify_socket):
    address, sock = notify_socket

    async def scenario():
        task = asyncio.create_task(Notifier(address, 0.2).watchdog())
        await asyncio.sleep(0.35)  # beats at 0, 0.1, 0.2, 0.3
        time.sleep(0.5)  # a stuck loop: no beat while it blocks
        task.cancel()

    asyncio.run(scenario())
    beats = _drain(sock, 0.2)
    assert 3 <= len(beats) <= 5 and all(b == ["WATCHDOG=1"] for b in beats), beats


@pytest.mark.parametrize("env, expected", [
    ({}, (None, None)),
    ({"NOTIFY_SOCKET": "/run/systemd/notify"}, ("/run/systemd/notify", None)),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}, ("@x", 30.0)),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, ("@x", None)),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "SELF"}, ("@x", 30.0)),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "junk"}, ("@x", None)),
])
def test_systemd_notify_env(monkeypatch, env, expected):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(os.getpid()) if v == "SELF" else v)
    assert systemd_notify_env() == expected
