"""A provider that misbehaves on purpose, one way per request, and counts every POST it reads.

A plain asyncio server on loopback in its own thread. Each connection reads requests one after
another; `script(connection_index, request_index_on_connection)` names what to do with each:
answer, close without answering (FIN or RST), stall a body, cut it, and so on. Good answers are
shaped and billed like a Routstr node's (usage with `cost.total_msats`, `x-routstr-cost-msats`).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
import threading
from collections.abc import Callable

from arbstr import http1

PROMPT_MSATS, COMPLETION_MSATS = 3, 12
"""What one prompt / completion token costs here, in msats."""
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
         "cost": {"input_msats": 10 * PROMPT_MSATS, "output_msats": 5 * COMPLETION_MSATS,
                  "total_msats": 10 * PROMPT_MSATS + 5 * COMPLETION_MSATS}}
COST_MSATS = USAGE["cost"]["total_msats"]


def completion(provider: str) -> bytes:
    return json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Hello from {provider}"},
                                    "finish_reason": "stop"}], "usage": USAGE}).encode()


def events(provider: str, words: int = 3) -> list[bytes]:
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "gpt-4o"}
    out = [b"data: %s\n\n" % json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                                                "finish_reason": None}]}).encode()
           for i in range(words)]
    out.append(b"data: %s\n\n" % json.dumps({**chunk, "choices": [{"index": 0, "delta": {},
                                                                    "finish_reason": "stop"}]}).encode())
    out.append(b"data: %s\n\n" % json.dumps({**chunk, "choices": [], "usage": USAGE}).encode())
    out.append(b"data: [DONE]\n\n")
    return out


class Misbehaving:
    """Start with `with Misbehaving(name, script) as provider:`; `provider.url` ends in /v1."""

    def __init__(self, name: str, script: Callable[[int, int], str]) -> None:
        self.name, self.script = name, script
        self.posts = 0
        self.connections = 0
        self.open_connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._release = asyncio.Event()

    def __enter__(self) -> Misbehaving:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self._server.close()
            self._release.set()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.open_connections += 1
        messages = http1.MessageReader(reader)
        try:
            for number in range(10**6):
                try:
                    head = await messages.request_head()
                except http1.ClosedBeforeHead:
                    return
                body = await messages.body()
                if head.method == "POST":
                    self.posts += 1
                stream = b'"stream": true' in body or b'"stream":true' in body
                action = self.script(index, number) if head.method == "POST" else "models"
                if not await self._act(action, stream, reader, writer):
                    return
        except (ConnectionError, http1.Http1Error):
            return
        finally:
            self.open_connections -= 1
            writer.close()

    async def _stall(self, reader: asyncio.StreamReader) -> None:
        """Send nothing more until the client closes the connection (or the test ends)."""
        release = asyncio.ensure_future(self._release.wait())
        try:
            while True:
                read = asyncio.ensure_future(reader.read(65536))
                await asyncio.wait({read, release}, return_when=asyncio.FIRST_COMPLETED)
                if release.done() or not read.done() or not read.result():
                    read.cancel()
                    return
        except ConnectionError:
            return
        finally:
            release.cancel()

    async def _act(self, action: str, stream: bool, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> bool:
        """Do what the script says; True to keep the connection for another request."""
        name = self.name
        json_head = [(b"content-type", b"application/json")]
        if action == "ok" and stream:
            writer.write(http1.response_head_bytes(200, b"OK", [(b"content-type", b"text/event-stream"),
                                                                 (b"transfer-encoding", b"chunked")]))
            for event in events(name):
                writer.write(http1.chunk(event))
            writer.write(http1.LAST_CHUNK)
        elif action in ("ok", "json_for_stream"):
            body = completion(name)
            writer.write(http1.response_head_bytes(200, b"OK", [
                *json_head, (b"x-routstr-cost-msats", b"%d" % COST_MSATS), (b"content-length", b"%d" % len(body))])
                + body)
        elif action == "models":
            body = b'{"data": [{"id": "gpt-4o"}]}'
            writer.write(http1.response_head_bytes(200, b"OK", [*json_head, (b"content-length", b"%d" % len(body))])
                         + body)
        elif action == "gzip":
            body = gzip.compress(completion(name))
            writer.write(http1.response_head_bytes(200, b"OK", [
                *json_head, (b"content-encoding", b"gzip"), (b"content-length", b"%d" % len(body))]) + body)
        elif action == "close":
            return False
        elif action == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif action in ("401", "403", "echo_key_401"):
            status = int(action[-3:])
            body = b'{"error": {"message": "Invalid or expired API key", "type": "invalid_request_error", ' \
                   b'"code": "invalid_api_key"}}'
            writer.write(http1.response_head_bytes(status, b"Unauthorized", [
                *json_head, (b"content-length", b"%d" % len(body))]) + body)
        elif action == "stall_headers":
            await self._stall(reader)
            return False
        elif action == "stall_error_body":
            writer.write(http1.response_head_bytes(503, b"Service Unavailable", [*json_head,
                                                                                 (b"content-length", b"100")]))
            await writer.drain()
            await self._stall(reader)
            return False
        elif action in ("stall_body", "cut_body"):  # 20 bytes of the body, then a pause or the end
            body = completion(name)
            writer.write(http1.response_head_bytes(200, b"OK", [*json_head, (b"content-length", b"%d" % len(body))])
                         + body[:20])
            await writer.drain()
            if action == "stall_body":
                await self._stall(reader)
            return False
        elif action == "cut_chunk":
            writer.write(http1.response_head_bytes(200, b"OK", [*json_head, (b"transfer-encoding", b"chunked")])
                         + b"400\r\n" + completion(name)[:30])
            await writer.drain()
            return False
        elif action in ("stream_stall", "stream_break"):
            writer.write(http1.response_head_bytes(200, b"OK", [(b"content-type", b"text/event-stream"),
                                                                 (b"transfer-encoding", b"chunked")]))
            for event in events(name)[:2]:
                writer.write(http1.chunk(event))
            await writer.drain()
            if action == "stream_stall":
                await self._stall(reader)
            return False
        else:
            raise AssertionError(f"unknown action {action}")
        await writer.drain()
        return True
