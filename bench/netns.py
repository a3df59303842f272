"""Two network namespaces joined by one veth pair, shaped with `tc tbf`: a private link.

    with shaped_link(rate="1gbit") as link:
        server = link.popen("a", ["nginx", "-c", conf])
        link.run("b", ["curl", "-o", "/dev/null", f"http://{link.addr_a}:8080/f"])

Namespace `a` holds `addr_a`, namespace `b` holds `addr_b`, both from one private
/30 that exists only inside the two namespaces, so traffic flows only between them
(no route, bridge or NAT to the host). Each end's egress is shaped with a token
bucket (`tc qdisc add dev X root tbf rate R burst B latency L`); netem is not
available on these machines. Processes started with `popen` are stopped, and both
namespaces (with the veth pair inside them) deleted, when the block exits, whether
it exits normally or by an exception. Needs root (CAP_NET_ADMIN) and `ip`/`tc`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

DEFAULT_SUBNET = ("10.213.7.1", "10.213.7.2", 30)  # a private /30, inside the namespaces only


class NetnsUnavailable(RuntimeError):
    """Namespaces, veth links or tbf cannot be set up here (not root, no `ip`/`tc`, …)."""


@dataclass
class Link:
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str
    rate: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ns(self, side: str) -> str:
        return {"a": self.ns_a, "b": self.ns_b}[side]

    def wrap(self, side: str, cmd: Sequence[str]) -> list[str]:
        """`cmd` prefixed so that it runs inside namespace `side` ("a" or "b")."""
        return ["ip", "netns", "exec", self.ns(side), *map(str, cmd)]

    def popen(self, side: str, cmd: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running process in `side`; it is stopped when the link is torn down."""
        proc = subprocess.Popen(self.wrap(side, cmd), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, side: str, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(side, cmd), **kw)

    def qdisc_stats(self, side: str) -> str:
        dev = self.dev_a if side == "a" else self.dev_b
        return _ip(["netns", "exec", self.ns(side), "tc", "-s", "qdisc", "show", "dev", dev], tool="ip")


def available() -> str | None:
    """None if a shaped link can probably be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2)"
    return None


@contextmanager
def shaped_link(*, rate: str = "1gbit", burst: str = "512kb", latency: str = "20ms",
                subnet: tuple[str, str, int] = DEFAULT_SUBNET, tag: str | None = None) -> Iterator[Link]:
    """Build the two namespaces and the shaped veth pair; tear everything down on exit.

    Raises:
        NetnsUnavailable: the link could not be built (whatever was built is removed).
    """
    reason = available()
    if reason:
        raise NetnsUnavailable(reason)
    tag = tag or f"fb{os.getpid() % 100000}"
    addr_a, addr_b, prefix = subnet
    link = Link(f"{tag}a", f"{tag}b", f"{tag}va", f"{tag}vb", addr_a, addr_b, rate)
    created: list[str] = []
    try:
        try:
            for ns in (link.ns_a, link.ns_b):
                _ip(["netns", "add", ns])
                created.append(ns)
            _ip(["link", "add", link.dev_a, "type", "veth", "peer", "name", link.dev_b])
            created.append("veth")
            for ns, dev, addr in ((link.ns_a, link.dev_a, addr_a), (link.ns_b, link.dev_b, addr_b)):
                _ip(["link", "set", dev, "netns", ns])
                _ip(["-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", dev])
                _ip(["-n", ns, "link", "set", dev, "up"])
                _ip(["-n", ns, "link", "set", "lo", "up"])
                _ip(["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                     "tbf", "rate", rate, "burst", burst, "latency", latency], tool="tc")
        except NetnsUnavailable:
            raise
        except (OSError, subprocess.SubprocessError) as e:
            raise NetnsUnavailable(str(e)) from None
        yield link
    finally:
        _teardown(link, created)


def _teardown(link: Link, created: list[str]) -> None:
    for proc in reversed(link.procs):
        _stop(proc)
    if "veth" in created:  # normally gone with its namespace; this covers a half-built link
        subprocess.run(["ip", "link", "del", link.dev_a], capture_output=True)
    for ns in created:
        if ns != "veth":
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _ip(args: list[str], tool: str = "ip") -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise NetnsUnavailable(f"{tool}: `ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res.stdout
