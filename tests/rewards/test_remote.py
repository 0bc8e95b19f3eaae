"""The remote reward against real server processes on 127.0.0.1."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request

import pytest

from rewards import get_reward
from rewards.remote import RemoteRewardError, make_server

FLAKY = "tests/rewards/flaky_server.py"
STORIES = ["They were happy friends. They smiled and played together all day.", "The sad dog was happy", "Lily went"]


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/score", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_binds_loopback_and_reports_health(story_server):
    assert story_server.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(story_server + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "reward": "story"}


def test_remote_scores_equal_local_scores(story_server):
    remote = get_reward("remote", url=story_server, timeout=10)
    local = get_reward("story")
    assert remote(["p"] * 3, STORIES) == local(["p"] * 3, STORIES)
    assert remote([], []) == []


def test_batches_are_split_and_reassembled(story_server):
    remote = get_reward("remote", url=story_server + "/score", batch_size=2)
    assert remote(["p"] * 3, STORIES) == get_reward("story")(["p"] * 3, STORIES)


def test_metadata_reaches_the_served_reward(start_server):
    url = start_server(["-m", "rewards.remote", "--reward", "math", "--options", '{"extractors": ["boxed"]}'])
    remote = get_reward("remote", url=url, timeout=10)
    assert remote(["q"] * 3, ["\\boxed{72}", "\\boxed{7}", "72"], ground_truth=["72", "72", "72"]) == [1.0, 0.0, 0.0]
    with pytest.raises(RemoteRewardError, match=r"400.*ground_truth"):
        remote(["q"], ["\\boxed{72}"])  # the reward itself refuses: 400 naming the problem


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompts": ["p"]}', "missing field 'responses'"),
        (b'{"prompts": ["p"], "responses": "r"}', "'responses' must be a list of strings"),
        (b'{"prompts": ["p"], "responses": [3]}', "item 0 is int"),
        (b'{"prompts": ["p", "q"], "responses": ["r"]}', "2 prompts but 1 responses"),
        (b'{"prompts": ["p"], "responses": ["r"], "metadata": {"ground_truth": ["1", "2"]}}', "has 2 entries for 1"),
        (b'{"prompts": ["p"], "responses": ["r"], "metadata": [1]}', "'metadata' must be a JSON object"),
        (b'{"prompts": ["p"], "responses": ["r"], "respones": ["r"]}', "unknown fields ['respones']"),
    ],
)
def test_malformed_requests_get_400_naming_the_problem(story_server, body, message):
    status, reply = post(story_server, body)
    assert status == 400
    assert message in reply["error"]


def test_unknown_path_is_404(story_server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(story_server + "/nope", timeout=10)
    assert e.value.code == 404


def test_client_fails_at_once_on_4xx(story_server):
    remote = get_reward("remote", url=story_server, retries=5, backoff=10.0)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="400"):
        remote._post(b'{"prompts": []}')
    assert time.monotonic() - start < 5  # no 10 s backoff: a 4xx is not retried


def test_client_retries_a_503(start_server):
    url = start_server([FLAKY, "--fail-first", "2", "--status", "503"])
    remote = get_reward("remote", url=url, retries=2, backoff=0.05)
    assert remote(["p"] * 3, STORIES) == get_reward("story")(["p"] * 3, STORIES)
    with urllib.request.urlopen(url + "/count", timeout=10) as response:
        assert json.loads(response.read()) == {"posts": 3}


def test_client_gives_up_after_its_retries(start_server):
    url = start_server([FLAKY, "--fail-first", "100", "--status", "503"])
    remote = get_reward("remote", url=url, retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=r"after 3 attempts.*HTTP 503.*deliberate failure 3"):
        remote(["p"], ["r"])


def test_client_retries_after_a_timeout(start_server):
    url = start_server([FLAKY, "--delay-first", "3", "--delay-first-n", "1"])  # only POST 1 is slow
    remote = get_reward("remote", url=url, timeout=0.5, retries=1, backoff=0.01)
    assert remote(["p"], ["r"]) == [0.0]
    with urllib.request.urlopen(url + "/count", timeout=10) as response:
        assert json.loads(response.read()) == {"posts": 2}


def test_client_reports_a_timeout_after_its_retries(start_server):
    url = start_server([FLAKY, "--delay-first", "3", "--delay-first-n", "100"])
    with pytest.raises(RemoteRewardError, match="after 2 attempts.*timed out"):
        get_reward("remote", url=url, timeout=0.3, retries=1, backoff=0.01)(["p"], ["r"])


def test_connection_refused_is_retried_then_reported(free_port):
    remote = get_reward("remote", url=f"http://127.0.0.1:{free_port}", timeout=1, retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=r"after 3 attempts.*(refused|Errno)"):
        remote(["p"], ["r"])


def test_client_option_errors():
    with pytest.raises(ValueError, match="url"):
        get_reward("remote", url="ftp://example.org")
    with pytest.raises(ValueError, match="timeout > 0"):
        get_reward("remote", url="http://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        get_reward("remote", url="http://127.0.0.1:1")(["p"], ["r"], extra=[object()])


def test_non_finite_scores_travel_as_null_and_come_back_as_nan():
    """In-process server thread (a real socket): NaN is not JSON, so the server sends null."""
    server = make_server(lambda prompts, responses, **md: [math.nan, 1.0])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, reply = post(server.url, b'{"prompts": ["a", "b"], "responses": ["a", "b"]}')
        assert (status, reply) == (200, {"scores": [None, 1.0]})
        scores = get_reward("remote", url=server.url)(["a", "b"], ["a", "b"])
        assert math.isnan(scores[0]) and scores[1] == 1.0
    finally:
        server.shutdown()
        server.server_close()


def test_a_crashing_reward_is_a_500():
    def crash(prompts, responses, **md):
        raise RuntimeError("out of memory")

    server = make_server(crash)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, reply = post(server.url, b'{"prompts": ["a"], "responses": ["a"]}')
        assert status == 500 and "RuntimeError: out of memory" in reply["error"]
    finally:
        server.shutdown()
        server.server_close()
