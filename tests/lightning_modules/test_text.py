"""Offline tokenizers and the three text/VLM encoders (checked against the diffusers pipelines' own encode)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
from transformers import AutoTokenizer

from lightning_modules.components.packed_dit import TextConditioning
from lightning_modules.components.text import build_text_encoder
from lightning_modules.components.tokenizers import (
    IMAGE_PAD,
    PICTURE_TEMPLATE,
    QWEN_EDIT_TEMPLATE,
    build_tokenizer,
    learn_bpe,
    synthetic_corpus,
)

CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
    "max_position_embeddings": 77,
}
T5 = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2}
QWEN_VL = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
}
SHORT_CLIP = {"clip": {"model_max_length": 16}, "t5": {}}  # CLIP padded to 16 tokens instead of 77
PROMPTS = ["Put the red circle from image 2 left of the blue square in image 1.", ""]


@pytest.fixture(autouse=True, scope="module")
def tokenizer_cache(tmp_path_factory):
    """Built tokenizers go to a per-session folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNILAB_CACHE", str(tmp_path_factory.mktemp("omnilab-cache")))
        yield


# --- tokenizers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "t5", "qwen"])
def test_built_tokenizer_saves_and_reloads_like_a_hub_tokenizer(kind, tmp_path):
    tok = build_tokenizer(kind, 400, out_dir=tmp_path / kind)
    assert (tmp_path / kind / "tokenizer.json").is_file()
    assert (tmp_path / kind / "tokenizer_config.json").is_file()
    again = AutoTokenizer.from_pretrained(tmp_path / kind)
    assert len(again) == len(tok) <= 400
    assert again(PROMPTS[0]).input_ids == tok(PROMPTS[0]).input_ids
    assert again.decode(again(PROMPTS[0]).input_ids, skip_special_tokens=True).lower() == PROMPTS[
        0
    ].lower().replace(".", " ." if kind == "clip" else ".")


def test_clip_tokenizer_wraps_with_start_and_end_and_pads_with_end():
    tok = build_tokenizer("clip", 512)
    ids = tok("a red circle", padding="max_length", max_length=8).input_ids
    start, end = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    assert ids[0] == start == tok.bos_token_id and ids[4] == end == tok.eos_token_id
    assert ids[5:] == [end] * 3 and tok.pad_token_id == end and tok.model_max_length == 77
    assert end != 2  # CLIPTextModel would fall back to argmax pooling for eos id 2


def test_t5_tokenizer_has_t5_special_ids_and_appends_eos():
    tok = build_tokenizer("t5", 512)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = tok("a red circle").input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1]


def test_qwen_tokenizer_specials_are_single_tokens_and_chat_template_renders_pictures():
    tok = build_tokenizer("qwen", 512)
    for special in [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|endoftext|>",
    ]:
        assert len(tok(special).input_ids) == 1, special
        assert tok.convert_ids_to_tokens(tok(special).input_ids) == [special]
    ids = tok(PICTURE_TEMPLATE.format(2)).input_ids
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "make it red"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert (
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>make it red<|im_end|>"
        in text
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_unknown_tokenizer_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="choose clip, t5, qwen"):
        build_tokenizer("gpt2", out_dir=tmp_path)


