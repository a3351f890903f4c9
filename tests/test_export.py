"""`omnilab export` (docs/export.md): each export loaded by its library gives the suite module's outputs.

- diffusers: the exported FLUX Kontext folder, loaded by `FluxKontextPipeline.from_pretrained`, samples the
  same images as `FlowEdit.sample` from the same noise (text-to-image, with a reference, with true CFG); the
  SD3 folder of a real CLI fit, loaded by `StableDiffusion3Pipeline`, likewise (slow).
- lora: the adapter loaded with `pipe.load_lora_weights` onto the base export gives the LoRA model's images,
  and the base alone does not.
- ccmp: `model.safetensors` + `config.json` rebuild a CCMP whose predictions equal the module's.
- qwen_image_edit: the folder is written part by part (no torchvision for the pipeline's processor); each
  part loads with the class model_index.json names and gives the module's outputs; a FlowEdit built from the
  folder samples the module's images.
- checkpoints: read with weights_only; a sharded (torch.distributed.checkpoint) folder is consolidated.
"""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.components.packed_dit import patchify_2x2
from omnilab.export import export_ccmp, export_diffusers, export_lora, load_ccmp, load_module, read_checkpoint
from omnilab.seeding import torch_generator
from tests.lightning_modules.test_flow_edit import tiny

PROMPT = "make the red circle from image 1 blue"
SIDE = 32  # pixels; the tiny VAE is /2, so latents are 16 x 16


@pytest.fixture(autouse=True, scope="module")
def tokenizer_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNILAB_CACHE", str(tmp_path_factory.mktemp("omnilab-cache")))
        yield


