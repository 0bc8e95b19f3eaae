"""The client side of the remote reward: `get_reward("remote", url=...)`."""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rewards.base import check_inputs, register_reward
from rewards.remote.server import is_loopback


class RemoteRewardError(RuntimeError):
    """The remote reward refused the request, or did not answer after all retries."""


# Failures worth another try: the server is down, restarting, overloaded or slow.
_RETRYABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


@register_reward("remote")
class RemoteReward:
    """Score through a reward service (`python -m rewards.remote`) at `url`.

    Each request waits at most `timeout` seconds. Connection errors, timeouts, 5xx and 429 are
    retried `retries` times with exponential backoff (backoff, 2 * backoff, ... capped at
    `max_backoff` seconds); any other 4xx fails at once with the server's message. Metadata
    must be JSON-serialisable. `batch_size` splits large batches into several requests.
    A null score from the server (a non-finite score) comes back as NaN.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        batch_size: int | None = None,
    ):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"remote reward url must look like http://host:port, got {url!r}")
        path = parsed.path.rstrip("/")
        self.url = parsed._replace(path=path if path.endswith("/score") else path + "/score").geturl()
        if timeout <= 0 or retries < 0 or backoff < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; got {timeout}, {retries}, {backoff}, {batch_size}")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.batch_size = batch_size
        # Environment proxies would route loopback traffic away from the local server.
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]:
        check_inputs(prompts, responses, metadata)
        step = self.batch_size or max(1, len(responses))
        scores: list[float] = []
        for start in range(0, len(responses), step):
            sl = slice(start, start + step)
            meta = {k: (v[sl] if isinstance(v, (list, tuple)) else v) for k, v in metadata.items()}
            scores.extend(self._score(prompts[sl], responses[sl], meta))
        return scores

    def _score(self, prompts: list[str], responses: list[str], metadata: dict[str, Any]) -> list[float]:
        try:
            body = json.dumps({"prompts": list(prompts), "responses": list(responses), "metadata": metadata}).encode()
        except TypeError as e:
            raise ValueError(f"remote reward metadata must be JSON-serialisable: {e}") from None
        reply = self._post(body)
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(responses):
            raise RemoteRewardError(f"{self.url} answered without one score per response: {str(reply)[:200]}")
        return [math.nan if s is None else float(s) for s in scores]

    def _post(self, body: bytes, url: str | None = None) -> Any:
        """POST `body` (JSON) to `url` (default: /score) with the retry policy; the reply's JSON.
        Remote environments (rewards/envs/remote.py) post to their own paths through this."""
        url = url or self.url
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:  # before URLError: HTTPError is one
                message = _error_message(e)
                if e.code < 500 and e.code != 429:
                    raise RemoteRewardError(f"{url} rejected the request ({e.code}): {message}") from None
                last_error = f"HTTP {e.code}: {message}"
            except json.JSONDecodeError as e:
                raise RemoteRewardError(f"{url} answered with invalid JSON: {e}") from None
            except _RETRYABLE as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise RemoteRewardError(f"remote reward at {url} failed after {self.retries + 1} attempts; last error: {last_error}")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read()).get("error", error.reason))
    except Exception:  # a proxy's HTML error page, an empty body...
        return str(error.reason)
