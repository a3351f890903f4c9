"""The latent cache (datamodules/cache.py): `omnilab data cache` writes it, resumable per shard; training on it
gives the loss training on the images gives, for the same samples at the same step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.cache import iter_cached, write_cache
from datamodules.multiref import MultiRefDataModule
from datamodules.synth import synthesize
from tests.configs import REPO
from tests.lightning_modules.test_flow_edit import QUIET, tiny

DATA = {
    "budget": 64,
    "target_budget": 64,
    "multiple": 16,
    "min_side": 16,
    "batch_size": 2,
    "batches_per_epoch": 2,
}


@pytest.fixture(autouse=True, scope="module")
def tokenizer_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNILAB_CACHE", str(tmp_path_factory.mktemp("omnilab-cache")))
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small generated multiref shard set: 2 train shards of 6 samples."""
    root = tmp_path_factory.mktemp("multiref")
    synthesize("multiref", root, samples={"train": 12, "val": 2, "test": 2}, shard_size=6)
    return root


def first_batch(datamodule: MultiRefDataModule) -> dict:
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("drop_text", [0.0, pytest.param(0.5, marks=pytest.mark.slow)])
def test_training_on_the_cache_gives_the_loss_of_training_on_the_images(shards, tmp_path, drop_text):
    model = tiny("flux_kontext", drop_text=drop_text)
    model.trainer = L.Trainer(**QUIET)  # the step counter (0) and accumulate_grad_batches
    model.log = lambda *args, **kwargs: None
    write_cache(model, MultiRefDataModule(data_dir=str(shards), **DATA), tmp_path / "cache")
    raw = first_batch(MultiRefDataModule(data_dir=str(shards), **DATA))
    cached = first_batch(MultiRefDataModule(data_dir=str(shards), cache_dir=str(tmp_path / "cache"), **DATA))
    assert cached["__key__"] == raw["__key__"] and "target" not in cached and "refs" not in cached
    assert [len(r) for r in cached["cached"]["refs"]] == [len(r) for r in raw["refs"]]
    with torch.no_grad():
        loss_raw, loss_cached = model.training_step(raw, 0), model.training_step(cached, 0)
    assert torch.allclose(loss_raw, loss_cached, rtol=1e-5, atol=1e-7), (loss_raw, loss_cached)
    with torch.no_grad():  # a plausible bug, the cached latents of another sample, changes the loss
        cached["cached"]["target"] = cached["cached"]["target"][::-1]
        assert not torch.allclose(model.training_step(cached, 0), loss_raw, rtol=1e-3)


@pytest.mark.slow
def test_the_cache_command_writes_every_shard_once_and_resumes(shards, tmp_path):
    from lightning_modules.flow_edit import FlowEdit
    from omnilab.cli import main
    from tests.configs import init_args

    exp = str(REPO / "experiments" / "unipic2" / "kontext_tiny.yaml")
    argv = ["data", "cache", "--config", exp, "--data-dir", str(shards), "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit):  # random-init encoders: only a run's checkpoint has their weights
        main(argv)
    model = FlowEdit(**init_args(Path(exp), "model"))
    model.configure_model()
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "m.ckpt"
    )
    argv += ["--ckpt", str(tmp_path / "m.ckpt")]
    main(argv)
    written = sorted((tmp_path / "c").glob("train-*.tar"))
    assert [p.name for p in written] == ["train-000000.tar", "train-000001.tar"]
    examples = list(iter_cached(written[0]))
    assert len(examples) == 6 and examples[0]["target_latent"].shape[0] == 16
    assert examples[0]["text"].shape == (32 + 32, 32)  # CLIP tokens, then T5 tokens, at the T5 width
    assert examples[0]["pooled"].shape == (32,)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in written}
    written[1].unlink()
    main(argv)  # resumes: the present shard is kept, the missing one rewritten with the same bytes
    after = {
        p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((tmp_path / "c").glob("train-*.tar"))
    }
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000001.tar"][1] == before["train-000001.tar"][1]
    assert "index.json" in {p.name for p in (tmp_path / "c").iterdir()}


def test_a_cached_datamodule_refuses_another_budget_and_a_missing_cache(shards, tmp_path):
    dm = MultiRefDataModule(data_dir=str(shards), cache_dir=str(tmp_path / "none"), **DATA)
    with pytest.raises(ValueError, match="written at one budget"):
        dm.set_pixel_budget(128)
    with pytest.raises(FileNotFoundError, match="omnilab data cache"):
        dm.shard_spec("train")
