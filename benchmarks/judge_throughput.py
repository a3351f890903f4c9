"""Judge calls per second: N concurrent requests vs sequential against a local chat-completions server; a
rerun with the answer cache makes zero calls.

The server (tests/chat_server.py, a real HTTP server on 127.0.0.1) answers each request after a fixed
latency (a hosted judge's time to answer) and works on at most `capacity` requests at once (its limit);
requests beyond that queue. Every request carries a VIEScore PQ prompt and a 256x256 PNG, as a benchmark
sends them. The ideal is min(N, capacity) x the sequential rate; the table gives the measured ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import record
from omnilab.chat import ChatClient, user_message
from rewards.viescore import PQ_PROMPT
from tests.chat_server import ChatServer, Reply


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnilab bench judge_throughput")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1, help="server seconds per answer")
    parser.add_argument("--capacity", type=int, default=16, help="requests the server works on at once")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    requests = [
        [user_message(PQ_PROMPT, [torch.rand(3, 256, 256, generator=gen) * 2 - 1])]
        for _ in range(args.requests)
    ]
    rows, rates = [], {}
    script = lambda body, n: Reply('{"score": [8, 7], "reasoning": "ok"}', delay=args.latency)  # noqa: E731
    with ChatServer(script, max_parallel=args.capacity) as server:
        for n in args.concurrency:
            client = ChatClient(server.base_url, "judge", concurrency=n, retries=0, timeout=60)
            start = time.perf_counter()
            results = client.complete_many(requests)
            elapsed = time.perf_counter() - start
            assert all(r.text for r in results), "a request failed"
            rates[n] = args.requests / elapsed
            rows.append({"concurrent requests": n, "calls": client.stats["calls"], "calls/s": rates[n],
                         "vs sequential": rates[n] / rates[args.concurrency[0]],
                         "ideal": min(n, args.capacity) / args.concurrency[0]})  # fmt: skip
        with tempfile.TemporaryDirectory() as cache:
            first = ChatClient(server.base_url, "judge", concurrency=16, cache_dir=cache)
            first.complete_many(requests)
            rerun = ChatClient(server.base_url, "judge", concurrency=16, cache_dir=cache)
            start = time.perf_counter()
            rerun.complete_many(requests)
            cached_s = time.perf_counter() - start
            rows.append({"concurrent requests": "16, rerun with the cache", "calls": rerun.stats["calls"],
                         "calls/s": float("nan"), "vs sequential": float("nan"), "ideal": float("nan")})  # fmt: skip
    notes = (
        f"{args.requests} requests (VIEScore PQ prompt + a 256x256 PNG each) to tests/chat_server.py on 127.0.0.1, "
        f"{args.latency * 1000:.0f} ms per answer, at most {args.capacity} at once. `calls/s` = requests / wall "
        f"time; `ideal` = min(N, capacity). The cached rerun answered all {args.requests} requests from disk "
        f"with {rerun.stats['calls']} calls in {cached_s * 1000:.0f} ms (cache hits: {rerun.stats['cache_hits']})."
    )
    metrics = {f"calls_per_s_{n}": r for n, r in rates.items()} | {"cached_rerun_calls": rerun.stats["calls"]}
    record("judge_throughput", "Judge throughput: concurrent vs sequential chat-completions requests", rows, notes,
           metrics)  # fmt: skip
