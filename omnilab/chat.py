"""A generic client for OpenAI-compatible chat completions: judges (VIEScore, MICo-Bench), planners, captioners.

One request is the JSON body `{"model", "messages", "temperature", ...}` POSTed to `<base_url>/chat/completions`;
a message's `content` is a string or a list of parts `{"type": "text", "text"}` and
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (`user_message` builds one from
text and images). The answer is `choices[0].message.content`. Any server that speaks this protocol works:
a hosted API, vLLM / SGLang / TGI serving an open VLM, or a reward server that adds the route.

Reliability: every attempt has one overall deadline (`timeout`, connect + send + answer);
a refused connection, a dropped one, HTTP 429 / 5xx, a timeout or an answer that is not chat-completions JSON
is retried up to `retries` times with exponential backoff (`backoff * 2^attempt`, at most `max_backoff`, or
the server's Retry-After), then raised as a `ChatError` whose `kind` ("timeout", "http_error",
"connection", "bad_response") the caller records. Other 4xx answers are not retried (the request is wrong).

Concurrency is bounded per client: at most `concurrency` requests are in flight at once, whichever thread
sends them (`complete_many` fans a list out over that many threads). Answers are cached on disk under
`cache_dir`, keyed by the SHA-256 of the full request (the URL and the whole body, images included; never
the API key), one small JSON file per answer, written atomically: a rerun, or a run resumed after a crash,
asks the server nothing it already answered (`stats["calls"]` counts the HTTP attempts made). The key is
read from the environment variable `api_key_env`, never from a config file.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Message = dict[str, Any]
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_ANSWER_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- messages


def encode_image(image: Any, max_side: int | None = None, fmt: str = "png") -> str:
    """A data URL of an image: a [3, H, W] tensor in [-1, 1], an HxWx3 uint8 array, a PIL image or PNG/JPEG bytes.

    With `max_side`, an image whose longer side is larger is downscaled (aspect kept) before encoding.
    """
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as opened:
            if max_side is None or max(opened.size) <= max_side:
                mime = "png" if bytes(image).startswith(b"\x89PNG") else "jpeg"
                return f"data:image/{mime};base64," + base64.b64encode(bytes(image)).decode("ascii")
            pil = opened.convert("RGB")
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        pil = Image.fromarray(image.astype(np.uint8))
    else:  # a torch tensor in [-1, 1]
        array = (
            ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        )
        pil = Image.fromarray(array)
    if max_side is not None and max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=1)
    else:
        pil.save(buf, format="JPEG", quality=95)
    mime = "png" if fmt == "png" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(url: str) -> Image.Image:
    """The RGB PIL image of a `data:image/...;base64,` URL; ValueError for anything else."""
    head, _, data = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError(f"an image must be a base64 data URL, got {url[:40]!r}...")
    with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
        return img.convert("RGB")


def user_message(
    text: str, images: Sequence[Any] = (), text_first: bool = True, max_side: int | None = None
) -> Message:
    """One user message: the text and the images as data-URL parts (text first, as VIEScore and MICo send)."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": encode_image(img, max_side)}} for img in images
    ]
    text_part = {"type": "text", "text": text}
    return {"role": "user", "content": [text_part, *parts] if text_first else [*parts, text_part]}


def message_parts(message: Message) -> tuple[list[str], list[str]]:
    """(texts, image data URLs) of a message, in order."""
    content = message.get("content")
    if isinstance(content, str):
        return [content], []
    texts, images = [], []
    for part in content or []:
        if part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif part.get("type") == "image_url":
            images.append(part["image_url"]["url"])
    return texts, images


# --------------------------------------------------------------------------- errors and results


class ChatError(RuntimeError):
    """A request that got no usable answer; `kind` says why (a benchmark records it per case)."""

    kind = "judge_error"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


@dataclass(frozen=True)
class ChatResult:
    """An answer: its text, whether it came from the cache, and the HTTP attempts it took (0 when cached)."""

    text: str
    cached: bool
    attempts: int


# --------------------------------------------------------------------------- the cache


