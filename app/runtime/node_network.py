"""A network of its own for each simulated node of one App: Linux network namespaces on a bridge.

On loopback every node shares one address and one unlimited link, so nothing about the network between
nodes can be tested: not a partition, not a 1 Gbit/s link that a weight broadcast must share. Here each
node is a network namespace with its own IPv4 address, joined by a veth pair to a bridge that the App
creates in the driver's namespace. The driver reaches every node directly; nodes reach each other
through the bridge. There is no default route, NAT or forwarding change, so nothing leaves the host.

Everything is named after the owner's pid (``yrl<pid>b``, ``yrl<pid>n<i>``), so that what a killed App
left behind can be recognised and removed by the next one (``NodeNetwork.remove_stale``). It needs root
and iproute2; ``ip`` and ``tc`` are run as commands rather than through netlink bindings, so the steps
are the ones an operator would type, and a failure names the command and what it printed.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_IFNAMSIZ = 15  # the kernel's limit on an interface name, without its terminating NUL
MTU = "9000"  # jumbo frames, as data centre links for this traffic have: a sixth of the packets to process
_FIRST_NODE_HOST = 10  # node i gets the subnet's host address number 10 + i: .11, .12, ...
# What `ip` prints when asked to delete something that is not there (any more).
_ABSENT = ("Cannot find device", "No such file or directory", "does not exist")


class NodeNetworkError(RuntimeError):
    """A node network could not be made, changed or entered; ``command`` and ``stderr`` say why."""

    def __init__(self, message: str, command: Sequence[str] = (), stderr: str = "") -> None:
        super().__init__(message)
        self.command = list(command)
        self.stderr = stderr


@dataclass(frozen=True)
class NetnsNode:
    """One simulated node: its namespace, its address on the bridge and the driver's end of its link."""

    name: str
    netns: str
    address: str
    host_link: str


def _run(*command: str) -> str:
    """Run one iproute2 command; its stdout, or NodeNetworkError with what it printed."""
    try:
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        stderr = error.stderr.strip()
        raise NodeNetworkError(f"`{shlex.join(command)}` failed: {stderr}", command, stderr) from None
    return done.stdout


def _json(*command: str) -> list[dict]:
    """An ``ip -j`` listing; iproute2 prints nothing, not ``[]``, for "netns list" with no namespace."""
    return json.loads(_run(*command) or "[]")


def _run_if_present(*command: str) -> bool:
    """Run a deleting command; False if the thing was absent already, which is the outcome wanted too."""
    try:
        _run(*command)
    except NodeNetworkError as error:
        if not any(text in error.stderr for text in _ABSENT):
            raise
        return False
    return True


def check_available() -> None:
    """Raise NodeNetworkError unless this process can make namespaces: root, with ``ip`` and ``tc``."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = f"{', '.join(missing)} not found" if missing else f"running as uid {os.geteuid()}"
        raise NodeNetworkError(
            f"runtime.node_network=netns needs root and iproute2 (ip, tc), {why}; "
            "runtime.node_network=loopback works without them"
        )


def exec_in(netns: str) -> list[str]:
    """The command prefix that runs a process inside network namespace ``netns``."""
    return ["ip", "netns", "exec", netns]


def enter(netns: str) -> None:
    """Move the calling process into network namespace ``netns``, as ``ip netns exec`` would.

    setns(2) moves only the calling thread, so call it where that thread is the whole process: right
    after fork, or first thing in a fresh interpreter. Python 3.11 has no ``os.setns``, hence ctypes.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise NodeNetworkError(f"cannot open network namespace {netns}: {error.strerror}") from None
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            reason = os.strerror(ctypes.get_errno())
            raise NodeNetworkError(f"cannot enter network namespace {netns}: {reason}")
    finally:
        os.close(fd)


def _is_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie does not (it can no longer use what it made)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]  # the command name may hold spaces and ")"
    except (ProcessLookupError, FileNotFoundError):  # gone, or gone between the two looks
        return False
    return state != "Z"


