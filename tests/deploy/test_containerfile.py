"""deploy/Containerfile, read as a build tool would: its instructions parse, every COPY
source exists in the repository (and survives the ignore file), the runtime user is not
root, the entry point is `fabric`, a HEALTHCHECK polls /livez and the data folder is a
VOLUME.

Building it needs its base image (python:3.11-slim-bookworm) and the package index, which
tests may not download: `test_the_image_builds_and_serves` runs only where podman is
installed, the base image is already in podman's store and FABRIC_TEST_PODMAN=1 says the
build may reach the index; everywhere else it skips, saying which of these is missing."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers.origin import free_port, write_token_file

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
IGNORE = ROOT / "deploy" / "Containerfile.dockerignore"
KNOWN = {"FROM", "ARG", "WORKDIR", "COPY", "RUN", "ENV", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
         "ENTRYPOINT", "CMD", "LABEL"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "a continuation line at the end"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM" or not stages:
            stages.append([])
        stages[-1].append(ins)
    return stages


def _final(word: str) -> list[str]:
    return [args for w, args in _stages()[-1] if w == word]


def _ignored(rel: str) -> bool:
    """Whether the .dockerignore rules (last match wins, ! re-includes) leave `rel` out."""
    ignored = False
    for rule in IGNORE.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!")
        if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern.rstrip("/*")):
            ignored = not negate
    return ignored


def test_every_instruction_is_known_and_it_starts_from_an_image():
    words = [w for w, _ in _instructions()]
    assert set(words) <= KNOWN, set(words) - KNOWN
    assert words[0] in ("ARG", "FROM") and "FROM" in words


def test_every_copy_source_exists_and_is_in_the_build_context():
    stages = {args.split()[-1]: n for n, args in enumerate(a for w, a in _instructions() if w == "FROM")
              if " AS " in args.upper()}
    for word, args in _instructions():
        if word != "COPY":
            continue
        parts = shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        sources = [p for p in parts if not p.startswith("--")][:-1]
        if any(f.startswith("--from=") for f in flags):
            assert flags[0].split("=", 1)[1] in stages, args
            continue
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not _ignored(src), f"COPY {src}: left out by {IGNORE.name}"


def test_it_installs_the_package_from_the_repository_with_the_s3_extra():
    run = " ".join(a for w, a in _instructions() if w == "RUN")
    assert 'pip install --no-cache-dir ".[${EXTRAS}]"' in run
    assert any(w == "ARG" and a == "EXTRAS=s3" for w, a in _instructions())
    assert "worker" in CONTAINERFILE.read_text()  # says how to add the worker extra (torch)
    assert "torch" not in run


def test_the_runtime_user_is_not_root():
    users = _final("USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit()  # numeric, so Kubernetes' runAsNonRoot can check it


def test_the_entry_point_is_fabric_and_the_role_is_the_command():
    assert [json.loads(a) for a in _final("ENTRYPOINT")] == [["fabric"]]
    assert [json.loads(a) for a in _final("CMD")] == [["--help"]]


def test_a_healthcheck_polls_livez_and_the_data_folder_is_a_volume():
    checks = _final("HEALTHCHECK")
    assert len(checks) == 1 and " CMD " in f" {checks[0]} "
    env = " ".join(_final("ENV"))
    assert "/livez" in checks[0] or "/livez" in env
    assert [json.loads(a) for a in _final("VOLUME")] == [["/var/lib/fabric"]]


# --- a real build, where it can be done without downloading in the test ----------------------

def _base_image() -> str:
    arg = next(a for w, a in _instructions() if w == "ARG" and a.startswith("PYTHON_IMAGE="))
    return arg.split("=", 1)[1]


def test_the_image_builds_and_serves(tmp_path):
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed")
    base = _base_image()
    if subprocess.run([podman, "image", "exists", base], capture_output=True).returncode != 0:
        pytest.skip(f"the base image {base} is not in podman's store, and tests do not pull")
    if os.environ.get("FABRIC_TEST_PODMAN") != "1":
        pytest.skip("the build installs from the package index: set FABRIC_TEST_PODMAN=1 to allow it")
    tag = f"localhost/fabric-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run([podman, "build", "--format", "docker", "-f", str(CONTAINERFILE),
                            "--ignorefile", str(IGNORE), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    name = f"fabric-test-{uuid.uuid4().hex[:8]}"
    try:
        inspect = json.loads(subprocess.run([podman, "image", "inspect", tag], capture_output=True,
                                            text=True, check=True).stdout)[0]
        assert inspect["Config"]["User"].split(":")[0] not in ("", "0", "root")
        assert subprocess.run([podman, "run", "--rm", tag], capture_output=True, text=True,
                              timeout=120).returncode == 0  # CMD --help
        write_token_file(tmp_path / "tokens.toml")
        port = free_port()
        subprocess.run([podman, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:7000",
                        "-v", f"{tmp_path}:/etc/fabric:ro", tag, "origin", "--store", "/var/lib/fabric/store",
                        "--listen", "0.0.0.0:7000", "--tokens", "/etc/fabric/tokens.toml"], check=True,
                       capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            hc = subprocess.run([podman, "healthcheck", "run", name], capture_output=True, text=True)
            if hc.returncode == 0:
                break
            time.sleep(1)
        assert hc.returncode == 0, hc.stdout + hc.stderr
    finally:
        subprocess.run([podman, "rm", "-f", name], capture_output=True)
        subprocess.run([podman, "rmi", "-f", tag], capture_output=True)