def request_key(url: str, body: dict[str, Any]) -> str:
    """SHA-256 of the URL and the full request body, canonically serialised (sorted keys, no spaces)."""
    canonical = json.dumps(
        {"url": url, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """Answers on disk: `<dir>/<key[:2]>/<key>.json` = {"key", "text", "model"}; writes are atomic."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        """The file of one key."""
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached answer of `key`, or None (a missing or unreadable entry is a miss)."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        return entry.get("text") if isinstance(entry, dict) and entry.get("key") == key else None

    def put(self, key: str, text: str, model: str = "") -> None:
        """Store an answer: written to a temporary file beside its place, then renamed over it."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "text": text, "model": model}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --------------------------------------------------------------------------- HTTP


def post_json(
    url: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int, dict[str, str], bytes]:
    """One POST under one overall deadline: (status, lower-cased headers, body). TimeoutError past `timeout`."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"deadline of {timeout:g} s passed")
        return left

    conn = kind(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.connect()
        conn.sock.settimeout(remaining())
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
        conn.sock.settimeout(remaining())
        response = conn.getresponse()
        chunks, size = [], 0
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(remaining())
            chunk = response.read(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise http.client.HTTPException(f"answer larger than {MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(chunks)
    finally:
        conn.close()


def answer_text(status: int, payload: bytes) -> str:
    """`choices[0].message.content` of a 200 chat-completions answer; ChatError("bad_response") otherwise."""
    try:
        reply = json.loads(payload)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ChatError(
            f"answer {status} is not chat-completions JSON ({type(err).__name__}): {payload[:200]!r}",
            "bad_response",
        ) from err
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ChatError(f"answer content is {type(content).__name__}, not text", "bad_response")
    return content


# --------------------------------------------------------------------------- the client


class ChatClient:
    """An OpenAI-compatible chat-completions client with retries, a deadline, bounded concurrency and a cache.

    Args:
        base_url: The API root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.
        model: The model name sent with every request (e.g. gpt-4.1, gpt-5.4, Qwen/Qwen2.5-VL-72B-Instruct).
        api_key_env: Environment variable holding the API key (sent as a Bearer token); unset: no key sent.
        temperature: Sampling temperature (0: the judges' deterministic setting).
        max_tokens: The answer's token limit (None: the server's default).
        timeout: Seconds one attempt may take in all (connect, send, answer).
        retries: Further attempts after a retryable failure (see the module docstring).
        backoff: Seconds before the first retry; doubled each time, plus up to 10% jitter.
        max_backoff: The longest wait between attempts (also caps a server's Retry-After).
        concurrency: Requests in flight at once through this client, over all threads.
        cache_dir: Folder of the response cache (None: no cache).
        extra_body: More request fields (e.g. {"seed": 0}); part of the cache key.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        cache_dir: str | Path | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {base_url!r} must be http(s)://host[:port]/path")
        if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1:
            raise ValueError("timeout must be > 0, retries >= 0, backoff >= 0 and concurrency >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, float(timeout)
        self.retries, self.backoff, self.max_backoff = int(retries), float(backoff), float(max_backoff)
        self.concurrency, self.extra_body = int(concurrency), dict(extra_body or {})
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "calls": 0, "cache_hits": 0, "failures": 0, "retries": 0}

    @property
    def model_id(self) -> str:
        """The model name recorded with results."""
        return self.model

    def body(self, messages: list[Message]) -> dict[str, Any]:
        """The request body of `messages` (model, temperature, max_tokens and extra_body added)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return {**body, **self.extra_body}

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self.stats[key] += value

    def complete(self, messages: list[Message]) -> ChatResult:
        """The answer to one conversation: from the cache, else from the server; ChatError after the retries."""
        body = self.body(messages)
        key = request_key(self.url, body)
        self._count(requests=1)
        if self.cache is not None and (text := self.cache.get(key)) is not None:
            self._count(cache_hits=1)
            return ChatResult(text, cached=True, attempts=0)
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        jitter = random.Random(key)
        error: ChatError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._count(retries=1)
                time.sleep(self._wait(attempt, error, jitter))
            try:
                with self._slots:
                    self._count(calls=1)
                    status, reply_headers, payload = post_json(self.url, data, headers, self.timeout)
            except TimeoutError as err:
                error = ChatError(f"{self.url}: no answer within {self.timeout:g} s ({err})", "timeout")
                continue
            except (ConnectionError, http.client.RemoteDisconnected) as err:
                error = ChatError(f"{self.url}: cannot connect ({type(err).__name__}: {err})", "connection")
                continue
            except (OSError, http.client.HTTPException) as err:
                error = ChatError(f"{self.url}: {type(err).__name__}: {err}", "connection")
                continue
            if status != 200:
                error = ChatError(f"{self.url} answered HTTP {status}: {payload[:300]!r}", "http_error")
                error.retry_after = reply_headers.get("retry-after")  # type: ignore[attr-defined]
                if status in RETRY_STATUSES:
                    continue
                break
            try:
                text = answer_text(status, payload)
            except ChatError as err:
                error = err
                continue
            if self.cache is not None:
                self.cache.put(key, text, self.model)
            return ChatResult(text, cached=False, attempts=attempt + 1)
        self._count(failures=1)
        assert error is not None
        raise ChatError(f"{error} (after {attempt + 1} attempt(s))", error.kind)

    def _wait(self, attempt: int, error: ChatError | None, jitter: random.Random) -> float:
        """Seconds before retry `attempt` (1-based): the server's Retry-After, else backoff * 2^(attempt-1)."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return wait * (1 + 0.1 * jitter.random())

    def complete_many(self, requests: Sequence[list[Message]]) -> list[ChatResult | ChatError]:
        """Answers to many conversations, in order, `concurrency` at a time; a failure is returned, not raised."""

        def one(messages: list[Message]) -> ChatResult | ChatError:
            try:
                return self.complete(messages)
            except ChatError as err:
                return err

        if len(requests) <= 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(one, requests))
