"""Test helper: a real Ray cluster of several nodes on this machine, each node its own `ray start --block`.

    cluster = LocalCluster(env).start(head_cpus=0)     # a head that runs no tasks; dashboard + job server
    cluster.add_worker("w1", cpus=2); cluster.add_worker("w2", cpus=2)
    cluster.node_of_actor("MapWorker(MapBatches(ShardProcessor))")  # -> "w1"
    cluster.kill_worker("w1")                          # SIGKILL of the node's raylet and workers: a lost spot node
    cluster.stop()

Each node is a process group of its own (`ray start --block` and the raylet, object manager and workers it
starts); killing the group is what losing the machine does to Ray. Every port is chosen free: the test
session's own local Ray already holds the default ones. Nodes share this machine's disk, so a test that means
"nodes share no disk" puts every output on the S3 server and checks that nothing lands elsewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    return [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")]


class LocalCluster:
    def __init__(self, env: dict[str, str]):
        self.tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.env = {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
        self.procs: dict[str, subprocess.Popen] = {}
        self.gcs = ""
        self.dashboard = ""

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.tmp, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen([f"{BIN}/ray", "start", "--block", *args], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, head_cpus: int = 0) -> "LocalCluster":
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        self._spawn("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={head_cpus}",
                             "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={free_port()}", f"--temp-dir={self.tmp}",
                             "--node-name=head", *_node_ports()])
        deadline = time.time() + 180
        while True:  # the job server is up once the dashboard answers
            assert self.procs["head"].poll() is None and time.time() < deadline, self.log("head")
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).read()
                return self
            except OSError:
                time.sleep(1)

    def add_worker(self, name: str, cpus: float, wait: bool = True) -> None:
        # A temp dir of its own, as a machine of its own would have: nodes sharing one also share the unpacked
        # working_dir of a job, and a node's runtime-env agent deletes it under the others once unused there.
        self._spawn(name, [f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                           "--num-gpus=0", f"--node-name={name}", f"--temp-dir={self.tmp}/{name}", *_node_ports()])
        if wait:
            deadline = time.time() + 120
            while name not in self.alive():
                assert self.procs[name].poll() is None and time.time() < deadline, self.log(name)
                time.sleep(1)

    def _nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)

    def alive(self) -> set[str]:
        return {n.node_name for n in self._nodes() if n.state == "ALIVE"}

    def node_of_actor(self, class_part: str) -> str | None:
        """The node name of a live actor whose class name contains `class_part` (None if there is none)."""
        from ray.util.state import list_actors

        names = {n.node_id: n.node_name for n in self._nodes()}
        for a in list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=10000,
                             raise_on_missing_output=False):
            if class_part in (a.class_name or "") and a.node_id in names and names[a.node_id] != "head":
                return names[a.node_id]
        return None

    def kill_worker(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else []):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)  # a throw-away cluster: a node slower to stop is killed (it took ~30 s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
