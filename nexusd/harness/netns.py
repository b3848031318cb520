"""Hosts in network namespaces for tests and benches: one per node, joined by a bridge one.

Rule 1: only addresses inside namespaces this fixture creates (10.78.0.0/24) are used, and
every namespace it creates is deleted afterwards (their veths go with them).
Rule 2: slow links are tbf rate limits on both ends of a node's veth (netem is not
available on these kernels); `slow(i)` / `fast(i)` change them while daemons run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

SUBNET = "10.78.0"


def netns_available() -> str | None:
    """None when namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "add", "nxt-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "nxt-probe"], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class Namespaces:
    def __init__(self, size: int) -> None:
        tag = f"nxt{os.getpid() % 10000}"
        self.bridge = f"{tag}-br"
        self.names = [f"{tag}-{i}" for i in range(size)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(size)]

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def setup(self) -> None:
        _run("ip", "netns", "add", self.bridge)
        _run("ip", "netns", "exec", self.bridge, "ip", "link", "add", "br0", "type", "bridge")
        _run("ip", "netns", "exec", self.bridge, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _run("ip", "netns", "add", ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _run(
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "nx0",
                "type",
                "veth",
                "peer",
                "name",
                f"nxb{i}",
                "netns",
                self.bridge,
            )
            _run("ip", "-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "nx0")
            _run("ip", "-n", ns, "link", "set", "nx0", "up")
            _run("ip", "-n", self.bridge, "link", "set", f"nxb{i}", "master", "br0")
            _run("ip", "-n", self.bridge, "link", "set", f"nxb{i}", "up")

    def slow(self, i: int, rate: str = "1mbit") -> None:
        for ns, dev in ((self.names[i], "nx0"), (self.bridge, f"nxb{i}")):
            _run(
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "16kb",
                "latency",
                "500ms",
            )

    def fast(self, i: int) -> None:
        for ns, dev in ((self.names[i], "nx0"), (self.bridge, f"nxb{i}")):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                capture_output=True,
            )

    def teardown(self) -> None:
        for ns in [*self.names, self.bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def namespaces(size: int) -> Iterator[Namespaces]:
    ns = Namespaces(size)
    try:
        ns.setup()
        yield ns
    finally:
        ns.teardown()
