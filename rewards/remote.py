"""A reward served over HTTP from another process: large reward models (VLM judges, SpatialReward, ...).

The GRPO loop of docs/methods/flow_grpo.md scores every rollout group; a reward model too big
to share the trainer's GPU (a VLM judge, SpatialReward's reward model, SpatialReward paper) runs as its
own process, as Flow-GRPO's remote reward servers do. docs/architecture.md: a remote part
has timeouts and fails with a clear error (here `RewardError`, which the loop counts as a skip),
never a hang; and nothing is ever unpickled: the protocol is JSON with PNG images.

Protocol: POST <url> with the JSON body
    {"images": [base64 PNG], "prompts": [str], "references": [[base64 PNG]], "meta": [json object]}
answered by 200 {"name": str, "scores": {score name: [float | null]}} (null = NaN, "not applicable")
or by 4xx / 5xx {"error": str}. GET /health answers {"name": str, "ok": true}. Images travel as 8-bit
PNG: a [-1, 1] image is rounded to uint8 (`rewards.base.to_uint8`) and decoded back exactly as the
data kinds decode (uint8 / 127.5 - 1).

Serve one with `python -m rewards.remote --reward rewards.scene:JpegCompressibility --port 8765`
(the reward's module must be allowlisted, as a config's class_path; `--kwargs '{"quality": 90}'`
passes its arguments). It binds 127.0.0.1 unless told `--host`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import importlib
import io
import json
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omnilab.allowlist import check_import_path
from omnilab.chat import post_json
from rewards.base import (
    Reward,
    RewardError,
    RewardFn,
    check_batch,
    check_scores,
    from_uint8,
    reward_name,
    to_uint8,
)

MAX_BYTES = 256 * 2**20
RETRY_DELAY_S = 0.2


def encode_png(image: Tensor) -> str:
    """A [3, H, W] image in [-1, 1] -> base64 of its 8-bit PNG."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> Tensor:
    """Base64 of a PNG -> [3, H, W] in [-1, 1]; ValueError if it is not a PNG image."""
    try:
        data = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise ValueError(f"an image is {img.format}, not PNG")
            return from_uint8(np.asarray(img.convert("RGB")))
    except (binascii.Error, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"an image is not a base64 PNG: {err}") from err


# --------------------------------------------------------------------------- the client


