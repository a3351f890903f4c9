"""Test-time training callback: adapts only the named blocks per pair, restores them bit for bit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.ttt import TestTimeTraining
from lightning_modules.ccmp import CCMP

S = 32
TINY = {
    "source_encoder": {"config": {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128]}},
    "target_encoder": {
        "config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "patch_size": 16,
            "num_register_tokens": 4,
        }
    },
    "image_size": S,
}


class RecordingCCMP(CCMP):
    """CCMP whose test/predict step records the weights it predicts with (no metrics needed)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.requires_grad_seen: list[set[str]] = []

    def _record(self) -> None:
        self.seen.append({n: p.detach().clone() for n, p in self.named_parameters()})
        self.requires_grad_seen.append({n for n, p in self.named_parameters() if p.requires_grad})

    def test_step(self, batch, batch_idx):
        self._record()

    def predict_step(self, batch, batch_idx):
        self._record()
        return batch["__key__"]


def tiny_module() -> RecordingCCMP:
    torch.manual_seed(0)
    model = RecordingCCMP(**TINY)
    model.configure_model()
    return model


def loader(settings: list[str], batch_size: int = 1) -> DataLoader:
    samples = []
    for i, setting in enumerate(settings):
        g = torch.Generator().manual_seed(i)
        mask = torch.zeros(1, S, S)
        mask[:, 8:24, 8:24] = 1.0
        samples.append(
            {
                "src": torch.randn(3, S, S, generator=g),
                "src_mask": mask,
                "tgt": torch.randn(3, S, S, generator=g),
                "setting": setting,
                "__key__": f"k{i}",
            }
        )
    return DataLoader(samples, batch_size=batch_size)


def trainer(ttt: TestTimeTraining) -> L.Trainer:
    # Trainer.test/predict run under torch.inference_mode, which the callback must step out of
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ttt],
    )


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def block_names(model: CCMP, blocks: range) -> set[str]:
    return {
        n
        for n, _ in model.named_parameters()
        if any(n.startswith(f"target_encoder.model.layer.{b}.") for b in blocks)
    }


def test_ttt_adapts_only_the_last_blocks_and_restores_every_weight_exactly():
    model = tiny_module()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ttt = TestTimeTraining(blocks=2, steps=2, lr=1e-3)
    (results,) = trainer(ttt).test(model, loader(["ego-exo", "ego-exo"]))
    assert torch.isfinite(torch.tensor(results["ttt/loss_change"]))
    last_two = block_names(model, range(2, 4))
    for seen in model.seen:  # what test_step predicted with
        moved = changed(original, seen)
        assert moved and moved <= last_two
        assert any(n.startswith("target_encoder.model.layer.2.") for n in moved)
        assert any(n.startswith("target_encoder.model.layer.3.") for n in moved)
    for n, p in model.named_parameters():  # nothing carries over
        assert torch.equal(p, original[n]), n
        assert p.requires_grad


def test_ttt_blocks_and_steps_follow_the_pair_group():
    model = tiny_module()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ttt = TestTimeTraining(blocks={"exo-ego": 1, "default": 3}, steps={"exo-ego": 1, "default": 2}, lr=1e-3)
    trainer(ttt).test(model, loader(["exo-ego", "ego-ego"]))
    exo_ego, default = (changed(original, seen) for seen in model.seen)
    assert exo_ego and exo_ego <= block_names(model, range(3, 4))
    assert default <= block_names(model, range(1, 4)) and not default <= block_names(model, range(2, 4))


def test_ttt_with_zero_steps_predicts_with_the_original_weights():
    model = tiny_module()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer(TestTimeTraining(blocks=4, steps=0)).test(model, loader(["ego-exo"]))
    assert changed(original, model.seen[0]) == set()


def test_ttt_works_in_predict_and_restores_weights():
    model = tiny_module()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = trainer(TestTimeTraining(blocks=1, steps=1, lr=1e-3)).predict(
        model, loader(["ego-exo", "exo-ego"])
    )
    assert keys == [["k0"], ["k1"]]
    assert all(changed(original, seen) for seen in model.seen)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_only_the_chosen_parameters_require_grad_during_the_steps():
    model = tiny_module()
    for p in model.cls_head.parameters():
        p.requires_grad_(False)  # a flag the callback must give back as it found it
    seen = {}

    class Spy(TestTimeTraining):
        def adapt(self, trainer, module, batch, log=False):
            original = module.ttt_loss

            def loss(b):
                seen["trainable"] = {n for n, p in module.named_parameters() if p.requires_grad}
                return original(b)

            module.ttt_loss = loss
            try:
                super().adapt(trainer, module, batch, log)
            finally:
                del module.ttt_loss

    trainer(Spy(blocks=2, steps=1)).test(model, loader(["ego-exo"]))
    assert seen["trainable"] == block_names(model, range(2, 4))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("cls_head.")}


def test_a_batch_of_two_pairs_is_a_clear_error():
    with pytest.raises(ValueError, match="eval_batch_size=1"):
        trainer(TestTimeTraining()).test(tiny_module(), loader(["ego-exo", "ego-exo"], batch_size=2))


def test_a_module_without_the_protocol_is_a_clear_error():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def test_step(self, batch, batch_idx):
            pass

    with pytest.raises(TypeError, match="ttt_parameters"):
        trainer(TestTimeTraining()).test(Plain(), loader(["ego-exo"]))


class ProbabilityCCMP(CCMP):
    """CCMP whose predict step returns its mask probabilities (the prediction TTT should change)."""

    def predict_step(self, batch, batch_idx):
        last, _ = self(batch["src"], batch["src_mask"], batch["tgt"])
        return torch.sigmoid(last.mask.float())


def test_ttt_changes_the_prediction_and_the_next_pair_sees_the_original_model():
    torch.manual_seed(0)
    model = ProbabilityCCMP(**TINY)
    model.configure_model()
    pairs = loader(["ego-exo", "exo-ego"])
    plain = trainer(TestTimeTraining(blocks=2, steps=0)).predict(model, pairs)
    adapted = trainer(TestTimeTraining(blocks=2, steps=2, lr=1e-3)).predict(model, pairs)
    again = trainer(TestTimeTraining(blocks=2, steps=0)).predict(model, pairs)
    for p, a, g in zip(plain, adapted, again):
        assert (p - a).abs().max() > 1e-4  # the two cycle-loss steps moved this pair's prediction
        assert torch.equal(p, g)  # and left nothing behind: the same model predicts the same, bit for bit