def _reference() -> torch.Tensor:
    return torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def flux_pipeline_images(pipe, refs: list[torch.Tensor], guidance: float) -> torch.Tensor:
    """FluxKontextPipeline's image in [0, 1] from the noise `FlowEdit.sample` draws for stream (0, "x")."""
    noise = torch.randn(16, SIDE // 2, SIDE // 2, generator=torch_generator(0, "x"))
    kw = {"image": (refs[0][None] + 1) / 2} if refs else {}
    if guidance > 1:
        kw.update(true_cfg_scale=guidance, negative_prompt="")
    out = pipe(
        prompt=PROMPT,
        height=SIDE,
        width=SIDE,
        max_area=SIDE * SIDE,
        _auto_resize=False,
        num_inference_steps=3,
        latents=patchify_2x2(noise)[None],
        output_type="pt",
        max_sequence_length=16,
        **kw,
    )
    return out.images[0]


def module_images(model, refs: list[torch.Tensor], guidance: float) -> torch.Tensor:
    """`FlowEdit.sample` at the same settings, mapped from [-1, 1] to [0, 1]."""
    image = model.sample(
        [refs], [PROMPT], size=(SIDE, SIDE), steps=3, guidance=guidance, generator=torch_generator(0, "x")
    )
    return (image[0] + 1) / 2


def test_flux_kontext_export_loads_in_diffusers_and_samples_the_same(tmp_path):
    from diffusers import FluxKontextPipeline

    model = tiny("flux_kontext").eval()
    out = export_diffusers(model, tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert (
        index["_class_name"] == "FluxKontextPipeline" and index["transformer"][1] == "FluxTransformer2DModel"
    )
    pipe = FluxKontextPipeline.from_pretrained(out)
    for refs, guidance in (([], 1.0), ([_reference()], 1.0), ([_reference()], 2.0)):
        ours, theirs = module_images(model, refs, guidance), flux_pipeline_images(pipe, refs, guidance)
        assert theirs.shape == ours.shape == (3, SIDE, SIDE)
        assert torch.allclose(ours, theirs, atol=1e-5), (len(refs), guidance, (ours - theirs).abs().max())
    assert (module_images(model, [_reference()], 2.0) - module_images(model, [], 2.0)).abs().max() > 1e-3


def test_lora_export_loads_with_load_lora_weights(tmp_path):
    from diffusers import FluxKontextPipeline

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    model = tiny("flux_kontext", lora=lora).eval()
    with torch.no_grad():  # a trained adapter: B != 0 (peft initialises B to zero)
        g = torch.Generator().manual_seed(3)
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    base = export_diffusers(model, tmp_path / "base", merge_lora=False)
    export_lora(model, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = FluxKontextPipeline.from_pretrained(base)
    refs = [_reference()]
    ours = module_images(model, refs, 1.0)
    assert (flux_pipeline_images(pipe, refs, 1.0) - ours).abs().max() > 1e-3  # the base alone differs
    pipe.load_lora_weights(tmp_path / "lora")
    assert torch.allclose(flux_pipeline_images(pipe, refs, 1.0), ours, atol=1e-5)
    merged = FluxKontextPipeline.from_pretrained(export_diffusers(model, tmp_path / "merged"))
    assert torch.allclose(flux_pipeline_images(merged, refs, 1.0), ours, atol=1e-5)


def test_lora_export_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_lora(tiny("flux_kontext"), tmp_path / "lora")


def _tiny_ccmp():
    from lightning_modules.ccmp import CCMP
    from tests.configs import REPO, init_args

    torch.manual_seed(0)
    model = CCMP(**init_args(REPO / "experiments" / "ccmp" / "tiny.yaml", "model"))
    model.configure_model()
    return model.eval()


def test_ccmp_export_is_a_plain_state_dict_with_its_config(tmp_path):
    from safetensors.torch import load_file

    model = _tiny_ccmp()
    out = export_ccmp(model, tmp_path / "ccmp")
    assert set(load_file(out / "model.safetensors")) == set(model.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["init_args"]["image_size"] == model.image_size
    loaded = load_ccmp(out)
    g = torch.Generator().manual_seed(0)
    query, target = (torch.rand(2, 3, 64, 64, generator=g) for _ in range(2))
    mask = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    with torch.no_grad():
        a, b = model(query, mask, target), loaded(query, mask, target)
    for x, y in zip(a, b):
        assert torch.equal(x.mask, y.mask) and torch.equal(x.cls, y.cls)


def test_a_sharded_checkpoint_is_consolidated_and_a_plain_folder_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    weights = {
        "w": torch.arange(6.0).view(2, 3)
    }  # Lightning's FSDP layout: weights as "model", the rest meta.pt
    dcp.save(
        {"model": weights, "optimizer_0": {"m": torch.ones(2)}},
        checkpoint_id=tmp_path / "sharded",
        no_dist=True,
    )
    torch.save({"global_step": 3, "hyper_parameters": {"lr": 0.1}}, tmp_path / "sharded" / "meta.pt")
    read = read_checkpoint(tmp_path / "sharded")
    assert torch.equal(read["state_dict"]["w"], weights["w"]) and read["global_step"] == 3
    assert read["hyper_parameters"] == {"lr": 0.1} and "optimizer_0" not in read
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is a folder but not a sharded checkpoint"):
        read_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


# --- from a real CLI fit (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_cli_fit_of_unipic2_kontext_tiny_exports_an_sd3_pipeline_that_samples_the_same(in_tmp):
    from diffusers import StableDiffusion3Pipeline

    from omnilab.cli import main
    from tests.configs import BASE, REPO

    main(["data", "synth", "multiref", "--out", "data/multiref", "--samples", "train=16", "val=4", "test=4"])
    main([
        "fit", "--config", str(BASE), "--config", str(REPO / "experiments" / "unipic2" / "kontext_tiny.yaml"),
        "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.limit_val_batches=1",
        "--data.init_args.data_dir=data/multiref", "--data.init_args.num_workers=0", "--test_after_fit=false",
    ])  # fmt: skip
    (ckpt,) = sorted(in_tmp.rglob("last.ckpt"))
    main(["export", str(ckpt), "--out", "export"])
    model = load_module(ckpt)
    pipe = StableDiffusion3Pipeline.from_pretrained(in_tmp / "export")
    for name, tensor in model.backbone.model.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor), name
    noise = torch.randn(16, SIDE // 2, SIDE // 2, generator=torch_generator(0, "x"))[None]
    for guidance in (1.0, 3.5):
        ours = module_images(model, [], guidance)
        theirs = pipe(
            prompt=PROMPT, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=guidance,
            latents=noise, output_type="pt", max_sequence_length=32,
        ).images[0]  # fmt: skip
        assert torch.allclose(ours, theirs, atol=1e-5), (guidance, (ours - theirs).abs().max())


@pytest.mark.slow
def test_a_cli_fit_of_ccmp_tiny_exports_safetensors_that_predict_the_same(in_tmp):
    from omnilab.cli import main
    from tests.configs import BASE, REPO

    main(
        [
            "data",
            "synth",
            "correspondence",
            "--out",
            "data/correspondence",
            "--samples",
            "train=16",
            "val=4",
            "test=4",
        ]
    )
    main([
        "fit", "--config", str(BASE), "--config", str(REPO / "experiments" / "ccmp" / "tiny.yaml"),
        "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.limit_val_batches=1",
        "--data.init_args.data_dir=data/correspondence", "--data.init_args.num_workers=0",
        "--test_after_fit=false", "--trainer.callbacks=[]",
    ])  # fmt: skip
    (ckpt,) = sorted(in_tmp.rglob("last.ckpt"))
    main(["export", str(ckpt), "--out", "export"])
    model, loaded = load_module(ckpt), load_ccmp(in_tmp / "export")
    g = torch.Generator().manual_seed(0)
    query, target = (torch.rand(2, 3, 64, 64, generator=g) for _ in range(2))
    mask = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    with torch.no_grad():
        for x, y in zip(model(query, mask, target), loaded(query, mask, target)):
            assert torch.equal(x.mask, y.mask) and torch.equal(x.cls, y.cls)


@pytest.mark.slow
def test_a_flow_grpo_checkpoint_exports_its_lora_by_default(tmp_path):
    from diffusers import FluxKontextPipeline

    from lightning_modules.flow_grpo import FlowGRPO
    from omnilab.cli import main
    from tests.lightning_modules.test_flow_edit import TINY

    sft = tiny("flux_kontext").eval()  # the SFT model GRPO starts from
    torch.save({"state_dict": sft.state_dict()}, tmp_path / "sft.ckpt")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    grpo = FlowGRPO(**TINY["flux_kontext"], lora=lora, init_checkpoint=str(tmp_path / "sft.ckpt"))
    grpo.configure_model()
    with torch.no_grad():
        for name, p in grpo.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    hparams = {**dict(grpo.hparams), "_class_path": "lightning_modules.flow_grpo.FlowGRPO"}
    checkpoint = {"state_dict": grpo.state_dict(), "hyper_parameters": hparams}
    grpo.on_save_checkpoint(checkpoint)  # as Lightning saves it: the SFT weights reload from init_checkpoint
    torch.save(checkpoint, tmp_path / "grpo.ckpt")
    main(["export", str(tmp_path / "grpo.ckpt"), "--out", str(tmp_path / "lora")])
    pipe = FluxKontextPipeline.from_pretrained(export_diffusers(sft, tmp_path / "sft"))
    pipe.load_lora_weights(tmp_path / "lora")
    refs = [_reference()]
    assert torch.allclose(
        flux_pipeline_images(pipe, refs, 1.0), module_images(grpo.eval(), refs, 1.0), atol=1e-5
    )
    grpo.merged_adapters = 1
    with pytest.raises(ValueError, match="merged into the base weights"):
        export_lora(grpo, tmp_path / "lora2")


def test_the_qwen_export_is_written_part_by_part_and_each_part_loads_and_gives_the_same_outputs(tmp_path):
    """No QwenImageEditPlusPipeline is built (its processor needs torchvision): the folder is written part by part.
    Each part loads with the class model_index.json names; a FlowEdit built from the folder samples what the
    trained module samples; the processor folder gives the module's pixel values and token ids."""
    import importlib
    import importlib.util
    import inspect

    import numpy as np
    from diffusers import QwenImageEditPlusPipeline
    from transformers import AutoImageProcessor

    from lightning_modules.flow_edit import FlowEdit
    from omnilab.export import merged_transformer
    from tests.lightning_modules.test_flow_edit import TINY

    model = tiny("qwen_image_edit")
    out = export_diffusers(model, tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    parts = {k: v for k, v in index.items() if not k.startswith("_")}
    # exactly the pipeline's components, each a class of its library
    assert set(parts) == set(inspect.signature(QwenImageEditPlusPipeline.__init__).parameters) - {"self"}
    assert (
        parts["processor"] == ["transformers", "Qwen2VLProcessor"]
        and parts["tokenizer"][1] == "Qwen2Tokenizer"
    )
    loaded = {}
    for name, (library, cls) in parts.items():
        klass = getattr(importlib.import_module(library), cls)
        if name != "processor":  # Qwen2VLProcessor builds a video processor: torchvision
            loaded[name] = klass.from_pretrained(out / name)
    # the weights are the trained ones (the packed backbone reuses the stock transformer's)
    ref = merged_transformer(model).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded["transformer"].state_dict().items())
    # VAE and text encoder: the same outputs as the module's own
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(
            loaded["vae"].encode(x).latent_dist.mean, model.codec.vae.encode(x).latent_dist.mean
        )
        ids = torch.tensor([[1, 5, 7, 9]])
        mine = model.text_encoder.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        theirs = loaded["text_encoder"](input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(mine, theirs)
    text = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + PROMPT
    for folder in ("tokenizer", "processor"):
        tok = importlib.import_module("transformers").Qwen2Tokenizer.from_pretrained(out / folder)
        assert tok(text)["input_ids"] == model.text_encoder.tokenizer(text)["input_ids"]
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    processor = AutoImageProcessor.from_pretrained(out / "processor")
    assert torch.equal(
        processor(images=[image], return_tensors="pt")["pixel_values"],
        model.text_encoder.image_processor(images=[image], return_tensors="pt")["pixel_values"],
    )
    # the whole model from the folder (the suite reads a Qwen pipeline folder with the same library classes)
    spec = {
        **TINY["qwen_image_edit"],
        "backbone": {"family": "qwen_image_edit", "pretrained": str(out), "subfolder": "transformer"},
        "vae": {"pretrained": str(out), "subfolder": "vae"},
        "text": {"pretrained": str(out)},
        "sampler": {"steps": 2, "guidance": 2.0},
    }
    torch.manual_seed(1)  # a different random init: only the loaded weights can make the samples equal
    again = FlowEdit(**spec)
    again.configure_model()
    refs = [[_reference()], []]
    prompts = [PROMPT, "a blue square"]

    def sample(m):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return m.eval().sample(refs, prompts, size=(SIDE, SIDE), generator=gens)

    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sample(model), sample(again)))
    if importlib.util.find_spec("torchvision") is not None:  # where the pipeline can be built, it loads
        QwenImageEditPlusPipeline.from_pretrained(out)