class RemoteReward(Reward):
    """A reward computed by a `serve` process at `url`; any failure raises RewardError naming the url.

    Args:
        url: The server's scoring URL, e.g. http://127.0.0.1:8765/.
        timeout: Seconds one attempt may take in all (connect, send, answer); then RewardError.
        retries: Further attempts after a refused or dropped connection (a timeout is not retried: a
            slow server would only make the loop wait twice).
        name: The reward's name.
        nan_ok: Whether the served reward may answer NaN ("not applicable").
        send_references: Send the reference images (consistency rewards need them; others do not).
        check_at_start: GRPO fit start asks GET /health and stops with a clear error when nothing answers
            (`check_reward_servers`); False for a server that may come up later.
        serve: What `omnilab serve reward --config <this config> --reward <name>` runs behind this URL:
            {class_path, init_args} of a reward (unused by the client).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 1,
        name: str = "remote",
        nan_ok: bool = False,
        send_references: bool = True,
        check_at_start: bool = True,
        serve: dict[str, Any] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward url {url!r} must be http(s)://host[:port]/path")
        if timeout <= 0 or retries < 0:
            raise ValueError(f"timeout must be > 0 and retries >= 0, got {timeout}, {retries}")
        self.url, self.timeout, self.retries = url, float(timeout), int(retries)
        self.name, self.nan_ok, self.send_references = name, nan_ok, send_references
        self.check_at_start, self.serve = check_at_start, serve

    def check(self) -> dict[str, Any]:
        """GET /health at the server's root (within min(timeout, 10) s per attempt); RewardServerError naming
        the URL and how to start the server when nothing answers."""
        parts = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            conn = kind(parts.hostname, parts.port, timeout=min(self.timeout, 10.0))
            try:
                conn.request("GET", "/health")
                response = conn.getresponse()
                body = json.loads(response.read() or b"{}")
                if response.status == 200 and isinstance(body, dict) and body.get("ok"):
                    return body
                error = RuntimeError(f"GET /health answered {response.status}: {body}")
            except (OSError, http.client.HTTPException, ValueError) as err:
                error = err
            finally:
                conn.close()
            if attempt < self.retries:
                time.sleep(RETRY_DELAY_S)
        raise RewardServerError(
            f"reward {self.name!r}: no reward server answers at {self.url} ({type(error).__name__}: {error}). "
            f"Start it first (`omnilab serve reward --config <this experiment> --reward {self.name}`) or point "
            "`url` at a running one."
        )

    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """POST the batch and return the served scores as float Tensors [N]."""
        n = check_batch(images, prompts, references, meta)
        payload = {
            "images": [encode_png(img) for img in images],
            "prompts": list(prompts),
            "references": [
                [encode_png(r) for r in refs] if self.send_references else [] for refs in references
            ],
            "meta": list(meta),
        }
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward {self.url}: the batch is not plain JSON data: {err}") from err
        for attempt in range(self.retries + 1):
            try:
                status, answer = self._post(body)
                break
            except TimeoutError as err:
                raise RewardError(f"reward {self.url}: no answer within {self.timeout:g} s ({err})") from err
            except ConnectionError as err:
                if attempt == self.retries:
                    raise RewardError(
                        f"reward {self.url}: cannot connect ({type(err).__name__}: {err}) after "
                        f"{self.retries + 1} attempt(s)"
                    ) from err
                time.sleep(RETRY_DELAY_S)
            except (OSError, http.client.HTTPException) as err:
                raise RewardError(f"reward {self.url}: {type(err).__name__}: {err}") from err
        try:
            reply = json.loads(answer)
        except ValueError as err:
            raise RewardError(f"reward {self.url} answered {status} with non-JSON: {answer[:200]!r}") from err
        if status != 200:
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise RewardError(f"reward {self.url} answered {status}: {error}")
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, dict):
            raise RewardError(f"reward {self.url}: the answer has no 'scores' object")
        out = {}
        for key, values in scores.items():
            if not isinstance(values, list) or not all(
                v is None or isinstance(v, int | float) for v in values
            ):
                raise RewardError(f"reward {self.url}: score {key!r} is not a list of numbers")
            out[key] = torch.tensor(
                [float("nan") if v is None else float(v) for v in values], dtype=torch.float32
            )
        return check_scores(out, n, f"{self.name} at {self.url}", self.nan_ok)

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """One POST under one overall deadline: (status, body). Raises TimeoutError past `timeout`."""
        status, _, answer = post_json(self.url, body, {}, self.timeout)
        return status, answer


class RewardServerError(RuntimeError):
    """A reward server that a run needs does not answer at the start: the run stops (not a counted skip)."""


def check_reward_servers(*rewards: Any) -> int:
    """GET /health of every RemoteReward inside `rewards` (built rewards, CombinedRewards, {class_path,
    init_args} specs, nested dicts and lists) whose `check_at_start` is on; RewardServerError naming the first
    that does not answer. Returns how many were checked."""
    seen: set[str] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, RemoteReward):
            if obj.check_at_start and obj.url not in seen:
                seen.add(obj.url)
                obj.check()
        elif isinstance(obj, dict):
            if str(obj.get("class_path", "")).endswith("rewards.remote.RemoteReward"):
                visit(RemoteReward(**dict(obj.get("init_args") or {})))
            else:
                for value in obj.values():
                    visit(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                visit(value)
        elif hasattr(obj, "rewards") and isinstance(obj.rewards, dict):  # CombinedReward
            visit(list(obj.rewards.values()))

    visit(list(rewards))
    return len(seen)


# --------------------------------------------------------------------------- the server


def score_request(reward: RewardFn, payload: Any) -> dict[str, Any]:
    """The JSON answer of one request: decode the images, call the reward, check and encode its scores.

    Raises ValueError for a malformed request and RewardError for a failing reward.
    """
    if not isinstance(payload, dict):
        raise ValueError("the request body must be a JSON object")
    images, prompts = payload.get("images"), payload.get("prompts")
    references, meta = payload.get("references"), payload.get("meta")
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise ValueError("'images' must be a list of base64 PNG strings")
    n = len(images)
    references = [[] for _ in range(n)] if references is None else references
    meta = [{} for _ in range(n)] if meta is None else meta
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != n:
        raise ValueError(f"'prompts' must be a list of {n} strings")
    if (
        not isinstance(references, list)
        or len(references) != n
        or not all(isinstance(r, list) for r in references)
    ):
        raise ValueError(f"'references' must be a list of {n} lists")
    if not isinstance(meta, list) or len(meta) != n or not all(isinstance(m, dict) for m in meta):
        raise ValueError(f"'meta' must be a list of {n} objects")
    decoded = [decode_png(s) for s in images]
    decoded_refs = [[decode_png(s) for s in refs] for refs in references]
    name = reward_name(reward)
    try:
        scores = reward(decoded, prompts, decoded_refs, meta)
    except RewardError:
        raise
    except Exception as err:
        raise RewardError(f"reward {name!r} failed: {type(err).__name__}: {err}") from err
    checked = check_scores(scores, n, name, getattr(reward, "nan_ok", False))
    return {
        "name": name,
        "scores": {k: [None if np.isnan(x) else x for x in v.tolist()] for k, v in checked.items()},
    }


def make_server(
    reward: RewardFn, host: str = "127.0.0.1", port: int = 0, max_bytes: int = MAX_BYTES
) -> HTTPServer:
    """An HTTPServer (one request at a time) scoring with `reward`; port 0 picks a free port."""
    name = reward_name(reward)

    class Handler(BaseHTTPRequestHandler):
        """POST: score a batch; GET /health: alive."""

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, allow_nan=False).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

        def do_GET(self) -> None:
            """Health check."""
            if self.path.rstrip("/") == "/health":
                stats = reward.stats() if callable(getattr(reward, "stats", None)) else {}
                self._answer(200, {"name": name, "ok": True, **stats})
            else:
                self._answer(404, {"error": f"no GET {self.path}; POST a batch to score it"})

        def do_POST(self) -> None:
            """Score one batch."""
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._answer(411, {"error": "a Content-Length is required"})
                return
            if int(length) > max_bytes:
                self._answer(413, {"error": f"the request has {length} bytes, more than {max_bytes}"})
                return
            try:
                self._answer(200, score_request(reward, json.loads(self.rfile.read(int(length)))))
            except ValueError as err:
                self._answer(400, {"error": str(err)})
            except RewardError as err:
                self._answer(500, {"error": str(err)})

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: errors reach the client, not the server's stderr."""

    return HTTPServer((host, port), Handler)


