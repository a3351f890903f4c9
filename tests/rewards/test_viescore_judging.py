"""VIEScore / Weighted-Ref-VIEScore with a judge: parsing, per-case scoring, failures recorded, the local VLM judge."""

from __future__ import annotations

import math

import pytest
import torch

from omnilab.chat import ChatClient, message_parts
from rewards.judges import LocalVLMJudge
from rewards.viescore import (
    MICO_ELEMENT_PROMPT,
    AnswerError,
    Case,
    EditScorer,
    WeightedRefScorer,
    parse_scores,
    parse_yes_no,
)
from tests.chat_server import ChatServer, Reply

TINY_JUDGE = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "count", "scores"),
    [
        ('{"score": [7, 8], "reasoning": "fine"}', 2, [7, 8]),
        ('||V^=^V||\n{\n"score" : [5, 10],\n"reasoning" : "ok"\n}\n||V^=^V||', 2, [5, 10]),
        ('```json\n{"score": 6.5, "reasoning": ""}\n```', 1, [6.5]),
        ("Naturalness 8, artifacts 7.\nScores: [8, 7]", 2, [8, 7]),  # MICo's parser: the first [a, b]
        ("It has 3 objects [1] and scores [9, 4]", 2, [9, 4]),
    ],
)
def test_parse_scores_reads_json_then_the_first_list_of_the_right_length(text, count, scores):
    assert parse_scores(text, count) == scores


@pytest.mark.parametrize(
    ("text", "count", "kind"),
    [
        ("The edit looks great!", 2, "not_json"),
        ('{"score": [7], "reasoning": ""}', 2, "wrong_count"),
        ('{"score": [11, 5]}', 2, "out_of_range"),
        ('{"score": [-1, 5]}', 2, "out_of_range"),
        ('{"score": ["high", 5]}', 2, "not_json"),
        ('{"score": [true, 5]}', 2, "not_json"),
    ],
)
def test_parse_scores_names_why_an_answer_cannot_be_scored(text, count, kind):
    with pytest.raises(AnswerError) as err:
        parse_scores(text, count)
    assert err.value.kind == kind


def test_parse_yes_no():
    assert parse_yes_no("Yes.") is True and parse_yes_no(" no") is False and parse_yes_no("yes!") is True
    with pytest.raises(AnswerError):
        parse_yes_no("yes and no")
    with pytest.raises(AnswerError):
        parse_yes_no("maybe")


