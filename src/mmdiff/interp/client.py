"""A client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, sglang, ollama).

What a user gets: `LLMClient(LLMConfig(base_url, model)).chat_json(messages, schema)` returns a
validated reply; `chat_many` runs a batch under a concurrency limit; replies are cached on disk.

Why httpx and not the `openai` SDK: the SDK is not a dependency of mmdiff and brings its own retry
and timeout policy; we need exact control over which failures are retried (429, 5xx, timeouts,
connection errors), over Retry-After, over the on-disk cache, and over where the API key travels
(one Authorization header per request; never in a repr, log record, cache key or file). httpx is a
well-kept, thread-safe HTTP client with per-request timeouts, which is all this needs.

The API key is read from the environment variable NAMED by `LLMConfig.api_key_env` (default
OPENAI_API_KEY) at request time. When that variable is unset no Authorization header is sent, which
is what local servers (vLLM, sglang, ollama) expect.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, Union

import httpx

from mmdiff.atomic import write_json
from mmdiff.errors import ConfigError, MMDiffError

log = logging.getLogger(__name__)

T = TypeVar("T")
Message = dict[str, Any]
# A validator: a pydantic model class, or a callable that takes the parsed JSON and returns the
# value to hand back (raising ValueError / TypeError when the reply does not fit).
Validator = Union[type, Callable[[Any], Any]]


class LLMError(MMDiffError, RuntimeError):
    """An LLM request failed: the endpoint could not be reached, refused, or kept failing."""


class LLMReplyError(LLMError):
    """The endpoint answered, but never with a reply that parses and validates."""


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to reach an OpenAI-compatible chat endpoint."""

    base_url: str
    """Endpoint root, e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM)."""
    model: str
    """Model name the server knows, e.g. gpt-4o-mini or Qwen/Qwen2.5-VL-7B-Instruct."""
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key (the key itself is never stored)."""
    supports_images: bool = True
    """Whether the model takes images (content parts with base64 data URLs)."""
    json_response_format: bool = True
    """Send response_format json_object in JSON mode; turn off for servers that reject it (the
    reply is still parsed and validated as JSON)."""
    temperature: float = 0.0
    """Sampling temperature; 0 makes replies (and cache hits) as repeatable as the server allows."""
    max_tokens: int | None = 1024
    """Upper bound on reply tokens; None leaves it to the server."""
    seed: int | None = None
    """Sampling seed sent to servers that honour it."""
    timeout_s: float = 60.0
    """Per-request timeout (connect, read, write, pool), seconds."""
    max_retries: int = 5
    """Retries after the first attempt on 429, 5xx, timeouts and connection errors."""
    reply_retries: int = 2
    """Extra attempts when a reply is not valid JSON or fails validation (not cached)."""
    backoff_base_s: float = 1.0
    """First backoff delay; doubles each retry, with jitter."""
    backoff_max_s: float = 60.0
    """Cap on one backoff delay and on a server's Retry-After."""
    max_concurrency: int = 8
    """Most requests in flight at once from this client (all threads together)."""
    cache_dir: Path | None = None
    """Folder for the on-disk reply cache; None disables caching."""
    trust_env: bool = True
    """Honour HTTP(S)_PROXY / NO_PROXY / SSL_CERT_FILE from the environment (clusters need them)."""

    def __post_init__(self) -> None:
        if not self.base_url or not re.match(r"^https?://", self.base_url):
            raise ConfigError(
                f"LLM base_url must be an http(s) URL such as http://localhost:8000/v1, "
                f"found {self.base_url!r}"
            )
        if not self.model:
            raise ConfigError("LLM model name is empty: set the model the endpoint serves")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, found {self.max_concurrency}")
        if self.max_retries < 0 or self.reply_retries < 0:
            raise ConfigError("max_retries and reply_retries must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, found {self.timeout_s}")


# ------------------------------------------------------------------------------------------------
# Message helpers
# ------------------------------------------------------------------------------------------------


def image_data_url(image: Any, mime: str = "image/png") -> str:
    """A data URL (base64) for a PIL image, PNG bytes or a path to an image file."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise LLMError(f"image file {path} does not exist")
        data = path.read_bytes()
        if path.suffix.lower() in (".jpg", ".jpeg"):
            mime = "image/jpeg"
    elif hasattr(image, "save"):  # PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise LLMError(
            f"cannot send a {type(image).__name__} as an image: give PIL, PNG bytes or a path"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(text: str, images: Sequence[Any] = ()) -> Message:
    """A user message; with images, OpenAI content parts (text first, then image_url parts)."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
    return {"role": "user", "content": parts}


