"""The launcher's placement of Ray's temp dir: in the work area, with socket paths under the Unix limit."""
import os
import socket

import pytest

from cluster.raynode import _RAY_SOCKET_SUFFIX, _UNIX_PATH_MAX, ray_temp_dir


def test_short_temp_dir_is_used_as_is(tmp_path):
    short = tmp_path / "r"
    if len(str(short)) + _RAY_SOCKET_SUFFIX > _UNIX_PATH_MAX:  # pragma: no cover - deep pytest tmp
        return
    assert ray_temp_dir(short) == short and short.is_dir()


def test_deep_temp_dir_is_reached_through_a_short_link(tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 4)
    temp = ray_temp_dir(deep)
    assert temp != deep and temp.resolve() == deep.resolve()
    # A socket as deep as Ray's longest one binds through the link (it fails on the deep path).
    sock_dir = temp / "session_2026-11-25_17-51-20_770971_1234567" / "sockets"
    sock_dir.mkdir(parents=True)
    path = str(sock_dir / "dash_MetricsHead")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    assert (deep / "session_2026-11-25_17-51-20_770971_1234567" / "sockets" / "dash_MetricsHead").exists()
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError, match="too long"):
        s.bind(str(deep / "session_2026-11-25_17-51-20_770971_1234567" / "sockets" / "dash_MetricsHead2"))
    assert ray_temp_dir(deep) == temp  # idempotent
    os.unlink(temp)
