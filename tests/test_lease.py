"""The rescore lease on a real local filesystem and on a moto S3 server: exclusive, renewed, lapses."""

from __future__ import annotations

import json
import socket
import time

import fsspec
import pytest

from air_ray.store.lease import Lease


def test_exclusive_then_released(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "v" / "_lease.json")
    a, b = Lease(fs, path, ttl_s=60), Lease(fs, path, ttl_s=60)
    assert a.acquire()
    assert not b.acquire()
    assert b.holder()["owner"] == a.owner
    a.release()
    assert not (tmp_path / "v" / "_lease.json").exists()
    assert b.acquire()
    b.release()


def test_renewed_while_held_and_lapses_when_not(tmp_path):
    fs = fsspec.filesystem("file")
    path = tmp_path / "_lease.json"
    a = Lease(fs, str(path), ttl_s=0.9)
    assert a.acquire()
    first = json.loads(path.read_text())["expires"]
    time.sleep(1.5)  # longer than the ttl: only the renewals keep it
    assert json.loads(path.read_text())["expires"] > first
    assert not Lease(fs, str(path), ttl_s=0.9).acquire()
    a.release()
    # a crashed holder on another host: its lease counts until it expires, then is taken over
    other = {"owner": "x", "host": "elsewhere", "pid": 1, "acquired": time.time(), "expires": time.time() + 1.0}
    path.write_text(json.dumps(other))
    c = Lease(fs, str(path), ttl_s=60)
    assert not c.acquire()
    time.sleep(1.2)
    assert c.acquire() and json.loads(path.read_text())["owner"] == c.owner
    c.release()


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    fs = fsspec.filesystem("file")
    path = tmp_path / "_lease.json"
    dead = {"owner": "x", "host": socket.gethostname(), "pid": 2**22 + 12345, "acquired": time.time(),
            "expires": time.time() + 600}
    path.write_text(json.dumps(dead))
    lease = Lease(fs, str(path), ttl_s=60)
    assert lease.acquire()
    lease.release()


@pytest.mark.slow
def test_on_s3(moto_s3, monkeypatch):
    import boto3

    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="leases")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    a = Lease(fs, "leases/air/v=1/_lease.json", ttl_s=60, settle_s=0.2)
    b = Lease(fs, "leases/air/v=1/_lease.json", ttl_s=60, settle_s=0.2)
    assert a.acquire() and not b.acquire()
    a.release()
    assert not fs.exists("leases/air/v=1/_lease.json")
    assert b.acquire()
    b.release()