def image(value: float, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.full((3, h, w), value)


def edit_script(body, n):
    """SC answers depend on the instruction; PQ on nothing. Instructions name the failure to simulate."""
    texts, urls = message_parts(body["messages"][0])
    text = texts[0]
    if "Editing instruction: slow" in text:
        return Reply("{}", delay=2.0)
    if "Editing instruction: chatty" in text:
        return Reply("I would say the edit is quite good.")
    if "Editing instruction: wild" in text:
        return Reply('{"score": [12, 3], "reasoning": ""}')
    if "Editing instruction:" in text:
        assert len(urls) == 2  # [source, output]
        return Reply('{"score": [6, 9], "reasoning": "ok"}')
    assert len(urls) == 1  # PQ sees the output alone
    return Reply('{"score": [8, 7], "reasoning": "ok"}')


def test_edit_scorer_scores_and_records_each_failure_per_case():
    cases = [
        Case("good", "make it red", [image(0.0)], image(0.5)),
        Case("slow", "slow", [image(0.0)], image(0.5)),
        Case("chatty", "chatty", [image(0.0)], image(0.5)),
        Case("wild", "wild", [image(0.0)], image(0.5)),
        Case("lost", "make it red", [None], image(0.5)),
    ]
    with ChatServer(edit_script) as server:
        judge = ChatClient(server.base_url, "m", timeout=0.5, retries=0, concurrency=4)
        records = EditScorer(judge).score(cases)
    assert [r["status"] for r in records] == ["ok", "timeout", "not_json", "out_of_range", "missing_image"]
    good = records[0]
    assert (good["sc"], good["pq"]) == (6, 7) and good["o"] == pytest.approx(math.sqrt(42))
    assert all("sc" not in r for r in records[1:])  # no silent zero


def mico_script(body, n):
    texts, urls = message_parts(body["messages"][0])
    if texts[0] == MICO_ELEMENT_PROMPT:
        # yes for the source drawn at value 0.25, no for the others
        from omnilab.chat import decode_image

        return Reply("Yes" if decode_image(urls[0]).getpixel((0, 0))[0] == 159 else "No")
    if texts[0].startswith("You are a professional"):
        assert "Text Prompt:\nput them together" in texts[0]
        return Reply("score = [9, 6]")
    return Reply("The scores are [8, 7].")


def test_weighted_ref_scorer_combines_faces_and_yes_no_into_w():
    # sources: 0 human (cosine 0.35 -> 0.7), 1 found (yes), 2 not found (no): W = (0.7 + 1 + 0) / 3
    case = Case(
        "c0", "put them together", [image(0.9), image(0.25), image(-0.5)], image(0.1), image(0.2), human=[0]
    )
    with ChatServer(mico_script) as server:
        judge = ChatClient(server.base_url, "m", retries=0)
        record = WeightedRefScorer(judge, faces=lambda srcs, out: [0.35] * len(srcs)).score([case])[0]
        assert server.count == 4  # SC, PQ and two yes/no checks (the human source goes to ArcFace)
    w = (0.7 + 1 + 0) / 3
    assert record["status"] == "ok" and record["weight"] == pytest.approx(w)
    assert record["elements"] == {"0": 0.7, "1": 1.0, "2": 0.0}
    assert record["final"] == pytest.approx(w * math.sqrt(54) * math.sqrt(56), rel=1e-9)
    assert record["version"] == "v3"


def test_weighted_ref_scorer_without_a_face_model_records_a_face_error():
    case = Case("c0", "put them together", [image(0.9), image(0.25)], image(0.1), image(0.2), human=[0])
    with ChatServer(mico_script) as server:
        judge = ChatClient(server.base_url, "m", retries=0)
        record = WeightedRefScorer(judge, faces=None).score([case])[0]
        v1 = WeightedRefScorer(judge, faces=lambda s, o: [0.47], version="v1").score([case])[0]
    assert record["status"] == "face_error" and "final" not in record
    # v1: binary face at 0.45 (0.47 passes), final = W sqrt(SC PQ) = 1 * (54 * 56) ** 0.25
    assert v1["weight"] == 1.0 and v1["final"] == pytest.approx((54 * 56) ** 0.25)


def test_local_vlm_judge_answers_through_the_same_interface_and_caches(tmp_path):
    judge = LocalVLMJudge(config=TINY_JUDGE, tokenizer={"vocab_size": 512}, max_new_tokens=6, device="cpu",
                          cache_dir=tmp_path / "cache")  # fmt: skip
    records = EditScorer(judge, max_side=64).score(
        [Case("a", "make it red", [image(0.0, 28, 56)], image(0.5))]
    )
    # a random-init judge answers noise: recorded as an unreadable answer, not a crash
    assert records[0]["status"] in ("not_json", "wrong_count", "out_of_range")
    assert judge.stats["calls"] == 2
    again = LocalVLMJudge(config=TINY_JUDGE, tokenizer={"vocab_size": 512}, max_new_tokens=6, device="cpu",
                          cache_dir=tmp_path / "cache")  # fmt: skip
    EditScorer(again, max_side=64).score([Case("a", "make it red", [image(0.0, 28, 56)], image(0.5))])
    assert again.stats["calls"] == 0 and again.stats["cache_hits"] == 2 and again.model is None


def test_local_vlm_judge_teacher_forcing_labels_only_the_answer():
    judge = LocalVLMJudge(config=TINY_JUDGE, tokenizer={"vocab_size": 512}, device="cpu")
    from omnilab.chat import user_message

    inputs = judge.encode([user_message("rate", [image(0.0, 28, 28)])], answer='{"score": [7, 8]}')
    labelled = (inputs["labels"] != -100).sum().item()
    answer = judge.tokenizer('{"score": [7, 8]}' + judge.tokenizer.eos_token).input_ids
    assert labelled == len(answer) and inputs["labels"].shape == inputs["input_ids"].shape
    assert judge.model(**inputs).loss.isfinite()
