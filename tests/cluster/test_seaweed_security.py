"""The local SeaweedFS refuses unsigned access on every port it opens (cluster/seaweed.py), against a real server."""
import base64
import hashlib
import hmac
import json
import os
import stat
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import grpc  # a Ray dependency
import pytest

from cluster.seaweed import (
    CA_FILE,
    CERT_FILE,
    GRPC_OFFSET,
    IDENTITIES_FILE,
    JWT_SECTIONS,
    KEY_FILE,
    SECURITY_FILE,
    LocalS3Server,
    SeaweedError,
    _grpc_certificates,
    _write_private,
    all_ports,
    pick_s3_port,
)

FID = "1,01637037d6"  # a file id: the volume server checks the JWT before it looks the file up
GRPC_METHOD = "/master_pb.Seaweed/GetMasterConfiguration"  # the master's; other servers answer UNIMPLEMENTED


def http(url, method="GET", data=None, headers=None):
    """(status, headers, body) of one unsigned request; never raises for an HTTP error status."""
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def hs256(key: str, claims: dict) -> str:
    """A JWT signed with key, as SeaweedFS's master would issue it."""
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    head = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + enc(json.dumps(claims).encode())
    return (head + b"." + enc(hmac.new(key.encode(), head, hashlib.sha256).digest())).decode()


def security(server) -> dict:
    return tomllib.loads((server.data_dir / SECURITY_FILE).read_text())


