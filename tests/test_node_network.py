"""Node networks for real: namespaces, a bridge, shaped links, partitions and what a killed App leaves.

They need root and iproute2, and make real namespaces and links; each test uses its own subnet so that
a failed test's leftovers cannot break the next one, and removes its network in a ``finally``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.runtime import node_network
from app.runtime.node_network import NodeNetwork, NodeNetworkError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2 (ip, tc)",
)

REPO = Path(__file__).resolve().parents[1]
PORT = 7311

# Inside a node: answer b"ok" to every connection, after saying on stdout that it listens.
SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.sendall(b"ok")
    connection.close()
"""


def serve(net: NodeNetwork, node: str) -> subprocess.Popen[str]:
    address = next(n.address for n in net.nodes if n.name == node)
    command = net.exec_prefix(node) + [sys.executable, "-c", SERVER, address, str(PORT)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline() == "listening\n"
    return server


def ask(address: str) -> bytes:
    with socket.create_connection((address, PORT), timeout=1) as connection:
        return connection.recv(2)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def leftovers(base: str) -> list[str]:
    """Lines of `ip -o link` and `ip netns list` that name anything of the network ``base``."""
    return [line for line in (ip("-o", "link") + ip("netns", "list")).splitlines() if base in line]


def stop(server: subprocess.Popen[str] | None) -> None:
    if server is not None:
        server.kill()
        server.wait()


def test_nodes_get_their_own_addresses_and_shaped_links_and_leave_nothing() -> None:
    net = NodeNetwork(2, subnet="10.213.5.0/24", link_gbps=1)
    server = None
    try:
        nodes = net.create()
        assert [(n.name, n.address) for n in nodes] == [("node1", "10.213.5.11"), ("node2", "10.213.5.12")]
        assert net.bridge_address == "10.213.5.1"
        listed = ip("netns", "list")
        assert all(n.netns in listed for n in nodes)
        assert "10.213.5.12/24" in ip("-n", nodes[1].netns, "-4", "-o", "addr", "show")

        server = serve(net, "node2")
        assert ask("10.213.5.12") == b"ok"

        tc = subprocess.run(["tc", "qdisc", "show", "dev", nodes[1].host_link], capture_output=True, text=True)
        assert "tbf" in tc.stdout and "1Gbit" in tc.stdout
        routes = subprocess.run(net.exec_prefix("node2") + ["ip", "route"], capture_output=True, text=True)
        assert "10.213.5.0/24" in routes.stdout and "default" not in routes.stdout
    finally:
        stop(server)
        net.remove()
    assert leftovers(net.base) == []
    net.remove()  # a second time: nothing left to remove is not an error


def test_a_failed_create_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    run = node_network._run

    def run_but_tc_fails(*command: str) -> str:
        if command[0] == "tc":
            raise NodeNetworkError("tc failed on purpose", command, "")
        return run(*command)

    monkeypatch.setattr(node_network, "_run", run_but_tc_fails)
    net = NodeNetwork(2, subnet="10.213.10.0/24", link_gbps=1)
    try:
        with pytest.raises(NodeNetworkError, match="on purpose"):
            net.create()
        assert leftovers(net.base) == []
    finally:
        net.remove()


def test_a_host_without_any_namespace_yet_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """iproute2 prints nothing at all (not ``[]``) for `ip -j netns list` before the first namespace."""
    run = node_network._run
    monkeypatch.setattr(node_network, "_run",
                        lambda *command: "" if command[1:] == ("-j", "netns", "list") else run(*command))
    assert NodeNetwork.remove_stale() == []


def test_a_cut_link_partitions_the_node_until_healed() -> None:
    net = NodeNetwork(2, subnet="10.213.6.0/24")
    server = None
    try:
        net.create()
        server = serve(net, "node1")
        assert ask("10.213.6.11") == b"ok" and net.link_is_up("node1")

        net.set_link("node1", False)
        assert not net.link_is_up("node1") and net.link_is_up("node2")
        with pytest.raises(OSError):
            ask("10.213.6.11")

        net.set_link("node1", True)
        assert net.link_is_up("node1")
        deadline = time.monotonic() + 5  # the bridge port takes a moment to forward again
        while True:
            try:
                assert ask("10.213.6.11") == b"ok"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        stop(server)
        net.remove()


def test_what_a_killed_app_left_behind_is_removed() -> None:
    script = (
        "import time; from app.runtime.node_network import NodeNetwork\n"
        "NodeNetwork(1, subnet='10.213.7.0/24').create(); print('ready', flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    net = NodeNetwork(1, subnet="10.213.7.0/24", owner_pid=owner.pid)  # the same names, to check and clean
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
        assert leftovers(net.base) != []
        owner.send_signal(signal.SIGKILL)
        # Not reaped yet: a zombie, whose pid still exists, must count as dead.
        deadline = time.monotonic() + 5
        while Path(f"/proc/{owner.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed owner never became a zombie"
            time.sleep(0.02)

        removed = NodeNetwork.remove_stale()
        assert net.nodes[0].netns in removed and net.bridge in removed
        assert leftovers(net.base) == []
    finally:
        owner.kill()
        owner.wait()
        net.remove()


def test_enter_moves_a_forked_child_into_the_node() -> None:
    net = NodeNetwork(1, subnet="10.213.8.0/24")
    try:
        (node,) = net.create()
        pid = os.fork()
        if pid == 0:  # the child: only the node's namespace has its address
            code = 1
            try:
                node_network.enter(node.netns)
                with socket.socket() as sock:
                    sock.bind((node.address, 0))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with pytest.raises(OSError), socket.socket() as sock:
            sock.bind((node.address, 0))
    finally:
        net.remove()


def test_a_subnet_in_use_or_too_small_is_refused() -> None:
    first = NodeNetwork(1, subnet="10.213.9.0/24")
    second = NodeNetwork(2, subnet="10.213.9.128/25", owner_pid=os.getppid())
    try:
        first.create()
        with pytest.raises(NodeNetworkError, match=r"10\.213\.9\.0/24"):
            NodeNetwork(1, subnet="10.213.9.0/24").create()  # the same subnet, from the same owner
        with pytest.raises(NodeNetworkError, match=r"10\.213\.9\.128/25.*10\.213\.9\.0/24 on device " + first.bridge):
            second.create()
        assert first.link_is_up("node1")  # the refused network touched nothing of the first one
        assert leftovers(second.base) == []
    finally:
        first.remove()
        second.remove()
    with pytest.raises(ValueError, match="too few"):
        NodeNetwork(4, subnet="10.0.0.0/30")
    with pytest.raises(ValueError, match="longer than"):
        NodeNetwork(1, owner_pid=10**9)  # yrl1000000000n1p: 16 characters


def test_check_available_says_root_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    node_network.check_available()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NodeNetworkError, match="needs root.*loopback works without"):
        node_network.check_available()


def test_an_app_asked_for_netns_without_root_fails_at_start_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import ConfigError, RuntimeConfig
    from app.runtime.openyuanrong import Runtime

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    runtime = Runtime(RuntimeConfig(local_nodes=2, node_network="netns"))
    with pytest.raises(ConfigError, match="needs root and iproute2"):
        runtime.start(shared_memory_mb=256)
    runtime.stop()
    assert runtime.network is None and runtime.nodes == []  # nothing was started
