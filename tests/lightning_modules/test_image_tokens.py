"""The Lumina-mGPT image token layout: the Chameleon vocabulary, encode, and reading a broken generation back."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.image_tokens import ImageTokenLayout, LayoutError
from lightning_modules.components.tokenizers import (
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    ROW_END,
    TURN_END,
    build_tokenizer,
    grid_token,
    image_code_of,
    image_code_token,
)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    tok = build_tokenizer("chameleon", 400, out_dir=tmp_path_factory.mktemp("tok"), image_codes=32)
    return tok, ImageTokenLayout.from_tokenizer(tok, 32, codes_per_cell=4)


def test_chameleon_names_image_codes_with_letters_and_places_them_from_id_4():
    assert image_code_token(0) == "IMGIMGAZ" and image_code_token(8191) == "IMGIMGIBJBZ"
    assert (
        image_code_of("IMGIMGIBJBZ") == 8191
        and image_code_of("IMGIMGZ") is None
        and image_code_of("cat") is None
    )
    assert grid_token(16) == "<reserved08816>"


def test_chameleon_tokenizer_has_the_structure_tokens_and_codes_at_4_plus_c(layout):
    tok, lay = layout
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert lay.code_ids.tolist() == list(range(4, 36))  # code c is id 4 + c, as in Chameleon's vocabulary
    for special in (IMAGE_START, IMAGE_END, ROW_END, TURN_END, IMAGE_PLACEHOLDER, grid_token(3)):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special]
    text = tok.encode("Medium blur, small noise.", add_special_tokens=False)
    assert not set(text) & set(lay.code_ids.tolist())  # text never produces image codes


def test_a_tokenizer_without_enough_code_tokens_is_refused_by_name(layout):
    tok, _ = layout
    with pytest.raises(ValueError, match="no image-code token for 32 of the 64 codes"):
        ImageTokenLayout.from_tokenizer(tok, 64)


def test_encode_lays_out_start_grid_rows_with_row_ends_and_end(layout):
    _, lay = layout
    codes = torch.arange(32).view(4, 8)  # 1 x 2 cells of 4 x 4 codes
    ids = lay.encode(codes).tolist()
    assert len(ids) == lay.length(4, 8) == 3 + 4 * 9 + 1
    assert ids[:3] == [lay.image_start, int(lay.grid_ids[1]), int(lay.grid_ids[2])]
    assert ids[3:12] == [*range(4, 12), lay.row_end] and ids[-1] == lay.image_end
    assert lay.length(64, 64) == 4164  # PURE's 512 px image


def test_read_returns_a_well_formed_image_untouched(layout):
    _, lay = layout
    codes = torch.randint(32, (4, 8))
    read = lay.read([7, 8, *lay.encode(codes).tolist(), lay.turn_end])
    assert torch.equal(read.codes, codes) and read.grid == (1, 2) and read.problems == []


def test_read_repairs_rows_and_reports_every_repair(layout):
    _, lay = layout
    codes = torch.randint(32, (4, 8))
    ids = lay.encode(codes).tolist()
    body = ids[3:-1]
    # row 0 loses its last code, row 1 gets an extra code and a stray text token
    broken = ids[:3] + body[:7] + [lay.row_end] + body[9:17] + [200, 4 + 3] + body[17:] + [lay.image_end]
    read = lay.read(broken, fallback=codes)
    assert (
        read.codes[0, :7].tolist() == codes[0, :7].tolist() and read.codes[0, 7] == codes[0, 7]
    )  # from fallback
    assert torch.equal(read.codes[1:], codes[1:])
    assert any("1 non-code token" in p for p in read.problems)
    assert any("shorter" in p for p in read.problems) and any("longer" in p for p in read.problems)


def test_read_fills_a_truncated_image_from_the_fallback(layout):
    _, lay = layout
    codes, fallback = torch.randint(32, (4, 8)), torch.randint(32, (4, 8))
    ids = lay.encode(codes).tolist()[: 3 + 9 + 3]  # one full row, then 3 codes, then the generation stopped
    read = lay.read(ids, fallback=fallback)
    assert torch.equal(read.codes[0], codes[0])
    assert read.codes[1, :3].tolist() == codes[1, :3].tolist() and torch.equal(
        read.codes[1, 3:], fallback[1, 3:]
    )
    assert torch.equal(read.codes[2:], fallback[2:])
    assert any("no image end" in p for p in read.problems) and any(
        "2 missing row" in p for p in read.problems
    )


def test_read_uses_the_expected_grid_when_the_grid_tokens_are_broken(layout):
    _, lay = layout
    codes = torch.randint(32, (4, 8))
    ids = lay.encode(codes).tolist()
    ids[1] = 200  # a text token where the height should be
    read = lay.read(ids, grid=(1, 2))
    assert read.grid == (1, 2) and any("invalid grid-size tokens" in p for p in read.problems)


def test_no_image_is_a_layout_error_unless_a_fallback_is_given(layout):
    _, lay = layout
    with pytest.raises(LayoutError, match="no image"):
        lay.read([200, 201])
    fallback = torch.randint(32, (4, 4))
    read = lay.read([200, 201], fallback=fallback)
    assert torch.equal(read.codes, fallback) and read.problems


def test_images_smaller_than_a_grid_cell_are_refused(layout):
    _, lay = layout
    with pytest.raises(ValueError, match="at least 32 px"):
        lay.encode(torch.zeros(2, 2, dtype=torch.long))
