"""The LLM client against a real HTTP server speaking the chat-completions API on loopback."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image
from pydantic import BaseModel

from mmdiff.errors import ConfigError
from mmdiff.interp.client import (
    ChatRequest,
    LLMClient,
    LLMConfig,
    LLMError,
    LLMReplyError,
    backoff_delay,
    parse_json_reply,
    retry_after_seconds,
    user_message,
)

# ------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server (also used by test_explain.py)
# ------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What the fake server sends back: a status, headers, a body, after an optional sleep."""

    content: str | None = None  # chat message content; wrapped in a chat-completions body
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # send these bytes as the body instead
    sleep_s: float = 0.0


Behaviour = Callable[[dict[str, Any], int], Reply]  # (request body, request index) -> Reply


def completion(content: str, model: str = "fake") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()


class FakeOpenAI:
    """A threaded HTTP server on 127.0.0.1:<free port> answering POST /v1/chat/completions."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    index = len(fake.requests)
                    fake.requests.append(body)
                    fake.auth_headers.append(self.headers.get("Authorization"))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                done = False

                def finish() -> None:  # no longer in flight: before the client can read the reply
                    nonlocal done
                    if not done:
                        with fake._lock:
                            fake.in_flight -= 1
                        done = True

                try:
                    if self.path != "/v1/chat/completions":
                        reply = Reply(status=404, raw=b'{"error": "not found"}')
                    else:
                        reply = fake.behaviour(body, index)
                    if reply.sleep_s:
                        time.sleep(reply.sleep_s)
                    payload = (
                        reply.raw if reply.raw is not None else completion(reply.content or "")
                    )
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    finish()  # after the body is sent, the client may start its next request first
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    finish()

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def fast_config(base_url: str, **kw: Any) -> LLMConfig:
    defaults = dict(
        model="fake-model",
        api_key_env="MMDIFF_TEST_NO_SUCH_KEY",
        timeout_s=5.0,
        max_retries=2,
        reply_retries=1,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        trust_env=False,  # a proxy from the environment must not intercept loopback requests
    )
    defaults.update(kw)
    return LLMConfig(base_url=base_url, **defaults)


class Verdict(BaseModel):
    label: str
    score: float


# ------------------------------------------------------------------------------------------------


def test_json_reply_parsed_validated_and_request_well_formed():
    with FakeOpenAI(lambda body, i: Reply('{"label": "spatial", "score": 0.75}')) as srv:
        with LLMClient(fast_config(srv.base_url)) as client:
            out = client.chat_json([user_message("hi")], Verdict)
    assert out == Verdict(label="spatial", score=0.75)
    (req,) = srv.requests
    assert req["model"] == "fake-model"
    assert req["response_format"] == {"type": "json_object"}
    assert req["temperature"] == 0.0
    assert req["messages"] == [{"role": "user", "content": "hi"}]
    assert srv.auth_headers == [None]  # no key in the environment -> no Authorization header


def test_json_mode_without_response_format_for_servers_that_reject_it():
    with FakeOpenAI(lambda body, i: Reply('```json\n{"label": "a", "score": 0}\n```')) as srv:
        with LLMClient(fast_config(srv.base_url, json_response_format=False)) as client:
            assert client.chat_json([user_message("hi")], Verdict).label == "a"
    assert "response_format" not in srv.requests[0]


def test_fenced_json_is_accepted():
    assert parse_json_reply('```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert parse_json_reply('Sure! {"a": 1} Hope it helps.') == {"a": 1}
    with pytest.raises(json.JSONDecodeError):
        parse_json_reply("no json here")


def test_not_json_reply_raises_after_reply_retries():
    with FakeOpenAI(lambda body, i: Reply("I think it is about cats.")) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=2)) as client:
            with pytest.raises(LLMReplyError, match="never gave a JSON object") as err:
                client.chat_json([user_message("hi")], Verdict)
    assert len(srv.requests) == 3  # first try + 2 reply retries
    assert "about cats" in str(err.value)


def test_invalid_reply_is_asked_again_and_the_good_one_kept():
    replies = ['{"label": "x"}', '{"label": "x", "score": 1}']
    with FakeOpenAI(lambda body, i: Reply(replies[min(i, 1)])) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=1)) as client:
            assert client.chat_json([user_message("hi")], Verdict).score == 1.0
    assert len(srv.requests) == 2


def test_missing_field_error_names_field():
    with FakeOpenAI(lambda body, i: Reply('{"label": "x"}')) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=1)) as client:
            with pytest.raises(LLMReplyError, match="score"):
                client.chat_json([user_message("hi")], Verdict)
    assert len(srv.requests) == 2


def test_body_that_is_not_a_chat_completion_is_a_typed_failure():
    with FakeOpenAI(lambda body, i: Reply(raw=b'{"unexpected": true}')) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=0)) as client:
            with pytest.raises(LLMReplyError, match="choices"):
                client.chat([user_message("hi")])


def test_timeout_is_retried_then_fails_clearly():
    with FakeOpenAI(lambda body, i: Reply('{"label": "x", "score": 1}', sleep_s=1.0)) as srv:
        with LLMClient(fast_config(srv.base_url, timeout_s=0.2, max_retries=1)) as client:
            t0 = time.monotonic()
            with pytest.raises(LLMError, match="timed out") as err:
                client.chat_json([user_message("hi")], Verdict)
            elapsed = time.monotonic() - t0
    assert not isinstance(err.value, LLMReplyError)
    assert len(srv.requests) == 2  # first attempt + 1 retry
    assert elapsed < 1.8  # gave up at the 0.2 s timeout each time; waiting out the sleeps takes 2 s


def test_429_with_retry_after_is_respected_then_succeeds():
    def behaviour(body: dict, i: int) -> Reply:
        if i == 0:
            return Reply(status=429, headers={"Retry-After": "1"}, raw=b'{"error": "rate limited"}')
        return Reply('{"label": "ok", "score": 0.5}')

    with FakeOpenAI(behaviour) as srv:
        with LLMClient(fast_config(srv.base_url, backoff_max_s=5.0)) as client:
            t0 = time.monotonic()
            out = client.chat_json([user_message("hi")], Verdict)
            elapsed = time.monotonic() - t0
            assert client.stats["retries"] == 1
    assert out.label == "ok"
    assert len(srv.requests) == 2
    assert 1.0 <= elapsed < 3.0  # waited the server's Retry-After, not the 0.01 s backoff


def test_5xx_is_retried_and_4xx_is_not():
    with FakeOpenAI(
        lambda body, i: Reply(status=503, raw=b"busy") if i < 2 else Reply("done")
    ) as srv:
        with LLMClient(fast_config(srv.base_url, max_retries=2)) as client:
            assert client.chat([user_message("hi")]) == "done"
    assert len(srv.requests) == 3
    with FakeOpenAI(lambda body, i: Reply(status=401, raw=b'{"error": "bad key"}')) as srv:
        with LLMClient(fast_config(srv.base_url, api_key_env="MY_KEY_VAR")) as client:
            with pytest.raises(LLMError, match=r"HTTP 401.*\$MY_KEY_VAR"):
                client.chat([user_message("hi")])
    assert len(srv.requests) == 1


def test_connection_error_is_retried_then_fails():
    with FakeOpenAI(lambda body, i: Reply("x")) as srv:
        url = srv.base_url  # the port is free again once the server is closed
    with LLMClient(fast_config(url, max_retries=2)) as client:
        with pytest.raises(LLMError, match="failed 3 times.*connection error"):
            client.chat([user_message("hi")])
        assert client.stats["requests"] == 3


def test_cache_hit_does_not_reach_the_server(tmp_path: Path):
    with FakeOpenAI(lambda body, i: Reply('{"label": "cached", "score": 0.25}')) as srv:
        cfg = fast_config(srv.base_url, cache_dir=tmp_path / "cache")
        with LLMClient(cfg) as client:
            a = client.chat_json([user_message("same question")], Verdict)
        with LLMClient(cfg) as client:  # a fresh client reads the same folder
            b = client.chat_json([user_message("same question")], Verdict)
            assert client.stats == {"requests": 0, "cache_hits": 1, "retries": 0}
            client.chat_json([user_message("another question")], Verdict)
    assert a == b
    assert len(srv.requests) == 2  # the repeat was served from disk
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


def test_changed_params_miss_the_cache(tmp_path: Path):
    with FakeOpenAI(lambda body, i: Reply("r")) as srv:
        with LLMClient(fast_config(srv.base_url, cache_dir=tmp_path)) as client:
            client.chat([user_message("q")])
            client.chat([user_message("q")], temperature=0.7)
            client.chat([user_message("q")])
    assert len(srv.requests) == 2
    assert srv.requests[1]["temperature"] == 0.7


def test_concurrency_limit_holds_across_a_batch():
    with FakeOpenAI(lambda body, i: Reply(f'{{"label": "{i}", "score": 0}}', sleep_s=0.1)) as srv:
        with LLMClient(fast_config(srv.base_url, max_concurrency=3)) as client:
            reqs = [ChatRequest([user_message(f"q{i}")], validator=Verdict) for i in range(12)]
            out = client.chat_many(reqs, progress=False)
    assert len(out) == 12 and all(isinstance(o, Verdict) for o in out)
    assert len(srv.requests) == 12
    assert srv.max_in_flight == 3  # the limit was reached and never exceeded
    # results come back in request order
    asked = [r["messages"][0]["content"] for r in srv.requests]
    labels = {asked[int(o.label)] for o in out}
    assert labels == {f"q{i}" for i in range(12)}


def test_chat_many_can_return_exceptions():
    with FakeOpenAI(lambda body, i: Reply("not json")) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=0)) as client:
            out = client.chat_many(
                [ChatRequest([user_message("q")])], progress=False, return_exceptions=True
            )
    assert isinstance(out[0], LLMReplyError)


def test_api_key_sent_as_bearer_but_never_logged_reprd_or_cached(
    tmp_path: Path, monkeypatch, caplog
):
    secret = "sk-test-7f3a9c2e51d4-do-not-leak"
    monkeypatch.setenv("MMDIFF_TEST_LLM_KEY", secret)
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included

    def behaviour(body: dict, i: int) -> Reply:
        if i == 0:
            return Reply(status=500, raw=b'{"error": "flaky"}')  # forces a logged retry
        return Reply('{"label": "k", "score": 1}')

    with FakeOpenAI(behaviour) as srv:
        cfg = fast_config(srv.base_url, api_key_env="MMDIFF_TEST_LLM_KEY", cache_dir=tmp_path / "c")
        client = LLMClient(cfg)
        client.chat_json([user_message("q")], Verdict)
        client.chat_json([user_message("q")], Verdict)  # cache hit
        texts = [repr(client), str(client), repr(cfg), repr(client.__dict__), repr(client.stats)]
        client.close()
    assert srv.auth_headers == [f"Bearer {secret}"] * 2
    assert caplog.records, "expected the retry to be logged"
    for rec in caplog.records:
        assert secret not in rec.getMessage()
        assert secret not in repr(rec.args)
    assert secret not in caplog.text
    for t in texts:
        assert secret not in t
    assert "MMDIFF_TEST_LLM_KEY" in repr(cfg)  # the variable's NAME is fine to show
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes()
            assert secret not in f.name


def test_images_become_data_url_parts_and_are_refused_when_unsupported():
    img = Image.new("RGB", (4, 3), (255, 0, 0))
    msg = user_message("what colour?", images=[img])
    assert msg["content"][0] == {"type": "text", "text": "what colour?"}
    url = msg["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,iVBOR")  # the PNG signature, base64-encoded
    with FakeOpenAI(lambda body, i: Reply("red")) as srv:
        with LLMClient(fast_config(srv.base_url)) as client:
            assert client.chat([msg]) == "red"
        assert srv.requests[0]["messages"][0]["content"][1]["image_url"]["url"] == url
        with LLMClient(fast_config(srv.base_url, supports_images=False)) as client:
            with pytest.raises(ConfigError, match="supports_images"):
                client.chat([msg])
    assert len(srv.requests) == 1


def test_retry_after_parsing_and_backoff_bounds():
    import random

    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert (
        retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0)
        == 10.0
    )
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None
    rng = random.Random(0)
    for attempt in range(6):
        d = backoff_delay(attempt, 1.0, 10.0, rng)
        cap = min(10.0, 2.0**attempt)
        assert cap / 2 <= d <= cap


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="http"):
        LLMConfig(base_url="localhost:8000", model="m")
    with pytest.raises(ConfigError, match="max_concurrency"):
        LLMConfig(base_url="http://x/v1", model="m", max_concurrency=0)
