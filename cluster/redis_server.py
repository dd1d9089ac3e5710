"""A local Redis, the job queue's broker: Debian's `redis-server`, on 127.0.0.1 only, with a password.

`imagine up` starts one (`make redis`, or `apt-get install -y redis-server`); the tests start one on a free port.
`host` binds it to another single address instead of 127.0.0.1 (the bridge of a cluster/netns.py lab, which Ray
nodes in namespaces reach).

    server = LocalRedis(Path(".imagine/redis"), port=6390, password="...")
    server.start()                   # returns once an authenticated PING answers (~0.1 s)
    server.url                       # "redis://127.0.0.1:6390/0" (no password in it: see `url_with_password`)
    LocalRedis.stop_from_pidfile(Path(".imagine/redis"))   # from any process: `imagine down`

The settings go in `redis.conf` in the data dir (mode 0600), never on the command line, so the password does
not show in `ps`: bind 127.0.0.1, protected mode, `requirepass`, append-only persistence (every accepted
job survives a restart of the server on the same dir), no RDB snapshots, and the process title left as its
argv (`redis-server <data_dir>/redis.conf`), which is how its pid file is checked.

Files in data_dir: redis.conf, redis.log (appended), redis.pid, appendonlydir/ (the data).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import quote

from cluster.localproc import LocalProcess
from cluster.seaweed import port_is_free

logger = logging.getLogger(__name__)

PID_FILE, LOG_FILE, CONFIG_FILE = "redis.pid", "redis.log", "redis.conf"
INSTALL_HINT = "install it with `make redis` (or `sudo apt-get install -y redis-server`)"


class RedisError(RuntimeError):
    """The local Redis could not be started or stopped; the message says why and what to do."""


def find_redis_server() -> str | None:
    """The `redis-server` binary on PATH, or None when it is not installed."""
    return shutil.which("redis-server")


def url_with_password(url: str, password: str | None) -> str:
    """redis://host:port/db -> redis://:<password>@host:port/db (for clients; never log or store the result)."""
    if not password:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://:{quote(password, safe='')}@{rest.split('@', 1)[-1]}"


class LocalRedis(LocalProcess):
    """One redis-server on host:port with its data in `data_dir`.

    Args:
        data_dir: where its config, log, pid file and append-only files live (created if missing).
        port: the TCP port.
        password: what clients must send (`requirepass`).
        redis_bin: the binary (default: `redis-server` on PATH).
        host: the one address it binds (default 127.0.0.1).
    """

    name = "Redis"
    a_name = "a Redis"
    program = "redis-server"
    error = RedisError
    pid_file_name = PID_FILE
    log_file_name = LOG_FILE
    config_file_name = CONFIG_FILE
    ready_poll_s = 0.05
    log = logger

    def __init__(self, data_dir: Path, port: int, password: str, redis_bin: str | None = None,
                 host: str = "127.0.0.1"):
        super().__init__(data_dir)
        self.port, self.password, self._bin, self.host = port, password, redis_bin, host

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs):
        """A redis-py client for this server (authenticated)."""
        import redis
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    def start(self, timeout_s: float = 20) -> None:
        """Write redis.conf and start the server; return once an authenticated PING answers.

        Raises:
            RedisError: the binary is missing, a server already runs on data_dir, the port is taken, or it
                does not answer within timeout_s (the message ends with the log's tail).
        """
        binary = self._bin or find_redis_server()
        if binary is None:
            raise RedisError(f"redis-server is not installed: {INSTALL_HINT}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_running()
        if not port_is_free(self.port, self.host):
            raise RedisError(f"port {self.port} is in use; choose another (queue.local.port in the config)")
        self._write_config()
        self._launch([binary, str(self.config_file)], timeout_s)

    # -- LocalProcess hooks --

    @classmethod
    def _is_server_argv(cls, argv: list[str], data_dir: Path) -> bool:
        return Path(argv[0]).name.startswith("redis-server") and str(data_dir / CONFIG_FILE) in argv[1:]

    @classmethod
    def _from_argv(cls, data_dir: Path, pid: int, argv: list[str]) -> LocalRedis:
        settings = _read_config(data_dir / CONFIG_FILE)
        if "port" not in settings:
            raise RedisError(f"redis-server (pid {pid}) on {data_dir} has no port in {CONFIG_FILE}; "
                             f"stop it by hand: kill {pid}")
        return cls(data_dir, int(settings["port"]), settings.get("requirepass", ""), redis_bin=argv[0],
                   host=settings.get("bind", "127.0.0.1").split()[0])

    def _ready(self) -> bool:
        import redis
        try:
            return bool(self.client(socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    # -- helpers --

    def _write_config(self) -> None:
        lines = [f"port {self.port}", f"bind {self.host}", "protected-mode yes", f'requirepass "{self.password}"',
                 f"dir {self.data_dir}", "appendonly yes", "appendfsync everysec", 'save ""', "daemonize no",
                 "set-proc-title no", 'logfile ""', "loglevel notice"]
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("# written by cluster/redis_server.py; it is rewritten at each start\n" + "\n".join(lines) + "\n")


def _read_config(path: Path) -> dict[str, str]:
    """The `name value` lines of a redis.conf (quotes stripped)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            out[name] = value.strip().strip('"')
    return out
