"""The OpenAI-compatible server, run for real: `python -m align.serve` (Ray Serve) on 127.0.0.1
with stories260K, queried with the real `openai` client.

Expected texts come from the rollout engine run in this process on the same prompt ids
(`HFEngine` + the training tokenizer's `Encoder`), so every assertion checks that the HTTP
layer (Ray Serve, FastAPI, the OpenAI shapes, SSE) hands back exactly what the engine samples:
greedy completions and chats, seeded n > 1 samples, stream chunks that join to the
non-streamed text (streamed token by token, stop strings never sent), and concurrent requests
that equal sequential ones.

The server runs in its own process session with a private RAY_TMPDIR; teardown is SIGTERM
(the server shuts Serve and Ray down), then any process left in that session is killed
(tests/_session.py). Measured with the 2 cores shared by other jobs (load average ~9): the
server is up after ~84 s (the in-process engine loads meanwhile), the requests take ~60 s, the
stop ~8 s: ~150 s for the file. Idle, Ray Serve starts in ~7-10 s (docs/ENVIRONMENT.md of the
workplace) and the file should take well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai  # a dev dependency; ray[serve] brings fastapi and uvicorn (no skip: missing is a failure)
import pytest
from _session import kill_session, session_pids

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240
START_ATTEMPTS = 3
MODEL = "stories260K"
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird",
           "The sun was", "Tim had a red", "There was a big", "Sue liked to"]

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return 0


def test_text_pieces_join_back_exactly():
    from align.serve import text_pieces

    for text in ["", " ", "a", " Once upon a time,\n there was  a dog. ", "\n\nend\n", "x  "]:
        assert "".join(text_pieces(text)) == text
    assert text_pieces(" Once upon") == [" Once", " upon"]


class _Server:
    """`python -m align.serve` in its own process session, with a private RAY_TMPDIR."""

    def __init__(self, model: str, tmp: str):
        self.model, self.tmp, self.procs = model, tmp, []
        self.log_path = Path(tmp) / "server.log"

    def start(self) -> None:
        self.port = _free_port()
        env = {**os.environ, "RAY_TMPDIR": self.tmp, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "w") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "align.serve", "--model", self.model, "--host", "127.0.0.1",
                 "--port", str(self.port), "--ray-num-cpus", "2", "--max-ongoing-requests", "16"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> bool:
        """True once `/v1/models` answers; False when the process exited first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while _get(f"{self.base}/v1/models") != 200:
            if self.procs[-1].poll() is not None:
                return False
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(1)
        return True

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)  # the server shuts Serve and Ray down
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
            kill_session(proc.pid)  # whatever of its session is left


@pytest.fixture(scope="module")
def launched(stories_path):
    """The server started (not yet waited for), so the engine fixture loads meanwhile."""
    tmp = tempfile.mkdtemp(prefix="raysrv-", dir="/tmp")  # short: Ray's unix sockets live here
    srv = _Server(stories_path, tmp)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(launched, engine):
    """The base URL once `/v1/models` answers.

    Start-up is tried up to START_ATTEMPTS times: the local Ray that the server starts can die
    at birth when its dashboard agent takes more than the 15 s Ray 2.60 hard-codes (see
    tests/test_submit.py), which happens when other jobs load the two cores."""
    for attempt in range(START_ATTEMPTS):
        if launched.wait_ready():
            return launched.base
        if attempt + 1 < START_ATTEMPTS:
            kill_session(launched.procs[-1].pid)
            launched.start()
    pytest.fail(f"server exited {START_ATTEMPTS} times during start-up; last log:\n{launched.log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def engine(stories_path):
    """The same engine and tokenization in this process: the expected outputs."""
    from align.data.tokenize import Encoder
    from align.models.loading import load_model_and_tokenizer
    from rollout import HFEngine

    model, tok = load_model_and_tokenizer(stories_path)
    return HFEngine(model, tok), tok, Encoder(tok)


def _expected(engine, texts, **params):
    from rollout import SamplingParams

    eng, _, enc = engine
    ids = [enc.encode([(t, "start")])[0] for t in texts]
    return ids, eng.generate(ids, SamplingParams(**params)).samples


def test_an_engine_without_on_step_streams_the_finished_text_a_word_per_delta(engine):
    """The vLLM engine's path, on CPU: an engine whose generate takes no `on_step` is streamed
    after generation, in the words of each sample's text (no server needed)."""
    import asyncio

    from align.serve import CompletionService, text_pieces
    from rollout import SamplingParams
    from rollout.base import streams_tokens

    eng, tok, _ = engine

    class WholeOnly:  # generate(prompts, params) and nothing more, as VLLMEngine
        def generate(self, prompts, params):
            return eng.generate(prompts, params)

    assert streams_tokens(eng) and not streams_tokens(WholeOnly())
    service = CompletionService(WholeOnly(), tok, name=MODEL, context=512)
    prompts = service.prompt_ids(PROMPTS[:2])

    async def events():
        return [e async for e in service.stream(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=0))]

    *deltas, out = asyncio.run(events())
    assert deltas == [(k, piece) for k, s in enumerate(out.samples) for piece in text_pieces(s.text)]
    assert len(out.samples) == 4 and len(deltas) > 8


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_completions_equal_the_engine(client, engine):
    ids, expected = _expected(engine, PROMPTS[:2], temperature=0, max_new_tokens=24)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=24, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [s.text for s in expected]
    assert [c.finish_reason for c in got.choices] == [s.finish_reason for s in expected]
    assert got.usage.prompt_tokens == sum(map(len, ids))
    assert got.usage.completion_tokens == sum(len(s.token_ids) for s in expected)
    assert got.object == "text_completion" and got.model == MODEL
    # token-id prompts are accepted too, and sample the same
    again = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=24, temperature=0)
    assert again.choices[0].text == expected[0].text


