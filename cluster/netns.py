"""A private network of Linux network namespaces on one machine, for a real multi-node Ray cluster.

`NetworkLab(prefix, nodes)` builds, for prefix P and subnet S (a free 10.213.<k>.0/24 unless given):

    host (root namespace)                  namespace P-n0      namespace P-n1      namespace P-n2
    bridge P-br, S.1/24                    eth0 S.2/24, lo     eth0 S.3/24, lo     eth0 S.4/24, lo
      |- port P-h0 <== veth pair ==> eth0 of P-n0
      |- port P-h1 <== veth pair ==> eth0 of P-n1
      `- port P-h2 <== veth pair ==> eth0 of P-n2
    Host services the nodes use (S3, Redis) listen on S.1; the Ray nodes run in the namespaces.

Each namespace has `lo` up, its `eth0` (the far end of its veth pair; the near end is a port of the bridge)
and a default route via S.1, so a process inside one (`lab.run` / `lab.popen`: `ip netns exec P-n<i> ...`)
reaches the host on S.1 and the other namespaces on their addresses, and finds its own address the way Ray
does. A server bound to 127.0.0.1 inside a namespace is reachable only from that namespace.

Address plan: 10.213.0.0/16 (RFC 1918 private space) cut into /24s; `create()` takes the first /24 that no
route (any table) or address of the machine overlaps. The TEST-NET ranges are not used: sandboxes and CI
runners put their own uplinks there (192.0.2.0/24, for one). Host .1, nodes .2, .3, ... in order.

Nothing leaves the bridge: no NAT, no listener, and the host never routes for the lab. The bridge's own
`net.ipv4.conf.P-br.forwarding` is set to 0 (IPv4 decides forwarding on the input device, so this holds even
when the machine's ip_forward is on), and a policy rule `iif P-br prohibit` (priority RULE_PRIORITY, after the
`local` table) refuses whatever arrives from the lab for an address that is not the host's own; it also holds
if something later rewrites ip_forward (which resets per-device forwarding). Traffic between namespaces is
switched by the bridge and never routed. Only one-way datagrams from another machine could get in, and only
if the host forwards and that machine routes the lab subnet here; no reply can get out. IPv6 is off on the
host-side interfaces. Caveat: with br_netfilter loaded, bridged frames also pass iptables' FORWARD chain, so a
host firewall that drops there (Docker's policy) cuts the nodes off from each other; the tests would show it.
Two labs created at the same moment may pick the same /24: give concurrent labs distinct subnet= (and prefix).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`; `check_requirements()` says what is missing.
Every interface the lab creates carries the alias MARK:P and only such interfaces are ever deleted, with the
namespaces named P-n<i> and the rule on P-br: `delete()` (and `NetworkLab.cleanup_stale(P)`, which
`create()` runs first) removes all of them, after killing the processes in the namespaces, also after a
partial `create()` or a crashed earlier run.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

DEFAULT_PREFIX = "imagine"
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
MARK = "imagine-netlab"  # interface alias prefix: MARK:<prefix>
RULE_PRIORITY = 3213
INSTALL_HINT = "install iproute2 (Debian/Ubuntu: `apt-get install iproute2`)"
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,9}")  # P-h<i> must fit in 15 characters


class NetworkLabError(RuntimeError):
    """A lab could not be created, used or removed; the message says why."""


def _ip_path() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")


def check_requirements() -> None:
    """Raise NetworkLabError naming what to do when namespaces cannot be made here (no `ip`, not root)."""
    if _ip_path() is None:
        raise NetworkLabError(f"the `ip` command was not found: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise NetworkLabError("network namespaces need root: run this as root (e.g. with sudo)")


def _ip(*args: str, ok_missing: bool = False) -> str:
    """Run `ip ARGS`; its stdout. ok_missing: a vanished device or namespace is not an error."""
    p = subprocess.run([_ip_path() or "ip", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        err = p.stderr.strip()
        if ok_missing and re.search(r"Cannot find device|No such file|does not exist|No such process", err):
            return ""
        raise NetworkLabError(f"`ip {' '.join(args)}` failed: {err}")
    return p.stdout


def _ip_json(*args: str) -> list[dict]:
    out = _ip("-j", *args).strip()
    return json.loads(out) if out else []


def _write_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except FileNotFoundError:  # e.g. IPv6 disabled in this kernel: nothing to turn off
        if "/ipv4/" in path:
            raise


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine has a route (any table, default excepted) or an address in."""
    nets = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.ip_network(dst, strict=False))
    for link in _ip_json("-4", "addr", "show"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a.get('prefixlen', 32)}", strict=False))
    return nets


