"""cluster/storage.py and cluster/seaweed.py against a real SeaweedFS on loopback."""
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from cluster.seaweed import (
    KEY_FILE,
    SECURITY_FILE,
    LocalS3Server,
    all_ports,
    derived_ports,
    find_free_port,
    pick_s3_port,
    port_is_free,
)
from cluster.storage import (
    KeyNotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    decode_metadata,
    encode_metadata,
    fit_metadata,
    image_key,
    job_key,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PROMPT = "  un chat roux über café, 100% 🐱 — 猫 "
REPO = Path(__file__).resolve().parents[2]


def test_put_get_head_and_delete(storage):
    storage.put_bytes("misc/a.bin", b"hello", "application/x-test", {"origin": "test"})
    assert storage.get_bytes("misc/a.bin") == b"hello"
    head = storage.head("misc/a.bin")
    assert (head["ContentType"], head["ContentLength"], head["Metadata"]) == ("application/x-test", 5,
                                                                             {"origin": "test"})
    assert storage.exists("misc/a.bin")
    storage.delete("misc/a.bin")
    assert not storage.exists("misc/a.bin")


def test_png_metadata_round_trips_non_ascii(storage):
    meta = {"prompt": PROMPT, "seed": 42, "steps": 20, "model": "tiny", "width": 64, "height": 48,
            "guidance_scale": 7.5}
    key = storage.put_png("img_" + "a" * 24, 3, PNG, meta)
    assert key == "images/img_aaaaaaaaaaaaaaaaaaaaaaaa/3.png"
    head = storage.head(key)
    assert head["ContentType"] == "image/png"
    assert all(v.isascii() for v in head["Metadata"].values())
    assert decode_metadata(head["Metadata"]) == {**{k: str(v) for k, v in meta.items()},
                                                 "job_id": "img_" + "a" * 24, "index": "3"}
    assert storage.get_bytes(key) == PNG


def test_long_metadata_is_shortened_to_fit(storage):
    meta = fit_metadata(encode_metadata({"prompt": "猫" * 1000, "seed": 1}))
    assert sum(len(k) + len(v) for k, v in meta.items()) <= 2048
    assert meta["truncated"] == "prompt" and meta["seed"] == "1"
    assert set(decode_metadata(meta)["prompt"]) == {"猫"}
    key = storage.put_png("img_" + "b" * 24, 0, PNG, {"prompt": "猫" * 1000})
    assert decode_metadata(storage.head(key)["Metadata"])["truncated"] == "prompt"


def test_metadata_must_be_ascii_and_keys_safe(storage):
    with pytest.raises(ValueError, match="not ASCII"):
        storage.put_bytes("misc/b", b"x", metadata={"prompt": "über"})
    with pytest.raises(ValueError, match="metadata key"):
        encode_metadata({"bad key": "x"})


def test_layout_rejects_unsafe_ids():
    assert job_key("img_0123") == "jobs/img_0123.json"
    for bad in ("../x", "a/b", "", "img_1.png"):
        with pytest.raises(ValueError):
            image_key(bad, 0)
        with pytest.raises(ValueError):
            job_key(bad)


def test_list_keys_paginates(storage):
    keys = [f"list/{i:02d}" for i in range(5)]
    for k in keys:
        storage.put_bytes(k, b"x")
    storage.put_bytes("other/0", b"x")
    calls = []
    storage._client.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    assert storage.list_keys("list/", page_size=2) == keys
    assert len(calls) == 3  # 2 + 2 + 1
    assert storage.list_keys("nothing/") == []


def test_presigned_url_downloads(storage):
    storage.put_bytes("pre/x.png", PNG, "image/png")
    url = storage.presigned_url("pre/x.png", expires_s=60)
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == PNG


def test_missing_key_is_key_not_found(storage):
    with pytest.raises(KeyNotFound) as e:
        storage.get_bytes("missing/key")
    assert e.value.key == "missing/key" and "no such key" in str(e.value)
    with pytest.raises(KeyNotFound):
        storage.head("missing/key")
    with pytest.raises(KeyNotFound):
        storage.get_json("missing/key.json")


def test_conditional_put(storage):
    etag = storage.put_json("cond/j.json", {"v": 1}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.put_json("cond/j.json", {"v": 2}, if_none_match=True)
    storage.put_json("cond/j.json", {"v": 2}, if_match=etag)
    with pytest.raises(PreconditionFailed):
        storage.put_json("cond/j.json", {"v": 3}, if_match=etag)
    assert storage.get_json_etag("cond/j.json")[0] == {"v": 2}


def test_wrong_secret_is_a_403_that_hides_secrets(s3_server, make_storage, storage):
    wrong = "wrong-" + secrets.token_hex(8)
    bad = make_storage(storage.bucket, secret_key=wrong)
    with pytest.raises(StorageError) as e:
        bad.get_bytes("anything")
    assert e.value.status == 403 and not e.value.unreachable
    assert "check the access key and secret key" in str(e.value)
    for text in (str(e.value), repr(bad), repr(storage), repr(s3_server)):
        assert wrong not in text and s3_server.secret_key not in text


def test_unreachable_endpoint_fails_fast():
    port = find_free_port()  # nothing listens there
    s = Storage(f"http://127.0.0.1:{port}", "nowhere", "ak", "very-secret", connect_timeout_s=0.5,
                read_timeout_s=0.5, max_attempts=1)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        s.put_bytes("k", b"x")
    assert time.monotonic() - t0 < 5
    assert e.value.unreachable and "unreachable" in str(e.value) and "very-secret" not in str(e.value)
    assert "s3://nowhere/k" in str(e.value)


def test_from_config_takes_secretstr(s3_server, storage):
    cfg = SimpleNamespace(endpoint_url=s3_server.endpoint_url, bucket=storage.bucket, region="us-east-1",
                          path_style=True, presign_expiry_s=60, connect_timeout_s=2, read_timeout_s=5,
                          max_attempts=1,
                          credentials=lambda base_dir: (s3_server.access_key, SecretStr(s3_server.secret_key)))
    s = Storage.from_config(cfg)
    s.put_bytes("cfg/x", b"ok")
    assert storage.get_bytes("cfg/x") == b"ok"


def test_port_mapping():
    assert derived_ports(8333) == {"s3": 8333, "master": 8334, "volume": 8335, "filer": 8336, "admin": 8337}
    assert sorted(all_ports(8333))[5:] == [18333, 18334, 18335, 18336, 18337]
    with pytest.raises(ValueError, match="s3_port"):
        derived_ports(60000)
    assert all(port_is_free(p) for p in all_ports(pick_s3_port()))


def test_stop_from_pidfile_stops_a_server_another_process_started(tmp_path):
    data_dir, port = tmp_path / "s3", pick_s3_port()
    ak, sk = "other", secrets.token_urlsafe(16)
    code = ("import sys; from pathlib import Path; from cluster.seaweed import LocalS3Server; "
            "s = LocalS3Server(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]); s.start()")
    subprocess.run([sys.executable, "-c", code, str(data_dir), str(port), ak, sk], cwd=REPO, check=True,
                   timeout=60)
    server = LocalS3Server.from_pidfile(data_dir)  # the starter has exited; the server has not
    assert server is not None and server.is_running() and server.endpoint_url.endswith(f":{port}")
    s = Storage(server.endpoint_url, "other-bucket", ak, sk)
    s.ensure_bucket()
    s.put_bytes("k", b"v")
    assert LocalS3Server.stop_from_pidfile(data_dir) is True
    assert not server.is_running() and not (data_dir / "weed.pid").exists()
    deadline = time.monotonic() + 10  # the kernel may take a moment to release the listeners
    while not all(port_is_free(p) for p in all_ports(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(port_is_free(p) for p in all_ports(port))
    assert LocalS3Server.stop_from_pidfile(data_dir) is False and LocalS3Server.from_pidfile(data_dir) is None


def test_restart_keeps_data(s3_server, storage):
    """Stops and restarts the session's server on the same data dir (~5 s); keep this test last. Each start writes
    new JWT keys and gRPC certificates (cluster/seaweed.py); the data does not depend on them."""
    storage.put_bytes("restart/k", b"kept")
    secrets_before = [(s3_server.data_dir / f).read_bytes() for f in (SECURITY_FILE, KEY_FILE)]
    assert s3_server.stop() is True and not s3_server.is_running()
    s3_server.start()
    assert storage.get_bytes("restart/k") == b"kept"
    secrets_after = [(s3_server.data_dir / f).read_bytes() for f in (SECURITY_FILE, KEY_FILE)]
    assert all(a != b for a, b in zip(secrets_before, secrets_after))