def system_message(text: str) -> Message:
    return {"role": "system", "content": text}


def _has_images(messages: Sequence[Message]) -> bool:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(p.get("type") == "image_url" for p in content):
            return True
    return False


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_json_reply(content: str) -> Any:
    """Parse a JSON reply; tolerates a ```json fence and text around one top-level object."""
    text = content.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start != -1 and end > start:
            return json.loads(text[start : end + 1])  # may raise JSONDecodeError again
        raise


def _validate(value: Any, validator: Validator | None) -> Any:
    if validator is None:
        return value
    if isinstance(validator, type) and hasattr(validator, "model_validate"):  # pydantic model
        return validator.model_validate(value)
    return validator(value)


# ------------------------------------------------------------------------------------------------
# Retry policy
# ------------------------------------------------------------------------------------------------

_RETRY_STATUS = {408, 409, 425, 429}


def _is_retryable_status(status: int) -> bool:
    return status in _RETRY_STATUS or status >= 500


def retry_after_seconds(
    headers: httpx.Headers | dict[str, str], now: float | None = None
) -> float | None:
    """Seconds a server asked us to wait: `retry-after-ms`, or Retry-After (seconds or a date)."""
    h = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = h.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: d = min(cap, base * 2**attempt); wait in [d/2, d]."""
    d = min(cap, base * (2**attempt))
    return d / 2 + rng.uniform(0, d / 2)


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """One chat request of a batch: messages, and how to check the reply."""

    messages: list[Message]
    json_mode: bool = True
    validator: Validator | None = None
    params: dict[str, Any] = field(default_factory=dict)


class LLMClient:
    """Chat completions against an OpenAI-compatible endpoint, with retries, a concurrency limit
    and an on-disk cache. Thread-safe; one instance can serve a whole run."""

    def __init__(self, config: LLMConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(config.timeout_s),
            transport=transport,
            trust_env=config.trust_env,
        )
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}

    def __repr__(self) -> str:  # the key is never an attribute, so it can never show here
        c = self.config
        return (
            f"LLMClient(base_url={c.base_url!r}, model={c.model!r}, api_key_env={c.api_key_env!r})"
        )

    @property
    def supports_images(self) -> bool:
        return self.config.supports_images

    @property
    def name(self) -> str:
        return self.config.model

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cache ------------------------------------------------------------------------------------

    def _body(
        self, messages: Sequence[Message], json_mode: bool, params: dict[str, Any]
    ) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "messages": list(messages),
            "temperature": c.temperature,
        }
        if c.max_tokens is not None:
            body["max_tokens"] = c.max_tokens
        if c.seed is not None:
            body["seed"] = c.seed
        if json_mode and c.json_response_format:
            body["response_format"] = {"type": "json_object"}
        body.update(params)
        return body

    @staticmethod
    def cache_key(body: dict[str, Any]) -> str:
        """sha256 of (model, messages, params): the request body, which never holds the key."""
        return hashlib.sha256(
            json.dumps(body, sort_keys=True, ensure_ascii=True).encode()
        ).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        if self.config.cache_dir is None:
            return None
        return Path(self.config.cache_dir) / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return str(entry["content"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable LLM cache entry %s: %s", path, exc)
            return None

    def _cache_put(self, key: str, body: dict[str, Any], content: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        params = {k: v for k, v in body.items() if k not in ("messages",)}
        write_json(path, {"key": key, "params": params, "content": content, "created": time.time()})

    # -- HTTP -------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: dict[str, Any]) -> str:
        """POST once per attempt until a 200 with a message content; retries transient failures."""
        c = self.config
        last: str = ""
        for attempt in range(c.max_retries + 1):
            wait: float | None = None
            try:
                with self._slots:
                    with self._lock:
                        self.stats["requests"] += 1
                    resp = self._http.post("chat/completions", json=body, headers=self._headers())
            except httpx.TimeoutException as exc:
                last = f"timed out after {c.timeout_s:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"connection error ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code == 200:
                    return _content_of(resp)
                detail = resp.text[:300].replace("\n", " ")
                last = f"HTTP {resp.status_code}: {detail}"
                if not _is_retryable_status(resp.status_code):
                    raise LLMError(
                        f"{c.base_url} answered {last} for model {c.model!r}; "
                        "this is not transient: " + _hint(resp.status_code, c.api_key_env)
                    )
                wait = retry_after_seconds(resp.headers)
            if attempt == c.max_retries:
                break
            delay = backoff_delay(attempt, c.backoff_base_s, c.backoff_max_s, self._rng)
            if wait is not None:
                delay = min(max(wait, 0.0), c.backoff_max_s)
            with self._lock:
                self.stats["retries"] += 1
            log.info(
                "LLM request %s; retry %d/%d in %.2f s", last, attempt + 1, c.max_retries, delay
            )
            time.sleep(delay)
        raise LLMError(
            f"{c.base_url} (model {c.model!r}) failed {c.max_retries + 1} times, last: {last}. "
            "Check the server is up and not overloaded, or raise timeout_s / max_retries"
        )

    # -- public API -------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Message],
        *,
        json_mode: bool = False,
        validator: Validator | None = None,
        **params: Any,
    ) -> Any:
        """The reply to one chat: its text, or with json_mode the parsed and validated JSON.

        A reply that does not parse or validate is asked for again (`reply_retries`), then raises
        LLMReplyError saying what was expected and what came back. Only good replies are cached.
        """
        if _has_images(messages) and not self.config.supports_images:
            raise ConfigError(
                f"model {self.config.model!r} is configured without image input (supports_images="
                "False) but the messages contain images; drop them or enable supports_images"
            )
        body = self._body(messages, json_mode, params)
        key = self.cache_key(body)
        cached = self._cache_get(key)
        if cached is not None:
            try:
                value = self._finish(cached, json_mode, validator)
            except (ValueError, TypeError) as exc:
                log.warning(
                    "cached LLM reply %s no longer validates (%s); asking again", key[:12], exc
                )
            else:
                with self._lock:
                    self.stats["cache_hits"] += 1
                return value
        problem = ""
        for _ in range(self.config.reply_retries + 1):
            try:
                content = self._post(body)
            except LLMReplyError as exc:  # a 200 whose body is not a chat completion
                problem = str(exc)
                continue
            try:
                value = self._finish(content, json_mode, validator)
            except (ValueError, TypeError) as exc:  # JSONDecodeError and pydantic errors included
                problem = f"{type(exc).__name__}: {str(exc)[:300]}; reply began {content[:200]!r}"
                log.info("LLM reply rejected: %s", problem)
                continue
            self._cache_put(key, body, content)
            return value
        expected = "a JSON object" if json_mode else "a reply"
        if validator is not None:
            expected += f" accepted by {getattr(validator, '__name__', repr(validator))}"
        raise LLMReplyError(
            f"model {self.config.model!r} never gave {expected} in {self.config.reply_retries + 1} "
            f"tries; last problem: {problem}. Try a stronger model, or one that supports JSON mode"
        )

    def chat_json(
        self, messages: Sequence[Message], validator: Validator | None = None, **params: Any
    ) -> Any:
        """`chat` in JSON mode (response_format json_object) with parsing and validation."""
        return self.chat(messages, json_mode=True, validator=validator, **params)

    def chat_many(
        self,
        requests: Sequence[ChatRequest],
        *,
        progress: bool = True,
        description: str = "LLM requests",
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Replies to many chats, in order, at most `max_concurrency` in flight.

        With return_exceptions=True a failed request yields its LLMError instead of raising.
        """
        from rich.progress import Progress

        results: list[Any] = [None] * len(requests)

        def run(i: int) -> None:
            r = requests[i]
            try:
                results[i] = self.chat(
                    r.messages, json_mode=r.json_mode, validator=r.validator, **r.params
                )
            except LLMError as exc:
                if not return_exceptions:
                    raise
                results[i] = exc

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(description, total=len(requests))
            with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
                futures = [pool.submit(run, i) for i in range(len(requests))]
                for fut in futures:
                    fut.result()
                    bar.advance(task)
        return results

    def _finish(self, content: str, json_mode: bool, validator: Validator | None) -> Any:
        if json_mode:
            return _validate(parse_json_reply(content), validator)
        return _validate(content, validator)


def _content_of(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMReplyError(
            f"expected an OpenAI chat-completions body with choices[0].message.content, found "
            f"{resp.text[:200]!r} ({type(exc).__name__}); is base_url the /v1 root of an "
            "OpenAI-compatible server?"
        ) from exc
    if content is None:
        raise LLMReplyError(
            "the endpoint returned an empty message (content null); was it cut off?"
        )
    return str(content)


def _hint(status: int, key_env: str) -> str:
    if status in (401, 403):
        return f"check the API key in ${key_env} (is it set, and valid for this endpoint?)"
    if status == 404:
        return "check base_url (it should end in /v1) and that the server serves this model"
    if status == 400:
        return "the server rejected the request (JSON mode or images unsupported by this model?)"
    return "see the server's message above"
