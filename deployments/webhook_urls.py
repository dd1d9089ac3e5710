"""Where a job's webhook may go and how it gets there: `webhooks.allowed_hosts` (see
`cluster.config.WebhooksConfig`) applied to a URL's every resolved address, and HTTP(S) connections pinned to the
addresses that were checked (so DNS cannot change between the check and the connection). Used by
deployments/webhooks.py, which re-exports the public names.
"""
from __future__ import annotations

import fnmatch
import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cluster.config.services import HOST_PATTERN
from pipeline.request import InvalidRequestError

__all__ = ["MAX_URL_CHARS", "AllowList", "Attempt", "Target", "WebhookURLError", "connection", "resolve_target",
           "validate_webhook_url"]

MAX_URL_CHARS = 2048
_getaddrinfo = socket.getaddrinfo  # the one resolver (tests replace it to name hosts)


@dataclass(frozen=True)
class AllowList:
    """`webhooks.allowed_hosts`, parsed: networks (an address in one is allowed) and host name patterns (a name
    that matches one may resolve to public addresses)."""
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, entries: Iterable[str] | AllowList) -> AllowList:
        if isinstance(entries, AllowList):
            return entries
        if isinstance(entries, str):
            raise TypeError("allowed_hosts must be a list of entries, not one string")
        networks, names = [], []
        for entry in entries:
            e = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(e, strict=False))
                continue
            except ValueError:
                pass
            if not HOST_PATTERN.match(e.removesuffix(".")):
                raise ValueError(f"allowed_hosts entry {entry!r} is neither an address or network nor a host pattern")
            names.append(e.removesuffix("."))
        return cls(tuple(networks), tuple(names))

    def name_allowed(self, host: str) -> bool:
        host = host.lower().removesuffix(".")
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.names)

    def address_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, name_allowed: bool) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if address.is_unspecified or address.is_multicast:  # 0.0.0.0 reaches this machine
            return False
        if any(address in net for net in self.networks if net.version == address.version):
            return True
        return name_allowed and address.is_global


class WebhookURLError(InvalidRequestError):
    """A webhook URL that may not be used (the API's 422, field `webhook`). `transient`: its host could not be
    resolved, which may pass (a delivery retries it; a submission is refused)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__("webhook", message)
        self.transient = transient


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written (the Host header, TLS server name)
    port: int
    path: str  # path and query
    addresses: tuple[tuple[int, tuple], ...]  # (family, sockaddr): each one checked


def resolve_target(url: str, allowed: AllowList) -> Target:
    """The URL's target with its resolved addresses, every one of them allowed; else WebhookURLError."""
    if not isinstance(url, str) or not url:
        raise WebhookURLError("must be an http:// or https:// URL")
    if len(url) > MAX_URL_CHARS:
        raise WebhookURLError(f"must be at most {MAX_URL_CHARS} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise WebhookURLError("must not contain spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise WebhookURLError("must not contain credentials (user:password@)")
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise WebhookURLError("has an invalid port") from None
    if not host:
        raise WebhookURLError("has no host")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise WebhookURLError("has an invalid host name") from None
    refused = WebhookURLError(f"the host {host!r} cannot be resolved or is not allowed (webhooks.allowed_hosts)")
    try:
        infos = _getaddrinfo(ascii_host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # (socket.gaierror is an OSError) the same answer as refused: no probing
        raise WebhookURLError(refused.message, transient=True) from None
    name_ok = allowed.name_allowed(host)
    addresses = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            raise refused from None
        if not allowed.address_allowed(address, name_ok):
            raise refused
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    if not addresses:
        raise refused
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, path, tuple(addresses))


def validate_webhook_url(url: str, allowed_hosts: Iterable[str] | AllowList) -> str:
    """The URL, if a webhook may be sent there: http or https, no credentials, and every address its host resolves
    to allowed by `allowed_hosts` (entries as in `webhooks.allowed_hosts`; see `AllowList`). Resolves the host
    (blocking: call it in a thread from async code).

    Raises:
        WebhookURLError: an InvalidRequestError for the field `webhook` (unresolvable hosts and hosts that are not
            allowed get the same message, so that the answer does not tell which internal names exist).
    """
    resolve_target(url, AllowList.parse(allowed_hosts))
    return url



# ---- connections to the checked addresses -------------------------------------------------------------

class Attempt:
    """One attempt's connection, so that the event loop can cut it off at the deadline (shutdown, not close: the
    worker thread still owns the socket)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.aborted = False
        self.started: float | None = None  # time.monotonic() when a thread took it

    def connected(self, sock: socket.socket) -> None:
        with self.lock:
            self.sock = sock
            if self.aborted:
                raise TimeoutError("webhook delivery ran past its deadline")

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _connect(target: Target, timeout: float, attempt: Attempt) -> socket.socket:
    """A connection to one of the target's checked addresses (never a fresh DNS answer)."""
    error: OSError | None = None
    for family, sockaddr in target.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            attempt.connected(sock)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError("no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float, attempt: Attempt):
        super().__init__(target.host, target.port, timeout=timeout)
        self._target, self._attempt = target, attempt

    def connect(self) -> None:
        self.sock = _connect(self._target, self.timeout, self._attempt)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float, attempt: Attempt):
        self._tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self._tls)
        self._target, self._attempt = target, attempt

    def connect(self) -> None:
        sock = _connect(self._target, self.timeout, self._attempt)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        self._attempt.connected(self.sock)


def connection(target: Target, timeout: float, attempt: Attempt) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the target's checked addresses (`timeout` per socket operation; `attempt` can cut
    it off). For HTTPS the certificate is checked against the host as written."""
    return (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, timeout, attempt)