def grpc_code(port: int, credentials=None):
    """The status of one gRPC call to 127.0.0.1:port: plaintext without credentials, else over TLS."""
    target = f"127.0.0.1:{port}"
    with (grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
          if credentials else grpc.insecure_channel(target)) as channel:
        try:
            channel.unary_unary(GRPC_METHOD)(b"", timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def listeners(port_set) -> dict[int, list[str]]:
    """{port: [local address, ...]} of the listening TCP sockets (IPv4 and IPv6) on the given ports."""
    found: dict[int, list[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in port_set:  # 0A: LISTEN
                found.setdefault(int(port, 16), []).append(addr)
    return found


def test_every_port_listens_on_loopback_only(s3_server):
    ports = set(all_ports(s3_server.s3_port))
    assert listeners(ports) == {p: ["0100007F"] for p in ports}  # 127.0.0.1, no 0.0.0.0, no IPv6


def test_s3_takes_signed_requests_only(s3_server, storage):
    storage.put_bytes("sec/a.png", b"png", "image/png")
    assert storage.get_bytes("sec/a.png") == b"png"
    with urllib.request.urlopen(storage.presigned_url("sec/a.png", expires_s=60), timeout=5) as r:
        assert r.read() == b"png"
    for path in ("/", f"/{storage.bucket}", f"/{storage.bucket}/sec/a.png"):
        assert http(s3_server.url + path)[0] == 403
    assert http(f"{s3_server.url}/{storage.bucket}/sec/b", "PUT", b"x")[0] == 403


def test_volume_needs_a_jwt_for_every_read_and_write(s3_server):
    url = f"http://127.0.0.1:{s3_server.ports['volume']}"
    for method, path, data in (("GET", "/", None), ("GET", "/ui/index.html", None), ("GET", f"/{FID}", None),
                               ("HEAD", f"/{FID}", None), ("PUT", f"/{FID}", b"x"), ("POST", f"/{FID}", b"x"),
                               ("DELETE", f"/{FID}", None)):
        status, _, body = http(url + path, method, data)
        assert status == 401, (method, path, status, body)
    keys = security(s3_server)["jwt"]["signing"]
    exp = int(time.time()) + 60
    assert http(f"{url}/{FID}", headers={"Authorization": "Bearer " + hs256("wrong", {"fid": FID, "exp": exp})})[0] \
        == 401
    # the same request signed with the server's read key gets past the lock (the file does not exist)
    signed = "Bearer " + hs256(keys["read"]["key"], {"fid": FID, "exp": exp})
    assert http(f"{url}/{FID}", headers={"Authorization": signed})[0] == 404


def test_filer_http_is_off(s3_server, storage):
    url = f"http://127.0.0.1:{s3_server.ports['filer']}"
    storage.put_bytes("sec/f.txt", b"secret data")
    for method, path, data in (("GET", "/", None), ("GET", "/buckets/", None),
                               ("GET", f"/buckets/{storage.bucket}/sec/f.txt", None), ("PUT", "/x.txt", b"x"),
                               ("DELETE", f"/buckets/{storage.bucket}/sec/f.txt", None)):
        status, _, body = http(url + path, method, data, headers={"Accept": "application/json"})
        assert status == 404 and b"secret" not in body, (method, path, status, body)
    assert storage.get_bytes("sec/f.txt") == b"secret data"


def test_master_hands_out_no_file_ids_or_jwts(s3_server):
    """The master's data endpoints are off; what is left (status page, /cluster/status, /healthz) is read-only
    and, like every port, on 127.0.0.1 only (test_every_port_listens_on_loopback_only)."""
    url = f"http://127.0.0.1:{s3_server.ports['master']}"
    for path in ("/dir/assign", "/dir/lookup?volumeId=1", "/dir/status", "/vol/status", "/vol/grow?count=1",
                 "/vol/vacuum", "/col/delete?collection=x", "/collection/info", "/submit", f"/{FID}"):
        status, headers, _ = http(url + path)
        assert status == 404 and "Authorization" not in headers, (path, status)
    assert http(f"{url}/submit", "POST", b"x")[0] == 404


def test_admin_http_serves_no_ui_or_api(s3_server):
    url = f"http://127.0.0.1:{s3_server.ports['admin']}"
    for path in ("/", "/admin", "/object-store/users", "/api/cluster/topology", "/api/s3/users"):
        assert http(url + path)[0] == 404, path


@pytest.mark.parametrize("server", ["s3", "master", "volume", "filer", "admin"])
def test_grpc_needs_a_certificate_from_the_servers_ca(s3_server, server):
    d, port = s3_server.data_dir, s3_server.ports[server] + GRPC_OFFSET
    ca, cert, key = ((d / f).read_bytes() for f in (CA_FILE, CERT_FILE, KEY_FILE))
    other_ca, other_cert, other_key = _grpc_certificates()  # a CA of our own, as an attacker could make
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert grpc_code(port) == unavailable  # plaintext
    assert grpc_code(port, grpc.ssl_channel_credentials(ca)) == unavailable  # TLS without a client certificate
    assert grpc_code(port, grpc.ssl_channel_credentials(ca, other_key, other_cert)) == unavailable
    ok = grpc.StatusCode.OK if server == "master" else grpc.StatusCode.UNIMPLEMENTED
    assert grpc_code(port, grpc.ssl_channel_credentials(ca, key, cert)) == ok  # the servers' own certificate


def test_secrets_are_0600_fresh_and_off_the_command_line(s3_server):
    d = s3_server.data_dir
    for name in (SECURITY_FILE, IDENTITIES_FILE, KEY_FILE, CERT_FILE, CA_FILE):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    conf = security(s3_server)
    keys = [conf["jwt"]["signing"]["key"], conf["jwt"]["signing"]["read"]["key"],
            conf["jwt"]["filer_signing"]["key"], conf["jwt"]["filer_signing"]["read"]["key"]]
    assert len(keys) == len(JWT_SECTIONS) and len(set(keys)) == 4 and all(len(k) == 64 for k in keys)
    assert conf["grpc"]["ca"] == str(d / CA_FILE)
    assert {c: conf["grpc"][c]["key"] for c in ("master", "volume", "filer", "s3", "admin", "client")} == \
        dict.fromkeys(("master", "volume", "filer", "s3", "admin", "client"), str(d / KEY_FILE))
    assert b"PRIVATE KEY" not in (d / SECURITY_FILE).read_bytes()  # the key stays in its own file
    pid = s3_server.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert f"-config_dir={d}" in cmdline.split("\0")
    private_key = (d / KEY_FILE).read_text().splitlines()[1]
    for secret in (*keys, s3_server.secret_key, private_key):
        assert secret not in cmdline and secret not in environ


def test_an_unlocked_server_is_refused_and_stopped(tmp_path):
    """When weed runs without gRPC TLS (here: no [grpc] sections), start() fails closed."""
    class NoTls(LocalS3Server):
        def _write_security(self):
            super()._write_security()
            path = self.data_dir / SECURITY_FILE
            _write_private(path, path.read_text().split("[grpc]")[0].encode())

    class CheckFails(LocalS3Server):  # and when the check itself fails, the server is stopped all the same
        def _grpc_tls_context(self):
            raise FileNotFoundError(self.data_dir / CA_FILE)

    for cls, message in ((NoTls, "gRPC port .* does not speak TLS"), (CheckFails, "cannot check the ports")):
        server = cls(tmp_path / cls.__name__, pick_s3_port(), "ak", "sk-" + os.urandom(8).hex())
        with pytest.raises(SeaweedError, match=message):
            server.start()
        assert not server.is_running() and not (server.data_dir / "weed.pid").exists()
