"""PURE: the instruction exchange and its answer-only loss, the colour fix, the unmasked Chameleon, restoring."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from lightning_modules.components import ar_sampling
from lightning_modules.components.tokenizers import build_tokenizer, image_code_token
from lightning_modules.components.vq import LlamaGenVQModel
from lightning_modules.pure import (
    PURE,
    LuminaChameleon,
    Sampling,
    answer_loss,
    answer_text,
    wavelet_blur,
    wavelet_color_fix,
)

LM = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
)
VQ = dict(codebook_size=32, codebook_embed_dim=8, ch=8, z_channels=16, num_res_blocks=1, norm_groups=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNILAB_CACHE", str(tmp_path_factory.mktemp("omnilab-cache")))
        yield


@pytest.fixture(scope="module")
def model(cache):
    torch.manual_seed(0)
    module = PURE(backbone={"config": LM}, vq={"config": VQ}, image_size=32, max_seq_len=256, val_restore=0)
    module.configure_model()
    return module


def batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(n)
    return {
        "hq": torch.rand(n, 3, 32, 32, generator=g),
        "lq": torch.rand(n, 3, 32, 32, generator=g),
        "label": ["Medium blur, small noise", "Large blur, large noise"][:n],
        "description": ["The image features a cat.", ""][:n],
        "__key__": [f"k{i}" for i in range(n)],
    }


# --- the exchange -----------------------------------------------------------------------------------------


def test_answer_text_has_the_perceive_understand_restore_parts():
    assert answer_text("Medium blur, small noise", "The image features a lion.") == (
        "Medium blur, small noise. The image features a lion. <|image|>"
    )
    assert answer_text("Small blur, small noise", "") == "Small blur, small noise. <|image|>"
    assert answer_text("Small blur, small noise", "A cat.", ()) == "<|image|>"  # restore only
    assert answer_text("Small blur, small noise", "A cat.", ("understand",)) == "A cat. <|image|>"


def test_answer_loss_counts_only_answer_positions_worked_by_hand():
    # vocabulary of 2; position 0 predicts labels[1] = 1 with logits (0, ln 3): p = 3/4 -> CE = -ln 0.75;
    # labels[2] = -100 is not counted (position 1's logits do not matter)
    logits = torch.tensor([[[0.0, math.log(3)], [9.0, -9.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100]])
    out = answer_loss(logits, labels, z_loss_weight=0.5)
    assert out["ce"].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert out["z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-5)  # logsumexp = ln 4
    assert out["loss"].item() == pytest.approx(-math.log(0.75) + 0.5 * math.log(4) ** 2, abs=1e-5)
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_loss(logits, torch.full((1, 3), -100))


def test_sequences_put_the_lq_image_in_the_prompt_and_label_only_the_answer(model):
    b = batch()
    ids, mask, labels = model.sequences(b)
    lay, tok = model.layout, model.tokenizer
    for i in range(2):
        row, lab = ids[i][mask[i].bool()].tolist(), labels[i][mask[i].bool()].tolist()
        starts = [j for j, t in enumerate(row) if t == lay.image_start]
        assert len(starts) == 2 and row[0] == tok.bos_token_id
        first_answer = next(j for j, t in enumerate(lab) if t != -100)
        assert starts[0] < first_answer <= starts[1]  # the LQ image is prompt, the HQ image is answer
        assert row[first_answer - 1] == lay.turn_end  # the user turn ends with <reserved08706>
        assert lab[first_answer:] == row[first_answer:] and row[-1] == lay.turn_end
        answer = tok.decode(row[first_answer : starts[1]])
        assert answer.strip() == answer_text(b["label"][i], b["description"][i]).replace(" <|image|>", "")
        lq_codes = model.vq.encode(b["lq"][i : i + 1] * 2 - 1)[0]
        assert row[starts[0] : starts[0] + lay.length(4, 4)] == lay.encode(lq_codes).tolist()
    assert mask[1].sum() < mask[0].sum() and (labels[1][~mask[1].bool()] == -100).all()  # padding


def test_a_few_steps_fit_a_fixed_batch(model):
    b = batch()
    opt = torch.optim.AdamW(model.lm.parameters(), lr=3e-3)
    first = model._loss(b)["loss"].item()
    for _ in range(8):
        out = model._loss(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert model._loss(b)["loss"].item() < first - 0.5
    assert "image_ce" in out


# --- the colour fix -----------------------------------------------------------------------------------------


def test_wavelet_blur_of_an_impulse_is_the_binomial_kernel_at_the_dilation():
    img = torch.zeros(1, 1, 7, 7)
    img[0, 0, 3, 3] = 16.0
    out = wavelet_blur(img, radius=2)[0, 0]
    assert out[3, 3] == 4.0 and out[3, 1] == 2.0 and out[1, 1] == 1.0 and out[3, 2] == 0.0


def test_wavelet_color_fix_takes_colour_from_the_source_and_detail_from_the_target():
    flat_target, flat_source = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(wavelet_color_fix(flat_target, flat_source), flat_source)
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(wavelet_color_fix(x, x), x, atol=1e-6)
    detail = torch.rand(1, 3, 16, 16)
    fixed = wavelet_color_fix(detail + 0.3, flat_source)  # a colour shift of the target is removed
    assert torch.allclose(fixed, wavelet_color_fix(detail, flat_source), atol=1e-5)


# --- the backbone -------------------------------------------------------------------------------------------


def test_lumina_chameleon_leaves_image_logits_unmasked_and_has_no_vqgan():
    vocab = {"<image>": 3, image_code_token(0): 4, image_code_token(1): 5}
    config = ChameleonConfig(vocab_size=16, vocabulary_map=vocab, **LM)
    stock, ours = ChameleonForConditionalGeneration(config), LuminaChameleon(config)
    ours.load_state_dict(stock.state_dict(), strict=False)
    ids = torch.tensor([[1, 2, 6]])
    masked, unmasked = stock(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (masked[..., 4:6] == torch.finfo(masked.dtype).min).all()  # transformers forbids image tokens
    assert torch.isfinite(unmasked[..., 4:6]).all() and unmasked[..., 4:6].abs().max() < 100
    assert torch.allclose(masked[..., 6:], unmasked[..., 6:])
    assert not hasattr(ours.model, "vqmodel")


def test_paper_path_loads_bf16_hub_weights_and_the_tokenizer_beside_them(tmp_path, cache):
    tok = build_tokenizer("chameleon", 300, out_dir=tmp_path / "lm", image_codes=32)
    lm = LuminaChameleon(ChameleonConfig(vocab_size=len(tok), **LM)).to(torch.bfloat16)
    lm.save_pretrained(tmp_path / "lm")
    LlamaGenVQModel(**VQ).save_pretrained(tmp_path / "vq")
    module = PURE(
        backbone={"pretrained": str(tmp_path / "lm")}, vq={"pretrained": str(tmp_path / "vq")}, image_size=32
    )
    module.configure_model()
    assert module.lm.dtype == torch.float32  # trained in fp32 (mixed precision autocasts)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(module.lm.state_dict()[name], lm.state_dict()[name].float())
    assert len(module.tokenizer) == len(tok) and module.layout.codebook_size == 32
    for f in (tmp_path / "lm").glob("tokenizer*.json"):  # weights alone (a stand-in without its tokenizer)
        f.unlink()
    bare = PURE(
        backbone={"pretrained": str(tmp_path / "lm")}, vq={"pretrained": str(tmp_path / "vq")}, image_size=32
    )
    with (
        pytest.warns(UserWarning, match="holds no tokenizer"),
        pytest.raises(ValueError, match="LM's vocabulary"),
    ):
        bare.configure_model()  # the offline tokenizer's ids do not fit these weights: said, not crashed on


# --- restoring ----------------------------------------------------------------------------------------------


def test_restore_keeps_the_layout_and_is_seeded_per_image(model):
    lq = batch(1)["lq"]
    a = model.restore(lq, ["x"])[0]
    b = model.restore(lq, ["x"])[0]
    c = model.restore(lq, ["y"])[0]
    assert a.image.shape == (3, 32, 32) and a.image.min() >= 0 and a.image.max() <= 1
    assert a.problems == [] and a.codes.shape == (4, 4)  # a random model still yields a well-formed image
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    greedy = model.restore(lq, ["x"], Sampling(greedy=True, cfg=1.0, use_cache=False))[0]
    assert greedy.problems == [] and greedy.tokens > model.layout.length(4, 4)


def test_entropy_is_measured_before_the_temperature(model, monkeypatch):
    seen: list[list[int]] = []
    original = ar_sampling.EntropyTopKLogitsProcessor.__call__

    def record(self, input_ids, scores):
        out = original(self, input_ids, scores)
        inside = ar_sampling.ImageState(input_ids, self.layout).inside
        if bool(inside[0]) and ar_sampling.ImageState(input_ids, self.layout).since_start[0] == 2:
            seen[-1].append(int(self.last_k[0]))  # the first code of the output image
        return out

    monkeypatch.setattr(ar_sampling.EntropyTopKLogitsProcessor, "__call__", record)
    lq = batch(1)["lq"]
    for temperature in (0.3, 3.0):
        seen.append([])
        model.restore(lq, ["t"], Sampling(temperature=temperature, k_max=16))
    assert seen[0] and seen[0] == seen[1]  # the same k whatever the temperature


def test_a_broken_generation_is_repaired_with_a_warning(model, monkeypatch):
    def broken(input_ids, **kwargs):  # an image cut after 5 codes, no end token
        lay = model.layout
        junk = [lay.image_start, int(lay.grid_ids[1]), int(lay.grid_ids[1]), *lay.code_ids[:5].tolist()]
        return torch.cat([input_ids, torch.tensor([junk])], dim=1)

    monkeypatch.setattr(model.lm, "generate", broken)
    before = model.repairs
    with pytest.warns(UserWarning, match="broke the token layout"):
        out = model.restore(batch(1)["lq"], ["z"])[0]
    assert model.repairs == before + 1 and out.image.shape == (3, 32, 32)
    assert out.codes[0].tolist() == [0, 1, 2, 3] and any("missing row" in p for p in out.problems)


def test_restore_image_reads_16_bit_grey_and_refuses_what_it_cannot_use(model):
    import numpy as np

    grey16 = (np.arange(16 * 12, dtype=np.uint16).reshape(16, 12) * 300).astype(np.uint16)
    out = model.restore_image(grey16)
    assert out.image.shape == (3, 32, 32) and out.problems == []
    with pytest.raises(ValueError, match="float32 pixels"):
        model.restore_image(np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="under 8 px a side"):
        model.restore_image(np.zeros((4, 40, 3), np.uint8))


def test_a_mistyped_sampling_setting_is_named():
    with pytest.raises(ValueError, match=r"unknown sampling setting\(s\) \['k_maximum'\]"):
        PURE(backbone={"config": LM}, vq={"config": VQ}, sampling={"k_maximum": 10})


def test_an_image_smaller_than_a_grid_cell_is_a_clear_error(model):
    with pytest.raises(ValueError, match="smaller than one 32 px grid cell"):
        model.restore(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="RGB images"):
        model.restore(torch.rand(1, 1, 32, 32))