@pytest.mark.parametrize("kind", ["clip", "t5", "qwen"])
def test_tokenizer_build_is_deterministic(kind, tmp_path):
    # the tokenizers library's CLIP-style BPE and Unigram trainers are not (hash-map order): ids would
    # change from one build to the next, and with them every tiny model's text embedding
    a = build_tokenizer(kind, 300, out_dir=tmp_path / "a")
    b = build_tokenizer(kind, 300, out_dir=tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert a(PROMPTS).input_ids == b(PROMPTS).input_ids
    assert synthetic_corpus(50) == synthetic_corpus(50)


def test_learn_bpe_merges_the_most_frequent_pair_first_ties_in_order():
    # "ab" x3, "abc" x2, "bc" x1: pairs ab 5, bc 3 -> merge (a, b); then ab+c 2 vs b+c 1 -> (ab, c)
    merges = learn_bpe({("a", "b"): 3, ("a", "b", "c"): 2, ("b", "c"): 1}, 2)
    assert merges == [("a", "b"), ("ab", "c")]
    # a tie (x y 1, y z 1) goes to the smaller pair: (x, y)
    assert learn_bpe({("x", "y", "z"): 1}, 1) == [("x", "y")]


def test_tokenizer_cache_is_reused_and_rebuilt_when_stale(tmp_path):
    out = tmp_path / "clip"
    build_tokenizer("clip", 300, out_dir=out)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    build_tokenizer("clip", 300, out_dir=out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp  # not rebuilt
    marker = out / "omnilab_tokenizer.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "corpus_version": -1}))
    build_tokenizer("clip", 300, out_dir=out)
    assert json.loads(marker.read_text())["corpus_version"] != -1  # a stale build is replaced


# --- encoders: the diffusers pipelines' own encode_prompt is the reference ------------------------------


def test_sd3_conditioning_equals_stable_diffusion_3_pipeline_encode_prompt():
    clip_g = {**CLIP, "hidden_size": 48, "projection_dim": 24}
    enc = build_text_encoder(
        "sd3",
        config={"clip": [CLIP, clip_g], "t5": {**T5, "d_model": 128}},
        tokenizer=SHORT_CLIP,
        max_sequence_length=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=enc.clips[0], tokenizer=enc.clip_tokenizers[0],
        text_encoder_2=enc.clips[1], tokenizer_2=enc.clip_tokenizers[1],
        text_encoder_3=enc.t5, tokenizer_3=enc.t5_tokenizer,
    )  # fmt: skip
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
        cond = enc(PROMPTS)
    assert isinstance(cond, TextConditioning)
    # [CLIP-L 32 ‖ CLIP-G 48 → padded to 128] over 16 tokens, then 16 T5 tokens; pooled 32 + 24
    assert cond.hidden.shape == (2, 32, 128) and cond.pooled.shape == (2, 56)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    assert cond.hidden[:, :16, 80:].abs().sum() == 0 and cond.mask.all()


def test_encoders_are_built_in_eval_mode():
    enc = build_text_encoder(
        "flux", config={"clip": CLIP, "t5": T5}, tokenizer=SHORT_CLIP, max_sequence_length=8
    )
    assert not any(m.training for m in enc.modules())  # T5's dropout would make the conditioning random
    with torch.no_grad():
        assert torch.equal(enc(PROMPTS).hidden, enc(PROMPTS).hidden)


def test_sd3_tiny_variant_one_clip_one_t5_shapes():
    enc = build_text_encoder(
        "sd3", config={"clip": [CLIP], "t5": T5}, tokenizer=SHORT_CLIP, max_sequence_length=8
    )
    cond = enc(PROMPTS)
    assert (
        cond.hidden.shape == (2, 16 + 8, 32) and cond.pooled.shape == (2, 32) and cond.mask.shape == (2, 24)
    )


def test_flux_conditioning_equals_flux_pipeline_encode_prompt():
    enc = build_text_encoder(
        "flux", config={"clip": CLIP, "t5": T5}, tokenizer=SHORT_CLIP, max_sequence_length=16
    )
    pipe = FluxPipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=enc.clip, tokenizer=enc.clip_tokenizer,
        text_encoder_2=enc.t5, tokenizer_2=enc.t5_tokenizer,
    )  # fmt: skip
    with torch.no_grad():
        hidden, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
        cond = enc(PROMPTS)
    assert cond.hidden.shape == (2, 16, 32) and cond.pooled.shape == (2, 32) and cond.mask.all()
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)