class NodeNetwork:
    """The nodes of one App, each in its own network namespace on a bridge the App owns."""

    PREFIX = "yrl"
    _NAME = re.compile(rf"^{PREFIX}(\d+)(b|n\d+[hp]?)$")

    def __init__(
        self,
        nodes: int,
        subnet: str = "10.213.0.0/24",
        link_gbps: float | None = None,
        owner_pid: int | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a node network needs at least one node, not {nodes}")
        if link_gbps is not None and link_gbps <= 0:
            raise ValueError(f"link_gbps must be positive, not {link_gbps}")
        self.subnet = ipaddress.IPv4Network(subnet)
        hosts = self.subnet.num_addresses - 2  # less the network and broadcast addresses
        if hosts < _FIRST_NODE_HOST + nodes:
            raise ValueError(f"subnet {subnet} has {hosts} host addresses, too few for {nodes} nodes from .11")
        self.link_gbps = link_gbps
        self.base = f"{self.PREFIX}{os.getpid() if owner_pid is None else owner_pid}"
        self.bridge = f"{self.base}b"
        self.nodes = [
            NetnsNode(
                name=f"node{i}",
                netns=f"{self.base}n{i}",
                address=str(self.subnet.network_address + _FIRST_NODE_HOST + i),
                host_link=f"{self.base}n{i}h",
            )
            for i in range(1, nodes + 1)
        ]
        longest = max([self.bridge] + [self._peer(node) for node in self.nodes], key=len)
        if len(longest) > _IFNAMSIZ:
            raise ValueError(f"interface name {longest} is longer than the kernel's {_IFNAMSIZ} characters")

    @property
    def bridge_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @staticmethod
    def _peer(node: NetnsNode) -> str:
        """The veth end inside the node's namespace; it keeps this name there."""
        return f"{node.netns}p"

    def create(self) -> list[NetnsNode]:
        """Make the bridge and every node's namespace and link; on a failure, undo it all and raise."""
        self.remove_stale()
        self._check_subnet_free()
        prefix = f"/{self.subnet.prefixlen}"
        # A qdisc shapes only what leaves a device, so both ends get one: the host end's shapes traffic
        # into the node, the namespace end's traffic out of it. 256kb burst and 50ms latency kept 94 % of
        # a 1 Gbit/s rate in a measurement here; a smaller burst costs throughput.
        rate = f"{self.link_gbps * 1000:g}mbit" if self.link_gbps else ""
        shape = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"] if rate else []
        # Made before the try: if it exists, it belongs to a live NodeNetwork of this owner, not to us.
        _run("ip", "link", "add", self.bridge, "mtu", MTU, "type", "bridge")
        try:
            _run("ip", "addr", "add", self.bridge_address + prefix, "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for node in self.nodes:
                peer = self._peer(node)
                _run("ip", "netns", "add", node.netns)
                _run("ip", "link", "add", node.host_link, "mtu", MTU, "type", "veth", "peer", "name", peer, "mtu", MTU,
                     "netns", node.netns)
                _run("ip", "link", "set", node.host_link, "master", self.bridge, "up")
                _run("ip", "-n", node.netns, "link", "set", "lo", "up")
                _run("ip", "-n", node.netns, "addr", "add", node.address + prefix, "dev", peer)
                _run("ip", "-n", node.netns, "link", "set", peer, "up")
                if shape:
                    _run("tc", "qdisc", "replace", "dev", node.host_link, *shape)
                    _run("tc", "-n", node.netns, "qdisc", "replace", "dev", peer, *shape)
        except BaseException:
            self.remove()
            raise
        listing = ", ".join(f"{node.name}={node.address} ({node.netns})" for node in self.nodes)
        links = f"shaped to {rate} each way" if rate else "unshaped"
        logger.info("node network on %s (bridge %s): %s; links %s", self.subnet, self.bridge, listing, links)
        return self.nodes

    def _check_subnet_free(self) -> None:
        """Refuse a subnet this namespace already routes: the nodes would be unreachable, or hijack it."""
        for route in _json("ip", "-j", "-4", "route", "show"):
            if route["dst"] != "default" and ipaddress.IPv4Network(route["dst"], strict=False).overlaps(self.subnet):
                holder = f"{route['dst']} on device {route.get('dev', '?')}"
                raise NodeNetworkError(f"subnet {self.subnet} is already routed here ({holder}); choose another one")

    def remove(self) -> None:
        """Delete the namespaces, the links and the bridge; what is absent already is skipped."""
        for node in self.nodes:
            _run_if_present("ip", "netns", "del", node.netns)
            # A process still inside keeps the namespace, and with it the pair: delete our end too.
            _run_if_present("ip", "link", "del", node.host_link)
        _run_if_present("ip", "link", "del", self.bridge)

    def set_link(self, node: str, up: bool) -> None:
        """Cut (``up=False``) or heal a node's only link: a partition of that node, seen from all others."""
        _run("ip", "link", "set", self._node(node).host_link, "up" if up else "down")
        logger.info("node network: link of %s %s", node, "healed" if up else "cut")

    def link_is_up(self, node: str) -> bool:
        (link,) = _json("ip", "-j", "link", "show", "dev", self._node(node).host_link)
        return "UP" in link["flags"]

    def exec_prefix(self, node: str) -> list[str]:
        """The command prefix that runs a process inside the node's namespace."""
        return exec_in(self._node(node).netns)

    def _node(self, name: str) -> NetnsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in this node network; it has {[node.name for node in self.nodes]}")

    @classmethod
    def remove_stale(cls) -> list[str]:
        """Remove the namespaces and links of Apps whose process is gone (SIGKILLed, crashed)."""
        namespaces = [entry["name"] for entry in _json("ip", "-j", "netns", "list")]
        links = [entry["ifname"] for entry in _json("ip", "-j", "link", "show")]
        removed = []
        for kind, names in (("netns", namespaces), ("link", links)):
            for name in names:
                match = cls._NAME.match(name)
                if match is None or _is_alive(int(match.group(1))):
                    continue
                # Deleting a namespace takes its veth pair with it, so a link listed may be gone now.
                if _run_if_present("ip", kind, "del", name):
                    removed.append(name)
        if removed:
            logger.warning("removed what a killed App left behind: %s", ", ".join(removed))
        return removed
