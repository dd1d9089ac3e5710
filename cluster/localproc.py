"""A server process that runs from a data dir and outlives the process that started it.

`LocalProcess` is the shared part of `LocalS3Server` (cluster/seaweed.py) and `LocalPrometheus`
(cluster/prometheus.py): the pid file and the log file in the data dir, launching the server in its own
session, waiting until it answers, stopping it (SIGTERM, then SIGKILL) and finding it again from its pid
file in another process (`imagine down`). A subclass says what its server is (class attributes), how to tell
its command line apart (`_is_server_argv`), how to rebuild itself from one (`_from_argv`) and when it is
ready (`_ready`); it builds the command line and calls `_launch` from its own `start()`.

Finding a server from its pid file reads /proc, so that part is Linux-only.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar, Self

logger = logging.getLogger(__name__)


# ---- processes and files ------------------------------------------------------------------------

def _cmdline(pid: int) -> list[str] | None:
    """The argv of a running process, from /proc; None when it cannot be read (gone, or no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie answers kill(pid, 0) but serves nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(pid, 0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # field 3, after "(comm)"


def _read_pid(path: Path) -> int | None:
    """The pid in a pid file; None when the file is missing or does not hold a number."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    """The last `lines` lines of a log file from byte `offset` on (what this run of the server wrote)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# ---- the base class -----------------------------------------------------------------------------

class LocalProcess:
    """A server started from this process or attached to from its pid file in `data_dir`.

    Either `_proc` is set (this object started the server) or `_pid` is (`from_pidfile` found it); with
    neither, `pid` falls back to the pid file. The pid file is removed when the server stops.

    Subclasses set the class attributes below and implement `_is_server_argv`, `_from_argv`, `_ready` and
    `url` (where the server answers); they may override `_not_ready_reason` for the message when the server
    never gets ready.

    Attributes:
        name: the display name in log lines and errors ("SeaweedFS": "SeaweedFS (pid 12) survived SIGKILL").
        a_name: the same with an article, for "<a_name> (pid 12) already runs on <dir>".
        program: the command, for "<program> exited with code 1 during startup".
        error: the exception class raised for every failure.
        pid_file_name, log_file_name: the names of the pid file and the (appended) log file in data_dir.
        ready_poll_s: the pause between two readiness checks during startup.
        log: the logger for start and stop lines (the subclass's module logger, so records keep its name).
    """

    name: ClassVar[str]
    a_name: ClassVar[str]
    program: ClassVar[str]
    error: ClassVar[type[Exception]]
    pid_file_name: ClassVar[str]
    log_file_name: ClassVar[str]
    config_file_name: ClassVar[str] = "config"
    ready_poll_s: ClassVar[float] = 0.1
    log: ClassVar[logging.Logger] = logger

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None  # set when attached to a server started by another process

    # -- what a subclass provides --

    @property
    def url(self) -> str:
        """Where the server answers: "http://127.0.0.1:9090"."""
        raise NotImplementedError

    @property
    def description(self) -> str:
        """The server and its address, for log lines: "Prometheus at http://127.0.0.1:9090"."""
        return f"{self.name} at {self.url}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={str(self.data_dir)!r}, url={self.url!r})"

    @classmethod
    def _is_server_argv(cls, argv: list[str], data_dir: Path) -> bool:
        """True when argv (non-empty) is the command line of this kind of server running on data_dir."""
        raise NotImplementedError

    @classmethod
    def _from_argv(cls, data_dir: Path, pid: int, argv: list[str]) -> Self:
        """The object for the server with this pid and argv on data_dir (for `from_pidfile`); raises `error`
        when argv lacks what the constructor needs."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """True once the freshly launched server answers requests (polled every `ready_poll_s`)."""
        raise NotImplementedError

    def _not_ready_reason(self, timeout_s: float) -> str:
        """The start of the error message when `_ready()` stays False for timeout_s."""
        return f"{self.description} was not ready within {timeout_s} s"

    # -- files and state --

    @property
    def pid_file(self) -> Path:
        return self.data_dir / self.pid_file_name

    @property
    def log_file(self) -> Path:
        return self.data_dir / self.log_file_name

    @property
    def config_file(self) -> Path:
        """The server's config file in data_dir (for servers that have one: `config_file_name`)."""
        return self.data_dir / self.config_file_name

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._pid if self._pid is not None else _read_pid(self.pid_file)

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        pid = self.pid
        return pid is not None and self._serves_dir(pid, self.data_dir)

    @classmethod
    def _serves_dir(cls, pid: int, data_dir: Path) -> bool:
        """True when pid is a live server of this kind on data_dir (guards against a stale pid file and pid reuse)."""
        if not _alive(pid):
            return False
        argv = _cmdline(pid)
        return bool(argv) and cls._is_server_argv(argv, data_dir)

    # -- start and stop --

    def _refuse_if_running(self) -> None:
        """Raise `error` when a server of this kind already runs on data_dir (whoever started it)."""
        running = _read_pid(self.pid_file)
        if running is not None and self._serves_dir(running, self.data_dir):
            raise self.error(f"{self.a_name} (pid {running}) already runs on {self.data_dir}; "
                             "stop it first (`imagine down`)")

    def _launch(self, argv: list[str], timeout_s: float) -> None:
        """Run argv in its own session (it outlives this process), appending its output to the log file, write
        the pid file and wait until `_ready()`; raise `error` (with the log's tail) when it exits or times out."""
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self._pid = None
        self.pid_file.write_text(f"{self._proc.pid}\n")
        self._wait_ready(t0, timeout_s, log_offset)
        self.log.info("%s (pid %d, data %s) ready in %.1f s",
                    self.description, self._proc.pid, self.data_dir, time.monotonic() - t0)

    def stop(self, timeout_s: float = 15) -> bool:
        """SIGTERM, then SIGKILL after timeout_s; removes the pid file. Returns False when none was running."""
        pid = self.pid
        if pid is None or not self.is_running():
            self._forget()
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # exited meanwhile
        if not self._wait_exit(pid, timeout_s):
            self.log.warning("%s (pid %d) still running %.0f s after SIGTERM; sending SIGKILL",
                             self.name, pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 5):
                raise self.error(f"{self.name} (pid {pid}) survived SIGKILL")
        self._forget()
        self.log.info("%s (pid %d) on %s stopped", self.name, pid, self.data_dir)
        return True

    @classmethod
    def from_pidfile(cls, data_dir: Path) -> Self | None:
        """The server running on data_dir, started by any process; None (and a stale pid file removed) if none."""
        data_dir = Path(data_dir).resolve()
        pid = _read_pid(data_dir / cls.pid_file_name)
        if pid is None:
            return None
        if not cls._serves_dir(pid, data_dir):
            (data_dir / cls.pid_file_name).unlink(missing_ok=True)
            return None
        server = cls._from_argv(data_dir, pid, _cmdline(pid) or [])
        server._pid = pid
        return server

    @classmethod
    def stop_from_pidfile(cls, data_dir: Path, timeout_s: float = 15) -> bool:
        """Stop the server running on data_dir, whoever started it. Returns False when none was running."""
        server = cls.from_pidfile(data_dir)
        return server.stop(timeout_s) if server is not None else False

    # -- helpers --

    def _wait_ready(self, t0: float, timeout_s: float, log_offset: int) -> None:
        while time.monotonic() - t0 < timeout_s:
            if self._proc.poll() is not None:
                self._forget()
                raise self.error(f"{self.program} exited with code {self._proc.returncode} during startup; "
                                 f"{self.log_file} ends with:\n{_tail(self.log_file, log_offset)}")
            if self._ready():
                return
            time.sleep(self.ready_poll_s)
        self.stop()
        raise self.error(f"{self._not_ready_reason(timeout_s)}; "
                         f"{self.log_file} ends with:\n{_tail(self.log_file, log_offset)}")

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while _alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _forget(self) -> None:
        if _read_pid(self.pid_file) == self.pid:
            self.pid_file.unlink(missing_ok=True)
        self._pid = None
