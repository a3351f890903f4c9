"""The chat-completions client against a real local HTTP server: bodies, retries, deadlines, malformed answers, cache."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from omnilab.chat import ChatClient, ChatError, decode_image, message_parts, request_key, user_message
from tests.chat_server import ChatServer, Reply


def client(server, **kwargs):
    return ChatClient(server.base_url, "judge-1", **{"backoff": 0.01, "timeout": 10, **kwargs})


def test_request_carries_text_and_images_as_data_urls_at_temperature_zero():
    image = -torch.ones(3, 8, 12)
    image[0] = 1.0  # red
    with ChatServer(lambda body, n: Reply("ok")) as server:
        result = client(server).complete([user_message("rate this", [image, np.zeros((5, 4, 3), np.uint8)])])
        body = server.bodies[0]
    assert result.text == "ok" and not result.cached and result.attempts == 1
    assert body["model"] == "judge-1" and body["temperature"] == 0.0
    texts, urls = message_parts(body["messages"][0])
    assert texts == ["rate this"] and len(urls) == 2
    assert body["messages"][0]["content"][0]["type"] == "text"  # text first, then the images
    decoded = np.asarray(decode_image(urls[0]))
    assert decoded.shape == (8, 12, 3) and decoded[0, 0].tolist() == [255, 0, 0]


def test_server_errors_are_retried_with_backoff_then_answered():
    script = lambda body, n: Reply(status=503, raw=b'{"error": "busy"}') if n <= 2 else Reply("fine")  # noqa: E731
    with ChatServer(script) as server:
        c = client(server, retries=3)
        result = c.complete([user_message("hi")])
        assert result.text == "fine" and result.attempts == 3 and server.count == 3
        assert c.stats["retries"] == 2 and c.stats["calls"] == 3


def test_a_failing_server_gives_a_chat_error_after_the_retries():
    with ChatServer(lambda body, n: Reply(status=500, raw=b"boom")) as server:
        with pytest.raises(ChatError, match="HTTP 500") as err:
            client(server, retries=2).complete([user_message("hi")])
        assert err.value.kind == "http_error" and server.count == 3


def test_a_bad_request_is_not_retried():
    with ChatServer(lambda body, n: Reply(status=400, raw=b'{"error": "bad"}')) as server:
        with pytest.raises(ChatError, match="HTTP 400"):
            client(server, retries=3).complete([user_message("hi")])
        assert server.count == 1


def test_a_malformed_answer_is_a_bad_response_not_a_crash():
    with ChatServer(lambda body, n: Reply(raw=b"<html>not json</html>")) as server:
        with pytest.raises(ChatError, match="not chat-completions JSON") as err:
            client(server, retries=1).complete([user_message("hi")])
        assert err.value.kind == "bad_response" and server.count == 2
    with ChatServer(lambda body, n: Reply(raw=b'{"choices": []}')) as server:
        with pytest.raises(ChatError) as err:
            client(server, retries=0).complete([user_message("hi")])
        assert err.value.kind == "bad_response"


def test_a_slow_server_times_out_within_the_deadline():
    with ChatServer(lambda body, n: Reply("late", delay=3.0)) as server:
        with pytest.raises(ChatError, match=r"no answer within 0\.3 s") as err:
            client(server, timeout=0.3, retries=1).complete([user_message("hi")])
        assert err.value.kind == "timeout"


def test_a_refused_connection_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0.01)
    with pytest.raises(ChatError) as err:
        c.complete([user_message("hi")])
    assert err.value.kind == "connection" and c.stats["calls"] == 2


def test_the_cache_answers_a_repeated_request_without_calling(tmp_path):
    with ChatServer(lambda body, n: Reply(f"answer {n}")) as server:
        first = client(server, cache_dir=tmp_path / "cache").complete(
            [user_message("q", [torch.zeros(3, 4, 4)])]
        )
        again = client(server, cache_dir=tmp_path / "cache")
        second = again.complete([user_message("q", [torch.zeros(3, 4, 4)])])
        assert (first.text, second.text, second.cached) == ("answer 1", "answer 1", True)
        assert again.stats["calls"] == 0 and server.count == 1
        # any change of the request is another key: an image pixel, the temperature
        other = again.complete([user_message("q", [torch.ones(3, 4, 4)])])
        warmer = client(server, cache_dir=tmp_path / "cache", temperature=0.7).complete([user_message("q")])
        assert not other.cached and not warmer.cached and server.count == 3


def test_failures_are_not_cached(tmp_path):
    script = lambda body, n: Reply(status=500, raw=b"x") if n == 1 else Reply("ok")  # noqa: E731
    with ChatServer(script) as server:
        with pytest.raises(ChatError):
            client(server, retries=0, cache_dir=tmp_path).complete([user_message("q")])
        assert client(server, retries=0, cache_dir=tmp_path).complete([user_message("q")]).text == "ok"


def test_request_key_ignores_dict_order_but_not_content():
    a = request_key("u", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    b = request_key("u", {"messages": [{"content": "x", "role": "user"}], "model": "m"})
    assert a == b != request_key("u", {"model": "m", "messages": [{"role": "user", "content": "y"}]})


def test_complete_many_keeps_order_bounds_concurrency_and_returns_failures():
    def script(body, n):
        text = body["messages"][0]["content"][0]["text"]
        return Reply(status=400, raw=b"bad") if text == "q3" else Reply(text.upper(), delay=0.2)

    with ChatServer(script) as server:
        c = client(server, concurrency=3, retries=0)
        results = c.complete_many([[user_message(f"q{i}")] for i in range(8)])
        peak = server.peak
    assert [r.text if not isinstance(r, ChatError) else "error" for r in results] == [
        "Q0", "Q1", "Q2", "error", "Q4", "Q5", "Q6", "Q7"
    ]  # fmt: skip
    assert 2 <= peak <= 3
