"""LlamaGen's VQ-8 tokenizer: codes, the L2-normalised search, the VQ losses, hub layout, the release's checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.vq import (
    LlamaGenVQModel,
    VectorQuantizer,
    convert_llamagen_checkpoint,
    quantizer_losses,
)
from lightning_modules.vq import VQTokenizer

TINY = dict(codebook_size=64, codebook_embed_dim=8, ch=8, z_channels=16, num_res_blocks=1, norm_groups=4)


def test_vq8_downsamples_by_8_and_round_trips_shapes():
    model = LlamaGenVQModel(**TINY).eval()
    assert model.downsample == 8
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long and int(codes.max()) < 64
    assert model.decode_codes(codes).shape == (2, 3, 32, 48)
    with pytest.raises(ValueError, match="multiple of the VQ's 8x"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode_codes(torch.full((1, 2, 2), 64))


def test_l2_normalised_search_picks_the_entry_of_highest_cosine():
    q = VectorQuantizer(3, 2, l2_norm=True)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    # z = (1, 3): cosines with the entries 0.316, 0.949, -0.894 -> entry 1, whose norm (2) does not matter
    z = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    out = q(z)
    assert out.codes.item() == 1
    assert torch.allclose(out.e.flatten(), torch.tensor([0.0, 1.0]))  # the unit entry
    assert torch.allclose(out.z.flatten(), torch.tensor([1.0, 3.0]) / 10**0.5)  # the unit input
    assert torch.allclose(out.z_q, out.e)  # straight-through: the value of e


def test_quantizer_losses_worked_by_hand_and_their_gradients_go_where_vq_vae_sends_them():
    e = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[0.6, 0.8]], requires_grad=True)
    codebook, commit = quantizer_losses(e, z, beta=0.25)
    # |e - z|^2 / 2 = (0.16 + 0.64) / 2 = 0.4; commitment = 0.25 * 0.4 = 0.1
    assert codebook.item() == pytest.approx(0.4) and commit.item() == pytest.approx(0.1)
    codebook.backward(retain_graph=True)
    assert z.grad is None and e.grad is not None  # the codebook term moves only the codebook
    e.grad = None
    commit.backward()
    assert e.grad is None and z.grad is not None  # the commitment term moves only the encoder


def test_saves_and_loads_in_the_hub_layout_with_identical_codes(tmp_path):
    model = LlamaGenVQModel(**TINY).eval()
    model.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "config.json").is_file()
    assert list((tmp_path / "vq").glob("*.safetensors"))
    again = LlamaGenVQModel.from_pretrained(tmp_path / "vq").eval()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.encode(images), again.encode(images))


def test_the_released_checkpoint_layout_converts_by_name(tmp_path):
    # LlamaGen saves {"model": state_dict} with a 65536-long `quantize.codebook_used` buffer beside the weights
    source = LlamaGenVQModel(**{**TINY, "encoder_ch_mult": (1, 2, 2, 4)})
    state = {**source.state_dict(), "quantize.codebook_used": torch.zeros(65536)}
    torch.save({"model": state}, tmp_path / "vq_ds8_c2i.pt")
    out = convert_llamagen_checkpoint(tmp_path / "vq_ds8_c2i.pt", tmp_path / "hub", **TINY)
    loaded = LlamaGenVQModel.from_pretrained(out)
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.save({"model": {"encoder.bogus": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="missing"):
        convert_llamagen_checkpoint(tmp_path / "bad.pt", tmp_path / "bad", **TINY)


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"hq": torch.rand(3, 16, 16, generator=g)}


def test_training_lowers_the_loss_restarts_dead_codes_and_exports(tmp_path):
    torch.manual_seed(0)
    module = VQTokenizer({"config": TINY}, lr=3e-3, restart_dead_codes_every=2, export_dir="vq")
    loader = torch.utils.data.DataLoader(_Images(), batch_size=8)
    module.configure_model()
    before = module.losses(next(iter(loader))["hq"])["rec"].item()
    trainer = L.Trainer(
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    after = module.losses(next(iter(loader))["hq"])["rec"].item()
    assert after < before
    assert trainer.callback_metrics["train/codes_restarted"] > 0  # 64 codes, 8 x 4 positions a batch
    norms = F.normalize(module.vq.quantize.embedding.weight, dim=-1).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(64))
    exported = LlamaGenVQModel.from_pretrained(tmp_path / "vq")
    assert torch.equal(exported.quantize.embedding.weight, module.vq.quantize.embedding.weight)
