"""A tiny HTTP control endpoint: ``GET /status`` (JSON), ``GET /metrics`` (Prometheus) and
``POST /mode/<mode>``.

Plain asyncio rather than a web framework: two routes do not justify a dependency, and it lets
``liverestore status`` read a running agent with nothing but urllib. With a token, every request
must carry ``Authorization: Bearer <token>``: the status names every VM and disk served, and the
mode switch changes who waits for the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

from liverestore.agent.agent import MediaAgent
from liverestore.agent.prometheus import CONTENT_TYPE, exposition
from liverestore.agent.scheduler import Mode


class ControlServer:
    def __init__(self, agent: MediaAgent, token: str | None = None) -> None:
        self.agent = agent
        self.token = token
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            authorization = ""
            for _ in range(100):
                line = await asyncio.wait_for(reader.readline(), 5)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode(errors="replace").partition(":")
                if name.strip().lower() == "authorization":
                    authorization = value.strip()
            parts = request.decode(errors="replace").split()
            body: object
            expected = f"Bearer {self.token}".encode()
            method, path = (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")
            ctype = "application/json"
            if self.token is not None and not hmac.compare_digest(authorization.encode(), expected):
                code, body = "401 Unauthorized", {"error": "this agent needs its control token (status --token-file)"}
            elif method == "GET" and path == "/metrics":
                code, body, ctype = "200 OK", exposition(self.agent), CONTENT_TYPE
            else:
                code, body = self._route(method, path)
            payload = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, object]:
        if method == "GET" and path == "/status":
            return "200 OK", self.agent.status()
        if method == "POST" and path.startswith("/mode/"):
            try:
                mode = Mode(path.removeprefix("/mode/"))
            except ValueError:
                return "400 Bad Request", {"error": f"unknown mode; use one of {[m.value for m in Mode]}"}
            self.agent.set_mode(mode)
            return "200 OK", {"mode": str(mode)}
        return "404 Not Found", {"error": "routes: GET /status, GET /metrics, POST /mode/<mode>"}