def pick_subnet(pool: ipaddress.IPv4Network = SUBNET_POOL, prefixlen: int = 24) -> ipaddress.IPv4Network:
    """The first /prefixlen of pool that overlaps no route or address of this machine."""
    used = used_networks()
    for net in pool.subnets(new_prefix=prefixlen):
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetworkLabError(f"no free /{prefixlen} in {pool} (all overlap this machine's routes): pass subnet=")


def netns_list() -> list[str]:
    return [n["name"] for n in _ip_json("netns", "list")]


def netns_pids(ns: str) -> list[int]:
    """The processes whose network namespace is ns (`ip netns pids`; exited ones are not listed)."""
    return [int(p) for p in _ip("netns", "pids", ns, ok_missing=True).split()]


def kill_netns(ns: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> list[int]:
    """Signal every process in ns until none is left (new children included); the pids signalled."""
    signalled: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := netns_pids(ns):
        if time.monotonic() > deadline:
            raise NetworkLabError(f"processes {pids} in namespace {ns} outlived signal {sig} for {timeout} s")
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            if pid not in signalled:
                signalled.append(pid)
        time.sleep(0.05)
    return signalled


def _teardown(prefix: str) -> list[str]:
    """Remove every namespace, marked interface and rule of prefix's labs; the names removed."""
    removed, errors = [], []
    for ns in netns_list():
        if re.fullmatch(rf"{re.escape(prefix)}-n\d+", ns):
            try:
                kill_netns(ns)
                _ip("netns", "del", ns, ok_missing=True)
                removed.append(ns)
            except NetworkLabError as e:
                errors.append(str(e))
    bridge = f"{prefix}-br"
    for rule in _ip_json("rule", "show"):
        if rule.get("iif") == bridge and rule.get("priority") == RULE_PRIORITY:
            _ip("rule", "del", "priority", str(RULE_PRIORITY), "iif", bridge, "prohibit", ok_missing=True)
            removed.append(f"rule iif {bridge}")
    links = [x["ifname"] for x in _ip_json("link", "show") if x.get("ifalias") == f"{MARK}:{prefix}"]
    for name in sorted(links, key=lambda n: n == bridge):  # the ports, then the bridge
        try:
            _ip("link", "del", "dev", name, ok_missing=True)  # a veth may go with its namespace meanwhile
            removed.append(name)
        except NetworkLabError as e:
            errors.append(str(e))
    if errors:
        raise NetworkLabError("; ".join(errors))
    return removed


class NetworkLab:
    """A bridge on the host (subnet .1) and `nodes` namespaces on it (.2, .3, ...); see the module doc."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, nodes: int = 3, subnet: str | None = None):
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r}: 1-10 lowercase letters or digits, starting with a letter")
        self.prefix = prefix
        self.subnet = ipaddress.IPv4Network(subnet) if subnet else None
        if not 1 <= nodes <= (self.subnet.num_addresses - 3 if self.subnet else 250):
            raise ValueError(f"nodes={nodes}: the subnet has no room for that many (and the host)")
        self.nodes = nodes
        self.bridge = f"{prefix}-br"
        self.namespaces = [f"{prefix}-n{i}" for i in range(nodes)]
        self.created = False

    def __repr__(self) -> str:
        return f"NetworkLab({self.prefix!r}, nodes={self.nodes}, subnet={str(self.subnet)!r})"

    def _net(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise NetworkLabError("the lab has no subnet yet: call create() first, or pass subnet=")
        return self.subnet

    @property
    def host_address(self) -> str:
        """The bridge's address: host services the nodes use listen here."""
        return str(self._net()[1])

    @property
    def addresses(self) -> dict[str, str]:
        """namespace name -> its address, in order (.2, .3, ...)."""
        return {ns: str(self._net()[i + 2]) for i, ns in enumerate(self.namespaces)}

    def veth(self, ns: str) -> str:
        """The host-side (bridge port) end of ns's veth pair."""
        return f"{self.prefix}-h{self.namespaces.index(ns)}"

    # ---- life cycle ---------------------------------------------------------------------------------

    @classmethod
    def cleanup_stale(cls, prefix: str = DEFAULT_PREFIX) -> list[str]:
        """Remove what labs with this prefix left behind (a crashed run); the names removed."""
        check_requirements()
        return _teardown(prefix)

    def create(self) -> Self:
        """Build the lab (after removing stale labs of the same prefix); on any failure remove it all."""
        check_requirements()
        if self.created:
            return self
        _teardown(self.prefix)
        if self.subnet is None:
            self.subnet = pick_subnet()
        elif clash := [str(u) for u in used_networks() if u.overlaps(self.subnet)]:
            raise NetworkLabError(f"subnet {self.subnet} overlaps this machine's networks {clash}")
        try:
            self._build()
        except BaseException:
            self.delete()
            raise
        self.created = True
        return self

    def _add_link(self, name: str, *spec: str) -> None:
        try:
            _ip("link", "add", name, *spec)
        except NetworkLabError as e:
            if "File exists" in str(e):
                raise NetworkLabError(f"interface {name} exists but is not an {MARK} of this prefix "
                                      f"(check it and remove it with `ip link del {name}`)") from e
            raise
        _ip("link", "set", "dev", name, "alias", f"{MARK}:{self.prefix}")

    def _build(self) -> None:
        net, br, host = self._net(), self.bridge, self.host_address
        self._add_link(br, "type", "bridge")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{br}/forwarding", "0")
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6", "1")
        _ip("rule", "add", "iif", br, "priority", str(RULE_PRIORITY), "prohibit")
        _ip("addr", "add", f"{host}/{net.prefixlen}", "dev", br)
        _ip("link", "set", "dev", br, "up")
        for i, (ns, addr) in enumerate(self.addresses.items()):
            port, far = f"{self.prefix}-h{i}", f"{self.prefix}-t{i}"
            _ip("netns", "add", ns)
            self._add_link(port, "type", "veth", "peer", "name", far, "netns", ns)
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6", "1")
            _ip("link", "set", "dev", port, "master", br, "up")
            _ip("-n", ns, "link", "set", "dev", far, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "dev", "lo", "up")
            _ip("-n", ns, "link", "set", "dev", "eth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", host, "dev", "eth0")

    def delete(self) -> None:
        """Kill the namespaces' processes and remove the namespaces, interfaces and rule (idempotent)."""
        if _ip_path() is None or os.geteuid() != 0:
            return  # nothing can have been created
        self.created = False
        _teardown(self.prefix)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()

    # ---- processes ----------------------------------------------------------------------------------

    def _exec(self, ns: str, argv: list[str]) -> list[str]:
        if ns not in self.namespaces:
            raise NetworkLabError(f"{ns!r} is not a namespace of this lab: {self.namespaces}")
        return [_ip_path() or "ip", "netns", "exec", ns, *map(str, argv)]

    def run(self, ns: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(argv, **kwargs) inside namespace ns."""
        return subprocess.run(self._exec(ns, argv), **kwargs)

    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen(argv, **kwargs) inside ns; its pid is argv's own (`ip netns exec` execs it)."""
        return subprocess.Popen(self._exec(ns, argv), **kwargs)

    def pids(self, ns: str) -> list[int]:
        """The processes running in ns."""
        self._exec(ns, [])
        return netns_pids(ns)

    def kill(self, ns: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> list[int]:
        """Kill every process in ns (the whole node), waiting until none is left; the pids signalled."""
        self._exec(ns, [])
        return kill_netns(ns, sig, timeout)
