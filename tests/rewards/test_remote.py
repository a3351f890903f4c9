"""The HTTP reward: a real server process scores like the in-process reward; down or slow servers fail fast."""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from omnilab.allowlist import RefusedImport
from rewards.base import Reward, RewardError
from rewards.remote import RemoteReward, load_reward, make_server
from rewards.scene import JpegCompressibility

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 120


class SlowReward(Reward):
    """Answers after 30 s (the slow-server test; imported by the server process)."""

    name = "slow"

    def __call__(self, images, prompts, references, meta):
        time.sleep(30)
        return {"score": torch.zeros(len(images))}


def start_server(spec):
    """A `python -m rewards.remote` process on a free port: (process, url)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMNILAB_ALLOW_IMPORTS="tests")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewards.remote", "--reward", spec, "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=STARTUP_S):
        proc.kill()
        pytest.fail(f"the reward server did not start within {STARTUP_S} s")
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        pytest.fail(f"the reward server failed: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].strip()


def stop(proc):
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def exact_image(seed, h, w):
    """An image whose values are k / 127.5 - 1 (exactly what a PNG round trip gives back)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 127.5 - 1


@pytest.fixture(scope="module")
def jpeg_server():
    proc, url = start_server("rewards.scene:JpegCompressibility")
    yield url
    stop(proc)


def test_remote_scores_equal_the_in_process_reward(jpeg_server):
    images = [exact_image(0, 16, 24), exact_image(1, 32, 32), torch.zeros(3, 8, 8)]
    prompts = ["a red star", "", "flat"]
    references = [[exact_image(2, 8, 8)], [], []]
    meta = [{"task": "t2i", "objects": []}, {}, {"n_refs": 0}]
    local = JpegCompressibility()(images, prompts, references, meta)
    remote = RemoteReward(jpeg_server, timeout=30, name="jpeg")(images, prompts, references, meta)
    assert remote.keys() == local.keys() == {"score"}
    assert torch.equal(remote["score"], local["score"])


def test_health_and_bad_request_answers(jpeg_server):
    with urllib.request.urlopen(jpeg_server + "health", timeout=10) as resp:
        assert json.load(resp) == {"name": "jpeg", "ok": True}
    request = urllib.request.Request(
        jpeg_server, data=b'{"images": ["not png"], "prompts": [""]}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and "base64 PNG" in json.load(err.value)["error"]


def test_down_server_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    start = time.monotonic()
    with pytest.raises(
        RewardError, match=re.escape(url) + r": cannot connect .*ConnectionRefusedError.* 2 attempt"
    ):
        RemoteReward(url, timeout=5, retries=1)([torch.zeros(3, 4, 4)], [""], [[]], [{}])
    assert time.monotonic() - start < 3


def test_slow_server_fails_within_the_timeout():
    proc, url = start_server("tests.rewards.test_remote:SlowReward")
    try:
        start = time.monotonic()
        with pytest.raises(RewardError, match=re.escape(f"{url}: no answer within 1 s")):
            RemoteReward(url, timeout=1.0, retries=3)([torch.zeros(3, 4, 4)], [""], [[]], [{}])
        assert time.monotonic() - start < 1.0 + 1.5  # the timeout plus a margin; a timeout is not retried
    finally:
        stop(proc)


def test_a_failing_reward_answers_500_with_its_error():
    def broken(images, prompts, references, meta):
        return {"score": torch.tensor([float("nan")] * len(images))}  # NaN from a reward that may not

    server = make_server(broken)
    assert server.server_address[0] == "127.0.0.1"  # localhost unless told otherwise
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with pytest.raises(RewardError, match=r"answered 500: .*'broken'.*NaN"):
            RemoteReward(url, timeout=10)([torch.zeros(3, 4, 4)], [""], [[]], [{}])
    finally:
        server.shutdown()
        server.server_close()


def test_load_reward_refuses_modules_outside_the_allowlist():
    with pytest.raises(RefusedImport):
        load_reward("os:system")
    assert isinstance(load_reward("rewards.scene:JpegCompressibility", {"quality": 90}), JpegCompressibility)


def test_batch_that_is_not_json_data_is_a_reward_error():
    with pytest.raises(RewardError, match="not plain JSON"):
        RemoteReward("http://127.0.0.1:9/")([torch.zeros(3, 4, 4)], [""], [[]], [{"x": object()}])