def test_qwen_text_only_equals_qwen_image_edit_plus_prompt_embeds():
    enc = build_text_encoder("qwen", config=QWEN_VL, vision=False)
    # the drop is the template's prefix (the system prompt); the real template + tokenizer give 64
    prefix = QWEN_EDIT_TEMPLATE.split("{}")[0]
    assert enc.drop_tokens == len(enc.tokenizer(prefix).input_ids) > 0
    pipe = QwenImageEditPlusPipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=enc.model, tokenizer=enc.tokenizer,
        processor=enc.tokenizer,  # text only: the pipeline's processor call reduces to the tokenizer
    )  # fmt: skip
    pipe.prompt_template_encode_start_idx = enc.drop_tokens
    with torch.no_grad():
        hidden, mask = pipe._get_qwen_prompt_embeds(PROMPTS, image=None, device=torch.device("cpu"))
        cond = enc(PROMPTS)
    assert cond.pooled is None and cond.hidden.shape == hidden.shape
    assert torch.allclose(cond.hidden, hidden, atol=1e-6) and torch.equal(cond.mask, mask.bool())
    lengths = [len(enc.tokenizer(QWEN_EDIT_TEMPLATE.format(p)).input_ids) - enc.drop_tokens for p in PROMPTS]
    assert cond.mask.sum(1).tolist() == lengths


def test_qwen_template_has_one_picture_per_reference_and_the_vlm_sees_them():
    enc = build_text_encoder("qwen", config=QWEN_VL)
    text = enc.prompt_text("swap them", 2)
    assert text == QWEN_EDIT_TEMPLATE.format(
        PICTURE_TEMPLATE.format(1) + PICTURE_TEMPLATE.format(2) + "swap them"
    )
    g = torch.Generator().manual_seed(0)
    refs = [[torch.rand(3, 32, 48, generator=g) * 2 - 1, torch.rand(3, 64, 32, generator=g) * 2 - 1], []]
    with torch.no_grad():
        cond = enc(PROMPTS, refs)
        text_only = build_text_encoder("qwen", config=QWEN_VL, vision=False)
        text_only.load_state_dict(enc.state_dict())
        without_pixels = text_only(PROMPTS, refs)
        other = enc(PROMPTS, [[refs[0][0].flip(-1), refs[0][1]], []])
    # sample 0: each <|image_pad|> expands to its merged patches, so the sequence is longer than text only
    assert cond.mask[0].sum() > without_pixels.mask[0].sum()
    assert cond.mask[1].sum() == without_pixels.mask[1].sum()  # no references: the same tokens
    n = int(cond.mask[0].sum())
    assert not torch.allclose(cond.hidden[0, :n], other.hidden[0, :n])  # the pixels reach the hidden states
    assert torch.allclose(cond.hidden[1], other.hidden[1], atol=1e-6)


def test_text_encoder_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        build_text_encoder("flux")
    with pytest.raises(ValueError, match="choose sd3, flux or qwen"):
        build_text_encoder("t5", config={})


def test_qwen_keeps_the_instruction_behind_six_references_at_a_2048_budget():
    """6 references under one 2048² budget give ~4000 picture tokens before the instruction; none is cut."""
    from datamodules.budget import fit_to_budget

    enc = build_text_encoder("qwen", config=QWEN_VL)
    g = torch.Generator().manual_seed(0)
    sizes = fit_to_budget([(1200, 900), (800, 800), (1024, 768), (600, 900), (1000, 1000), (700, 1100)], 2048)
    refs = [torch.rand(3, h, w, generator=g) * 2 - 1 for w, h in sizes]
    instructions = [
        "Put the cat from image 1 on the chair of image 6.",
        "Put the dog from image 2 in image 3.",
    ]
    with torch.no_grad():
        cond = enc(instructions, [refs, refs])
    lengths = cond.mask.sum(1).tolist()
    assert min(lengths) > enc.max_sequence_length + 2000  # the pictures alone are past the 1024 limit
    # the instruction's own tokens are all there: the two lengths differ by the instructions' token counts
    text = [len(enc.tokenizer(p).input_ids) for p in instructions]
    assert lengths[0] - lengths[1] == text[0] - text[1]
    n = min(lengths)
    assert not torch.allclose(
        cond.hidden[0, n - 8 : n], cond.hidden[1, n - 8 : n]
    )  # the conditionings differ


def test_qwen_limit_bounds_the_text_tokens_only():
    enc = build_text_encoder("qwen", config=QWEN_VL, vision=False, max_sequence_length=12)
    pad = enc.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    ids = torch.tensor([100, pad, pad, 101, 102, pad] + [103] * 20)
    kept = enc._kept(ids, pad)
    assert kept[:6].all() and int(kept.sum()) == 3 + 12  # every picture token and the first 12 others
    assert not kept[-1]
