"""HTTP reward service: POST /score wraps any registered reward; GET /health says it is up.

Request:  {"prompts": [str, ...], "responses": [str, ...], "metadata": {key: [one per response]}}
Response: {"scores": [float | null, ...]}   (null stands for a non-finite score)
Errors:   {"error": "<what is wrong>"} with 400 (malformed request, or the reward rejected it),
          404 (unknown path), 411/413 (missing or oversized body), 500 (the reward crashed).

JSON only, never pickle: a request cannot run code in the server. The service has no
authentication, so it binds to loopback unless told otherwise. It runs on the standard
library's ThreadingHTTPServer; reward calls are serialised with a lock, because rewards keep
per-call state (`last_components`) and need not be thread-safe.
"""

from __future__ import annotations

import ipaddress
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rewards.base import RewardFn, check_inputs

MAX_BODY_BYTES = 64 * 2**20


class RequestError(ValueError):
    """The request is malformed; answered with 400 and this message."""


def parse_score_request(body: bytes) -> tuple[list[str], list[str], dict[str, Any]]:
    """Validate a /score body and return (prompts, responses, metadata)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError(f"request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"prompts", "responses", "metadata"})
    if unknown:
        raise RequestError(f"unknown fields {unknown}; valid: ['metadata', 'prompts', 'responses']")
    fields = {}
    for key in ("prompts", "responses"):
        if key not in payload:
            raise RequestError(f"missing field {key!r} (a list of strings)")
        values = payload[key]
        if not isinstance(values, list):
            raise RequestError(f"field {key!r} must be a list of strings, got {type(values).__name__}")
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise RequestError(f"field {key!r} must be a list of strings; item {bad} is {type(values[bad]).__name__}")
        fields[key] = values
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RequestError(f"field 'metadata' must be a JSON object, got {type(metadata).__name__}")
    try:
        check_inputs(fields["prompts"], fields["responses"], metadata)
    except ValueError as e:
        raise RequestError(str(e)) from None
    return fields["prompts"], fields["responses"], metadata


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that answers in JSON (the reward and the environment servers)."""

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ScoreHandler(JSONHandler):
    server: "RewardHTTPServer"

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "reward": self.server.reward_name})
        else:
            self._reply(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})

    def do_POST(self):
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(411, {"error": "a Content-Length header is required"})
            return
        if int(length) > MAX_BODY_BYTES:
            self._reply(413, {"error": f"body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}"})
            return
        body = self.rfile.read(int(length))
        try:
            prompts, responses, metadata = parse_score_request(body)
            with self.server.lock:
                scores = self.server.reward(prompts, responses, **metadata)
            scores = [float(s) for s in scores]
            if len(scores) != len(responses):
                raise RuntimeError(f"the reward returned {len(scores)} scores for {len(responses)} responses")
        except RequestError as e:
            self._reply(400, {"error": str(e)})
        except (ValueError, KeyError, TypeError) as e:  # the reward refused these inputs
            self._reply(400, {"error": f"the reward rejected the request: {type(e).__name__}: {e}"})
        except Exception as e:  # a crash inside the reward: 5xx, which clients may retry
            self._reply(500, {"error": f"the reward failed: {type(e).__name__}: {e}"})
        else:
            self._reply(200, {"scores": [s if math.isfinite(s) else None for s in scores]})

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler_class, reward: RewardFn, reward_name: str, verbose: bool = False):
        super().__init__(address, handler_class)
        self.reward, self.reward_name, self.verbose = reward, reward_name, verbose
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(
    reward: RewardFn,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    reward_name: str = "custom",
    handler_class: type[ScoreHandler] = ScoreHandler,
    verbose: bool = False,
) -> RewardHTTPServer:
    """A bound (not yet serving) server; port 0 picks a free port, read it from `.url`."""
    if not is_loopback(host):
        print(f"warning: the reward service has no authentication and binds to {host}", file=sys.stderr)
    return RewardHTTPServer((host, port), handler_class, reward, reward_name, verbose)
