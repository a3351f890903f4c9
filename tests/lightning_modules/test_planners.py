"""SCoT's planners: rule plans keep GenEval's relations and counts; the chat and local-VLM planners run for real."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.layout import parse_layout
from lightning_modules.components.planners import ChatPlanner, LocalVLMPlanner, RulePlanner, planning_request
from metrics.layout import box_iou, relative_position
from omnilab.chat import ChatClient
from tests.chat_server import ChatServer, Reply


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_rule_plan_of_a_position_prompt_holds_the_relation_under_geneval_rule(relation):
    plan = RulePlanner().plan_one(f"a photo of a red circle {relation} a blue star", {})
    layout = parse_layout(plan, repair=False)
    (a, box_a), (b, box_b) = [(r.phrase, r.box) for r in layout.regions]
    assert (a, b) == ("a red circle", "a blue star")
    assert relation in relative_position(box_a, box_b)
    assert plan.endswith("on a white background")


@pytest.mark.parametrize("word, n", [("two", 2), ("three", 3), ("four", 4)])
def test_rule_plan_of_a_counting_prompt_has_that_many_separate_boxes(word, n):
    layout = parse_layout(RulePlanner().plan_one(f"a photo of {word} green stars", {}), repair=False)
    assert layout.phrases == [f"{word} green stars"] * n
    boxes = layout.boxes
    assert all(box_iou(boxes[i], boxes[j]) == 0 for i in range(n) for j in range(i + 1, n))


def test_rule_plans_of_edits_use_the_source_layout():
    meta = {"source_layout": [{"phrase": "a blue star", "box": [400, 400, 600, 600]}]}
    planner = RulePlanner()
    assert planner.plan_one("remove the blue star", meta) == "remove the blue star [400, 400, 600, 600]"
    assert planner.plan_one("make the blue star red", meta) == "make the blue star [400, 400, 600, 600] red"
    added = parse_layout(planner.plan_one("add a red circle right of the blue star", meta)).regions[0]
    assert added.phrase == "a red circle" and "right of" in relative_position(added.box, (400, 400, 600, 600))
    assert planner.plan_one("remove the green cube", meta) == ""  # not in the scene: no plan
    assert planner.plan_one("paint it like Monet", {}) == ""


def test_chat_planner_sends_the_planning_prompt_and_returns_the_answers():
    answer = "a red circle [100, 350, 400, 650] left of a blue star [600, 350, 900, 650]"
    with ChatServer(lambda body, n: Reply(answer)) as server:
        planner = ChatPlanner(ChatClient(server.base_url, "planner", api_key_env=None, timeout=5))
        plans = planner.plan(["a photo of a red circle left of a blue star", "a photo of two cats"])
        sent = [body["messages"][0]["content"][0]["text"] for body in server.bodies]
    assert plans == [answer, answer]
    assert sorted(sent) == sorted(
        planning_request(p, None)
        for p in ["a photo of a red circle left of a blue star", "a photo of two cats"]
    )
    assert "Request: a photo of two cats" in sent[0] + sent[1]


def test_chat_planner_counts_a_failed_request_and_gives_no_plan():
    with ChatServer(lambda body, n: Reply(status=500, raw=b"{}")) as server:
        client = ChatClient(server.base_url, "planner", api_key_env=None, timeout=5, retries=0)
        planner = ChatPlanner(client)
        assert planner.plan(["a photo of two cats"]) == [""]
    assert planner.failures == 1 and client.stats["failures"] == 1


TINY_VLM = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 16,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    "tokenizer": {"vocab_size": 512},
}  # fmt: skip


def test_local_vlm_planner_generates_from_config_and_from_pretrained_with_the_edit_source(tmp_path):
    torch.manual_seed(0)
    planner = LocalVLMPlanner(family="qwen3_vl", config=TINY_VLM, max_new_tokens=6, batch_size=2)
    source = {"source_image": torch.rand(3, 32, 32) * 2 - 1, "source_layout": [{"phrase": "a blue star", "box": [0, 0, 300, 300]}]}  # fmt: skip
    requests = ["a photo of two cats", "a photo of a cat left of a dog", "remove the blue star"]
    plans = planner.plan(requests, [{}, {}, source])
    assert len(plans) == 3 and all(isinstance(p, str) for p in plans)
    planner.vlm.save_pretrained(tmp_path)
    loaded = LocalVLMPlanner(family="qwen3_vl", pretrained=str(tmp_path), max_new_tokens=6, batch_size=2)
    assert loaded.plan(requests, [{}, {}, source]) == plans
