"""The interleaved text-coordinate format: round trip, every planner spelling, repairs and refusals counted."""

from __future__ import annotations

import pytest

from lightning_modules.components.layout import (
    Layout,
    PlanError,
    PlanStats,
    Region,
    has_boxes,
    parse_layout,
    qwen2_tokens,
    strip_boxes,
    to_grid,
    write_layout,
)

TEXT = "a red circle [120, 40, 380, 300] left of a blue square [600, 420, 900, 760] on a white background"


def test_inline_plan_parses_into_phrases_boxes_and_caption_and_writes_back_identically():
    layout = parse_layout(TEXT)
    assert layout.regions == (
        Region("a red circle", (120, 40, 380, 300)),
        Region("a blue square", (600, 420, 900, 760)),
    )
    assert layout.caption == "a red circle left of a blue square on a white background"
    assert write_layout(layout) == TEXT
    assert parse_layout(write_layout(layout)) == layout


def test_several_boxes_after_one_phrase_are_instances_of_it_and_round_trip():
    text = "three green stars [0, 0, 200, 200] [300, 0, 500, 200] [600, 0, 800, 200] on a black background"
    layout = parse_layout(text)
    assert layout.phrases == ["three green stars"] * 3
    assert write_layout(layout) == text


@pytest.mark.parametrize(
    "text",
    [
        "<|object_ref_start|>a red circle<|object_ref_end|><|box_start|>(120,40),(380,300)<|box_end|> and "
        "<|object_ref_start|>a blue square<|object_ref_end|><|box_start|>(600,420),(900,760)<|box_end|>",
        "<ref>a red circle</ref><box>(120,40),(380,300)</box> and <ref>a blue square</ref><box>(600,420),(900,760)</box>",
        '```json\n[{"bbox_2d": [120, 40, 380, 300], "label": "a red circle"},\n'
        ' {"bbox_2d": [600, 420, 900, 760], "label": "a blue square"}]\n```',
    ],
    ids=["qwen2-vl tokens", "qwen-vl v1 tags", "qwen3-vl json"],
)
def test_qwen_planner_spellings_give_the_same_regions(text):
    assert parse_layout(text).regions == parse_layout(TEXT).regions


def test_qwen2_tokens_writer_is_read_back():
    layout = parse_layout(TEXT)
    assert parse_layout(qwen2_tokens(layout)).regions == layout.regions


def test_qwen25_json_in_pixels_is_rescaled_to_the_grid():
    # 200 x 100 px image: x by 1000/200 = 5, y by 1000/100 = 10
    layout = parse_layout('[{"bbox_2d": [20, 10, 60, 50], "label": "cup"}]', pixels=(200, 100))
    assert layout.regions == (Region("cup", (100, 100, 300, 500)),)


def test_layoutgpt_css_on_its_64_canvas():
    # left 8 top 16 width 16 height 32 on 64 px -> x 125..375, y 250..750
    layout = parse_layout("dog {height: 32px; width: 16px; top: 16px; left: 8px; }")
    assert layout.regions == (Region("dog", (125, 250, 375, 750)),)


def test_bad_boxes_are_repaired_with_each_reason_counted():
    stats = PlanStats()
    text = (
        "a cat [300, 10, 100, 200], a cat [100, 10, 300, 200], a dog [-20, 500, 400, 1100], "
        "a cup [1, 2, x, 4], a hat [500, 500, 500, 900]"
    )
    layout = parse_layout(text, stats=stats)
    # inverted -> swapped (then a duplicate of the second cat, dropped); the dog clipped; cup and hat dropped
    assert layout.regions == (Region("a cat", (100, 10, 300, 200)), Region("a dog", (0, 500, 400, 1000)))
    assert stats.as_dict() == {
        "plans": 1, "refused": 0, "out_of_grid": 1, "inverted": 1, "empty": 1, "duplicate": 1, "unparsable": 1,
    }  # fmt: skip


def test_each_repair_is_warned_naming_its_reason(caplog):
    text = "a cat [300, 10, 100, 200], a cat [100, 10, 300, 200], a dog [-20, 500, 400, 1100], a cup [1, 2, x, 4]"
    with caplog.at_level("WARNING", logger="lightning_modules.components.layout"):
        parse_layout(text, stats=PlanStats())
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [m.split("(")[1].split(")")[0] for m in warned] == [
        "inverted",
        "duplicate",
        "out_of_grid",
        "unparsable",
    ]
    assert "'a dog'" in warned[2] and "-20" in warned[2]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a cat [300, 10, 100, 200]", "inverted"),
        ("a cat [0, 10, 100, 2000]", "leaves the 0-1000 grid"),
        ("a cat [0, 0, 10, 10] and a cat [0, 0, 10, 10]", "appears twice"),
        ("a cat [0, 0, ten, 10]", "not four integers"),
    ],
)
def test_without_repair_a_bad_box_is_refused_naming_the_problem_and_counted(text, problem):
    stats = PlanStats()
    with pytest.raises(PlanError, match=problem):
        parse_layout(text, repair=False, stats=stats)
    assert stats.refused == 1 and stats.plans == 0


@pytest.mark.parametrize("text", ["", "a cat on a mat", "a cat [1, 2, x, 4]", "a cat [5, 5, 5, 9]"])
def test_a_plan_without_a_usable_box_is_refused_even_with_repair(text):
    stats = PlanStats()
    with pytest.raises(PlanError):
        parse_layout(text, stats=stats)
    assert stats.refused == 1


def test_strip_boxes_and_has_boxes():
    assert strip_boxes(TEXT) == "a red circle left of a blue square on a white background"
    assert has_boxes(TEXT) and not has_boxes("a cat [sic] on a mat")


def test_to_grid_rounds_pixel_boxes_onto_the_grid():
    assert to_grid((16, 8, 48, 32), 64, 32) == (250, 250, 750, 1000)


def test_write_layout_of_phrases_missing_from_the_caption_lists_them():
    layout = Layout("", (Region("a cat", (0, 0, 10, 10)), Region("a dog", (20, 20, 30, 30))))
    assert write_layout(layout) == "a cat [0, 0, 10, 10], a dog [20, 20, 30, 30]"
    assert parse_layout(write_layout(layout)).regions == layout.regions