def serve(reward: RewardFn, host: str = "127.0.0.1", port: int = 8765, max_bytes: int = MAX_BYTES) -> None:
    """Serve `reward` until interrupted; prints `serving <name> on http://host:port/` once listening."""
    server = make_server(reward, host, port, max_bytes)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {reward_name(reward)} on http://{bound_host}:{bound_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def load_reward(spec: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """The reward `module:attr` names (a class is instantiated with `kwargs`); the module must be allowlisted."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(
            f"--reward {spec!r} must read module:attribute, e.g. rewards.scene:JpegCompressibility"
        )
    check_import_path(module)
    obj = getattr(importlib.import_module(module), attr)
    reward = obj(**(kwargs or {})) if isinstance(obj, type) else obj
    if not callable(reward):
        raise TypeError(f"{spec} is not a reward (not callable)")
    return reward


def main(argv: list[str] | None = None) -> None:
    """`python -m rewards.remote --reward module:Class [--kwargs JSON] [--host] [--port]`."""
    parser = argparse.ArgumentParser(prog="python -m rewards.remote", description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help="module:attribute of the reward (allowlisted module)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of the reward class's arguments")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port, printed)")
    parser.add_argument("--max-mb", type=float, default=MAX_BYTES / 2**20, help="largest request accepted")
    args = parser.parse_args(argv)
    kwargs = json.loads(args.kwargs)
    if not isinstance(kwargs, dict):
        parser.error("--kwargs must be a JSON object")
    serve(load_reward(args.reward, kwargs), args.host, args.port, int(args.max_mb * 2**20))


if __name__ == "__main__":
    sys.exit(main())
