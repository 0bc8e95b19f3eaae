"""Environments over HTTP, on the remote reward's transport (loopback by default, timeouts,
retries with backoff: rewards/remote/client.py).

    env=remote env.options.url=http://127.0.0.1:8001       # the client, one episode per prompt
    python -m rewards.envs.remote --env guess_number --port 8001   # a server for any registered env

Protocol (JSON only, never pickle):
    POST /reset {"row": {...}}                                -> {"episode": "<id>", "tools": [...]}
    POST /step  {"episode": "<id>", "turn": <n>, "text": "..."} -> {"observation", "reward", "done", "info"}
A step is retried by the client after a timeout, so the server answers a repeated turn number
with its stored reply instead of stepping twice. Finished episodes are forgotten.
"""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from http.server import ThreadingHTTPServer
from typing import Any

from rewards.envs.base import EnvError, Step, check_step, env_factory, register_env
from rewards.remote.server import JSONHandler


@register_env("remote")
class RemoteEnv:
    """One episode of the environment served at `url` (timeout, retries, backoff as the remote reward's)."""

    def __init__(self, row: dict[str, Any], url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5):
        from rewards.remote.client import RemoteReward

        self._transport = RemoteReward(url, timeout=timeout, retries=retries, backoff=backoff)
        self.base = self._transport.url[: -len("/score")]
        reply = self._post("reset", {"row": row})
        if not isinstance(reply, dict) or "episode" not in reply:
            raise EnvError(f"{self.base}/reset answered without an episode id: {str(reply)[:200]}")
        self.episode, self.tools, self.turns = reply["episode"], list(reply.get("tools") or []), 0

    def _post(self, path: str, payload: dict) -> Any:
        try:
            body = json.dumps(payload).encode()
        except TypeError as err:
            raise EnvError(f"remote environment: the data row must be JSON-serialisable: {err}") from None
        return self._transport._post(body, f"{self.base}/{path}")

    def step(self, turn: str) -> Step:
        self.turns += 1
        reply = self._post("step", {"episode": self.episode, "turn": self.turns, "text": turn})
        if not isinstance(reply, dict) or not {"observation", "reward", "done"} <= set(reply):
            raise EnvError(f"{self.base}/step answered without observation/reward/done: {str(reply)[:200]}")
        return Step(reply["observation"], float(reply["reward"]), bool(reply["done"]), dict(reply.get("info") or {}))


class _Handler(JSONHandler):
    server: "EnvHTTPServer"

    def do_POST(self):
        try:
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            path = self.path.rstrip("/")
            if path == "/reset":
                self._reply(200, self.server.reset(payload["row"]))
            elif path == "/step":
                self._reply(200, self.server.step(payload["episode"], int(payload["turn"]), str(payload["text"])))
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}; use POST /reset or /step"})
        except (KeyError, TypeError, ValueError) as err:
            self._reply(400, {"error": f"bad request: {type(err).__name__}: {err}"})
        except Exception as err:  # the environment crashed: 5xx, retried by the client
            self._reply(500, {"error": f"the environment failed: {type(err).__name__}: {err}"})

    def log_message(self, format, *args):
        pass


class EnvHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, name: str, options: dict[str, Any]):
        super().__init__(address, _Handler)
        self.factory, self.name, self.options = env_factory(name), name, options
        self.episodes: dict[str, tuple[Any, int, dict]] = {}  # id -> (env, last turn, last reply)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self, row: dict) -> dict:
        env = self.factory(row=row, **self.options)
        episode = uuid.uuid4().hex
        with self.lock:
            self.episodes[episode] = (env, 0, {})
        return {"episode": episode, "tools": list(getattr(env, "tools", []))}

    def step(self, episode: str, turn: int, text: str) -> dict:
        with self.lock:
            if episode not in self.episodes:
                raise KeyError(f"unknown or finished episode {episode!r}")
            env, last, reply = self.episodes[episode]
            if turn == last:  # a retried request: answer as before
                return reply
            step = check_step(env.step(text), self.name)
            reply = {"observation": step.observation, "reward": step.reward, "done": step.done, "info": step.info}
            self.episodes[episode] = (env, turn, reply)
            if step.done:  # keep the reply for one retry, then drop it with the next finished episode
                self.episodes = {k: v for k, v in self.episodes.items() if k == episode or v[2].get("done") is not True}
            return reply


def make_env_server(name: str, options: dict[str, Any] | None = None, host: str = "127.0.0.1",
                    port: int = 0) -> EnvHTTPServer:
    """A bound (not yet serving) server for environment `name`; port 0 picks a free port. It has
    no authentication: it binds to loopback unless told otherwise, and warns when told."""
    from rewards.remote.server import is_loopback

    if not is_loopback(host):
        import sys

        print(f"warning: the environment service has no authentication and binds to {host}", file=sys.stderr)
    return EnvHTTPServer((host, port), name, dict(options or {}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rewards.envs.remote", description="Serve an environment over HTTP.")
    parser.add_argument("--env", required=True, help="a registered name or file.py:Class")
    parser.add_argument("--options", default="{}", help="JSON options for the environment")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    server = make_env_server(args.env, json.loads(args.options), args.host, args.port)
    print(f"serving environment {args.env!r} at {server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
