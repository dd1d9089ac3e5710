"""cluster/netns.py on real namespaces, veths and a bridge (no mocks): reachability, isolation, kills, clean-up.

Needs root (CI runs as root); a missing `ip` fails the tests with the install hint instead of skipping them.
The test labs use their own prefixes and the top of 10.213.0.0/16, apart from the product's default lab.
"""
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.netns import MARK, RULE_PRIORITY, NetworkLab, NetworkLabError, netns_list, pick_subnet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")

TEST_POOL = ipaddress.ip_network("10.213.192.0/18")
PREFIX = "imtest"

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{sys.argv[2]} {peer[0]}".encode())
    c.close()
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as c:
        print(c.recv(200).decode())
except OSError as e:
    print(type(e).__name__, e)
    sys.exit(3)
"""


def ip_json(*args):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout.strip()
    return json.loads(out) if out else []


def leftovers(prefix):
    """Everything a lab of this prefix could leave: namespaces, interfaces (marked or named), rules."""
    links = [x["ifname"] for x in ip_json("link", "show")
             if x["ifname"].startswith(prefix + "-") or x.get("ifalias") == f"{MARK}:{prefix}"]
    rules = [r for r in ip_json("rule", "show") if str(r.get("iif", "")).startswith(prefix + "-")]
    return [n for n in netns_list() if n.startswith(prefix + "-")] + links + rules


@pytest.fixture(scope="module")
def lab():
    NetworkLab.cleanup_stale(PREFIX)
    lab = NetworkLab(PREFIX, nodes=3, subnet=str(pick_subnet(TEST_POOL))).create()
    yield lab
    lab.delete()
    assert leftovers(PREFIX) == []


@pytest.fixture
def serve(lab):
    """serve(where, bind) -> (port, token): a TCP server in namespace `where` (None: the host) on `bind` that
    answers each connection with "<token> <peer address>"."""
    procs = []

    def start(where, bind):
        token = f"token-{len(procs)}-{os.getpid()}"
        argv = [sys.executable, "-c", SERVER, bind, token]
        kw = dict(stdout=subprocess.PIPE, text=True)
        p = subprocess.Popen(argv, **kw) if where is None else lab.popen(where, argv, **kw)
        procs.append(p)
        line = p.stdout.readline()
        assert line.strip().isdigit(), f"server in {where} on {bind} did not start (exit {p.poll()})"
        return int(line), token

    yield start
    for p in procs:
        p.kill()
        p.wait()


def connect(lab, where, host, port):
    """Run the client in namespace `where` (None: the host): (exit code, its output)."""
    argv = [sys.executable, "-c", CLIENT, host, str(port)]
    kw = dict(capture_output=True, text=True, timeout=30)
    p = subprocess.run(argv, **kw) if where is None else lab.run(where, argv, **kw)
    return p.returncode, p.stdout.strip()


def test_address_plan_and_layout(lab):
    net = ipaddress.ip_network(lab.subnet)
    assert net.prefixlen == 24 and net.subnet_of(TEST_POOL)
    assert lab.host_address == str(net[1])
    assert list(lab.addresses.values()) == [str(net[2]), str(net[3]), str(net[4])]
    assert list(lab.addresses) == netns_list_of(PREFIX) == ["imtest-n0", "imtest-n1", "imtest-n2"]
    (br,) = ip_json("addr", "show", "dev", lab.bridge)
    assert [(a["local"], a["prefixlen"]) for a in br["addr_info"] if a["family"] == "inet"] == [(lab.host_address, 24)]
    for ns, addr in lab.addresses.items():
        assert ip_json("link", "show", "dev", lab.veth(ns))[0]["master"] == lab.bridge
        links = {x["ifname"]: x for x in ip_json("-n", ns, "addr", "show")}
        assert set(links) == {"lo", "eth0"}
        assert "UP" in links["lo"]["flags"] and "UP" in links["eth0"]["flags"]
        assert [a["local"] for a in links["eth0"]["addr_info"] if a["family"] == "inet"] == [addr]
        routes = {r["dst"]: r.get("gateway") for r in ip_json("-n", ns, "-4", "route", "show")}
        assert routes == {"default": lab.host_address, str(net): None}


def netns_list_of(prefix):
    return sorted(n for n in netns_list() if n.startswith(prefix + "-"))


def test_namespaces_reach_the_host_address(lab, serve):
    port, token = serve(None, lab.host_address)
    for ns, addr in lab.addresses.items():
        assert connect(lab, ns, lab.host_address, port) == (0, f"{token} {addr}"), ns


def test_namespaces_and_host_reach_a_node_address(lab, serve):
    n0, n1, n2 = lab.namespaces
    port, token = serve(n0, lab.addresses[n0])
    assert connect(lab, n1, lab.addresses[n0], port) == (0, f"{token} {lab.addresses[n1]}")
    assert connect(lab, n2, lab.addresses[n0], port) == (0, f"{token} {lab.addresses[n2]}")
    assert connect(lab, None, lab.addresses[n0], port) == (0, f"{token} {lab.host_address}")
    assert connect(lab, n0, lab.addresses[n0], port) == (0, f"{token} {lab.addresses[n0]}")


def test_loopback_in_a_namespace_stays_there(lab, serve):
    n0, n1, n2 = lab.namespaces
    port, token = serve(n1, "127.0.0.1")
    assert connect(lab, n1, "127.0.0.1", port) == (0, f"{token} 127.0.0.1")  # it does serve, locally
    for where, host in [(n0, "127.0.0.1"), (n2, "127.0.0.1"), (None, "127.0.0.1"),
                        (n0, lab.addresses[n1]), (None, lab.addresses[n1])]:
        rc, out = connect(lab, where, host, port)
        assert rc != 0 and token not in out, (where, host, out)


def test_nothing_is_routed_beyond_the_bridge(lab):
    assert Path(f"/proc/sys/net/ipv4/conf/{lab.bridge}/forwarding").read_text().strip() == "0"
    assert {"priority": RULE_PRIORITY, "src": "all", "iif": lab.bridge, "action": "prohibit"} in ip_json("rule", "show")
    src = lab.addresses[lab.namespaces[0]]
    # route lookups only (`ip route get ... iif` sends nothing): the host refuses to forward for the lab ...
    for outside in ("198.51.100.7", "10.0.0.1"):
        p = subprocess.run(["ip", "route", "get", outside, "from", src, "iif", lab.bridge],
                           capture_output=True, text=True)
        assert p.returncode != 0, p.stdout
    # ... also when the bridge's forwarding is switched on (as a later write to ip_forward does): the rule holds
    forwarding = Path(f"/proc/sys/net/ipv4/conf/{lab.bridge}/forwarding")
    forwarding.write_text("1")
    try:
        p = subprocess.run(["ip", "route", "get", "198.51.100.7", "from", src, "iif", lab.bridge],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "Permission denied" in p.stderr, p.stdout + p.stderr  # prohibit
    finally:
        forwarding.write_text("0")
    # ... and delivers what is addressed to it
    (route,) = ip_json("route", "get", lab.host_address, "from", src, "iif", lab.bridge)
    assert route["type"] == "local"


def test_killing_a_namespace_kills_its_processes_only(lab):
    n0, n1, n2 = lab.namespaces
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    node = lab.popen(n2, ["sh", "-c", f"{' '.join(sleeper[:2])} '{sleeper[2]}' & exec sleep 301"])
    other = lab.popen(n1, sleeper)
    try:
        deadline = time.monotonic() + 10
        while len(lab.pids(n2)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = lab.pids(n2)
        assert node.pid in before and len(before) == 2, before
        assert other.pid in lab.pids(n1) and other.pid not in before
        assert sorted(lab.kill(n2)) == sorted(before)
        assert lab.pids(n2) == []
        assert node.wait(10) == -signal.SIGKILL
        assert other.poll() is None and lab.pids(n1) == [other.pid]
        assert lab.run(n2, ["true"]).returncode == 0  # the namespace itself lives on
    finally:
        other.kill()
        other.wait()


def test_delete_removes_everything_also_after_a_crash():
    prefix = "imtdel"
    NetworkLab.cleanup_stale(prefix)
    crashed = NetworkLab(prefix, nodes=2, subnet=str(pick_subnet(TEST_POOL))).create()
    orphan = crashed.popen(f"{prefix}-n1", ["sleep", "300"])
    # a new run with the same prefix: create() removes the stale lab (and kills its processes) first
    with NetworkLab(prefix, nodes=2, subnet=str(crashed.subnet)) as lab:
        assert orphan.wait(10) == -signal.SIGKILL
        assert lab.run(f"{prefix}-n0", ["ip", "-4", "-br", "addr", "show", "eth0"], capture_output=True,
                       text=True, check=True).stdout.split()[2] == f"{lab.addresses[f'{prefix}-n0']}/24"
        assert len(leftovers(prefix)) == 2 + 3 + 1  # namespaces, bridge and 2 veths, rule
        lab.popen(f"{prefix}-n0", ["sleep", "300"])
    assert leftovers(prefix) == []
    lab.delete()  # idempotent
    crashed.delete()
    assert NetworkLab.cleanup_stale(prefix) == []


def test_a_failed_create_removes_what_it_made_and_nothing_else():
    prefix = "imtpar"
    NetworkLab.cleanup_stale(prefix)
    foreign = f"{prefix}-h1"  # not ours: no mark; makes create() fail at the second node
    subprocess.run(["ip", "link", "add", foreign, "type", "bridge"], check=True)
    try:
        lab = NetworkLab(prefix, nodes=3, subnet=str(pick_subnet(TEST_POOL)))
        with pytest.raises(NetworkLabError, match=f"interface {foreign} exists but is not"):
            lab.create()
        assert leftovers(prefix) == [foreign]
    finally:
        subprocess.run(["ip", "link", "del", foreign], check=True)


def test_requirements_are_named():
    with pytest.raises(ValueError, match="prefix"):
        NetworkLab("far-too-long-prefix")
    # a non-root user is told to run as root, before anything is touched (the effective uid only, restored)
    os.seteuid(65534)
    try:
        with pytest.raises(NetworkLabError, match="network namespaces need root: run this as root"):
            NetworkLab("imtuser").create()
    finally:
        os.seteuid(0)
    assert leftovers("imtuser") == []