def test_chat_completion_renders_the_chat_template_and_equals_the_engine(client, engine):
    from align.data.chat import render_chat
    from rollout import SamplingParams

    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]
    eng, tok, enc = engine
    ids = enc.encode([(render_chat(messages, tok, add_generation_prompt=True), "start")])[0]
    (expected,) = eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=20)).samples
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.usage.prompt_tokens == len(ids)


def test_stream_chunks_join_to_the_non_streamed_greedy_text(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32, temperature=0).choices[0]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2  # really chunked, not one blob
    assert "".join(pieces) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens > 0  # the usage chunk comes last

    messages = [{"role": "user", "content": "Tell me a story."}]
    chat_whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat_whole.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat_whole.choices[0].finish_reason


def _joined(chunks, chat: bool = False) -> list[str]:
    """Each choice's streamed text, by choice index."""
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + piece
    return [texts[k] for k in sorted(texts)]


def test_seeded_n_samples_stream_to_the_non_streamed_texts(client):
    """n = 2 on two prompts (choices interleave as tokens arrive), and a chat with n = 2."""
    request = dict(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=40, temperature=1.0, seed=11)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True))
    assert _joined(chunks) == [c.text for c in whole.choices]
    assert len(set(_joined(chunks))) == 4
    finish = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finish == {c.index: c.finish_reason for c in whole.choices}

    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], n=2, max_tokens=30,
                temperature=1.0, seed=5)
    chat_whole = client.chat.completions.create(**chat)
    stream = list(client.chat.completions.create(**chat, stream=True))
    assert _joined(stream, chat=True) == [c.message.content for c in chat_whole.choices]
    assert {ch.index for c in stream for ch in c.choices if ch.delta.role == "assistant"} == {0, 1}


def test_stream_is_token_by_token_and_starts_before_generation_ends(client):
    """200 greedy tokens of about 100 words: a delta per token (not per word), and the first
    arrives in the first half of the wait for the last (a whole-text stream would send both
    at once, after the generation)."""
    asked = time.monotonic()
    pieces, times, usage = [], [], None
    for c in client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
        if c.choices and c.choices[0].text:
            pieces.append(c.choices[0].text)
            times.append(time.monotonic())
        usage = c.usage or usage
    text = "".join(pieces)
    assert usage.completion_tokens == 200
    assert len(pieces) >= 190 > 1.5 * len(text.split())
    assert times[0] - asked < 0.5 * (times[-1] - asked)


@pytest.mark.parametrize("stop", [["named Lily", "zzzzzz"], ["."]])
def test_stop_strings_are_never_streamed(client, stop):
    """The greedy story holds both stops (", there was a little girl named Lily. She ..."), the
    first over several tokens and behind a longer one; the stream ends before the stop string,
    as the non-streamed text does."""
    request = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop)
    whole = client.completions.create(**request).choices[0]
    assert whole.finish_reason == "stop" and whole.text.startswith(", there was")
    chunks = list(client.completions.create(**request, stream=True))
    assert _joined(chunks) == [whole.text]


def test_stop_strings_are_never_streamed_in_chat(client):
    """The greedy reply starts '"Here," Annabyed.'; the stop string spans several tokens."""
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=40,
                   temperature=0, stop=["Annabyed."])
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "stop" and whole.message.content.startswith('"Here,"')
    stream = list(client.chat.completions.create(**request, stream=True))
    assert _joined(stream, chat=True) == [whole.message.content]


def test_n_samples_are_seeded_like_the_engine(client, engine):
    _, expected = _expected(engine, PROMPTS[:1], n=3, temperature=1.0, max_new_tokens=16, seed=7)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=3, max_tokens=16, temperature=1.0, seed=7)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [s.text for s in expected]
    assert len({c.text for c in got.choices}) > 1  # sampled, not three copies of one


def test_concurrent_requests_all_succeed_and_equal_sequential_ones(client):
    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    sequential = [ask(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(ask, PROMPTS))
    assert concurrent == sequential
    assert len(set(sequential)) == len(PROMPTS)


@pytest.mark.parametrize(
    "kwargs, status, param",
    [
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"n": 0}, 400, "n"),
        ({"top_p": 0}, 400, "top_p"),
        ({"logprobs": 2}, 400, "logprobs"),
        ({"prompt": "Once upon a time " * 200}, 400, "prompt"),  # > 512 tokens of context
        ({"model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_request_gets_4xx_with_a_message(client, kwargs, status, param):
    request = {"model": MODEL, "prompt": "Once", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**request)
    assert err.value.status_code == status
    body = err.value.body  # the "error" object of OpenAI's error shape
    assert body["param"] == param and body["message"] and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "payload, route, param",
    [
        ({"model": MODEL, "max_tokens": 4}, "completions", "prompt"),  # missing prompt
        ({"model": MODEL, "messages": []}, "chat/completions", "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "chat/completions", "messages"),
        ("{not json", "completions", None),
    ],
)
def test_malformed_request_gets_400_in_openai_error_shape(server, payload, route, param):
    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    req = urllib.request.Request(f"{server}/v1/{route}", data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    error = json.loads(err.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


def test_sigterm_stops_the_server_and_leaves_no_process(launched, server):
    """Last in this file. SIGTERM: the server shuts Serve and Ray down and exits 0 (~8 s with the
    2 cores loaded; the bound is looser), and no process of its session is left: the watchdog
    (align/lifecycle.py) ends anything Ray's shutdown left."""
    proc = launched.procs[-1]
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=45) == 0, launched.log_path.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 45 s after SIGTERM:\n{launched.log_path.read_text()[-3000:]}")
    deadline = time.monotonic() + 15
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not session_pids(proc.pid)
