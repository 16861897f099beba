"""SuperLinkDiffusion: diffusers' Stable Diffusion / InstructPix2Pix driven by LLM queries (VisionLLM v2).

The reference tests compare against diffusers itself: ``generate`` against the pipeline classes loaded
independently from the same folder and called with ``prompt_embeds=condition``; ``loss`` against the
training recipe written out here with the UNet, VAE, text encoder and DDPMScheduler loaded
independently, drawing the same random numbers from the same seeded generator. The rest covers the
super link (upstream's names, shapes and initialisation), gradients, the folder round trip, the tiny
offline pipeline, errors and the target-image preprocessing. All on CPU with random tiny weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import string
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from PIL import Image
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.model.stable_diffusion import (
    DiffusionLinkConfig,
    DiffusionLoss,
    SuperLinkDiffusion,
    make_tiny_pipeline,
    output_image_tensor,
)

LLM_HIDDEN = 24
SIZE = 64  # the tiny pipeline's images: 32 x 32 latents, VAE factor 2
SLOTS = 6  # query slots per route (64 in VisionLLM v2; any number works)
# the reference InstructPix2Pix pipelines' Euler scheduler warns under numpy 2 (the module itself keeps
# quiet: test_import_and_use_print_nothing)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: make_tiny_pipeline(root / kind, kind=kind, seed=0) for kind in ("gen", "edit")}


def _config(kind: str, **overrides: object) -> DiffusionLinkConfig:
    return DiffusionLinkConfig(kind=kind, **{"resolution": SIZE, **overrides})


def _module(folder: Path, kind: str, seed: int = 0, **overrides: object) -> SuperLinkDiffusion:
    torch.manual_seed(seed)
    return SuperLinkDiffusion.from_pretrained(folder, _config(kind, **overrides), LLM_HIDDEN)


def _states(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, SLOTS, LLM_HIDDEN, generator=torch.Generator().manual_seed(seed))


def _images(n: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pil(seed: int, w: int = SIZE, h: int = SIZE, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _reference_pipeline(folder: Path, kind: str):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    cls = StableDiffusionPipeline if kind == "gen" else StableDiffusionInstructPix2PixPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- config


def test_config_defaults_follow_upstream_per_kind():
    gen, edit = DiffusionLinkConfig(), DiffusionLinkConfig(kind="edit")
    assert (gen.num_queries, gen.cfg_drop_rate, gen.guidance_scale, gen.num_inference_steps) == (
        77,
        0.1,
        7.5,
        50,
    )
    assert (gen.image_size, gen.trains_unet) == (512, False)
    assert (edit.image_size, edit.trains_unet, edit.image_guidance_scale) == (256, True, 1.5)
    assert edit.cfg_drop_rate == 0.05  # upstream ip2p.json (sd.json: 0.1)
    with pytest.raises(ConfigError, match=r"^ip2p.cfg_drop_rate: must be in \[0, 0.5\]"):
        DiffusionLinkConfig(kind="edit", cfg_drop_rate=0.7)
    override = DiffusionLinkConfig(kind="edit", resolution=64, train_unet=False)
    assert (override.image_size, override.trains_unet) == (64, False)
    # a dict round trip (how VisionLLM v2 checkpoints store it) and a replace keep the per-kind defaults
    assert DiffusionLinkConfig(**dataclasses.asdict(edit)) == edit
    assert dataclasses.replace(gen, kind="edit").image_size == 256


@pytest.mark.parametrize(
    "field, value",
    [
        ("kind", "x"),
        ("num_queries", 0),
        ("num_encoder_layers", 1.5),
        ("num_decoder_layers", 0),
        ("num_inference_steps", True),
        ("cfg_drop_rate", 0.6),
        ("cfg_drop_rate", float("nan")),
        ("guidance_scale", -1.0),
        ("image_guidance_scale", "2"),
        ("resolution", 100),
        ("train_unet", 1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        DiffusionLinkConfig(**{field: value})
    message = str(err.value)
    assert message.startswith(f"sd.{field}: ") and "\n" not in message
    if field == "kind":
        assert message == "sd.kind: must be 'gen' or 'edit', got 'x'"


# ---------------------------------------------------------------------------- super link


def _upstream_link(width: int, num_queries: int) -> tuple[nn.Sequential, nn.Parameter, nn.Transformer]:
    """Upstream's super-link modules, built as its __init__ builds them (same order)."""
    emb_proj = nn.Sequential(nn.Linear(LLM_HIDDEN, width), nn.GELU(), nn.Linear(width, width))
    queries = nn.Parameter(torch.randn((1, num_queries, width)))
    with warnings.catch_warnings():  # nn.Transformer's enable_nested_tensor notice
        warnings.simplefilter("ignore")
        mapper = nn.Transformer(
            batch_first=True,
            norm_first=True,
            d_model=width,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=width * 4,
            dropout=0.0,
        )
    return emb_proj, queries, mapper


def test_super_link_names_shapes_init_and_forward_match_upstream(folders):
    loaded = _module(folders["gen"], "gen")
    parts = (loaded.sd_unet, loaded.sd_vae, loaded.sd_text_encoder, loaded.sd_tokenizer, loaded.sd_scheduler)
    torch.manual_seed(5)
    module = SuperLinkDiffusion(_config("gen"), LLM_HIDDEN, *parts).eval()
    torch.manual_seed(5)
    emb_proj, queries, mapper = _upstream_link(32, 77)
    mapper.eval()

    reference = {f"emb_proj.{k}": v for k, v in emb_proj.state_dict().items()}
    reference["llm2sd_mapper_queries"] = queries.detach()
    reference.update({f"llm2sd_mapper.{k}": v for k, v in mapper.state_dict().items()})
    link = module.link_state_dict()
    assert sorted(link) == sorted(reference)
    for name in (
        "emb_proj.0.weight",
        "emb_proj.2.weight",
        "llm2sd_mapper_queries",
        "llm2sd_mapper.encoder.layers.0.self_attn.in_proj_weight",
        "llm2sd_mapper.encoder.norm.weight",
        "llm2sd_mapper.decoder.layers.0.multihead_attn.in_proj_weight",
        "llm2sd_mapper.decoder.norm.weight",
    ):
        assert name in link
    assert link["emb_proj.0.weight"].shape == (32, LLM_HIDDEN)
    assert link["llm2sd_mapper_queries"].shape == (1, 77, 32)
    assert link["llm2sd_mapper.encoder.layers.0.linear1.weight"].shape == (128, 32)
    for name, tensor in reference.items():  # the same initial weights for the same seed
        assert torch.equal(link[name], tensor), name
    # no pipeline weight is part of the link, and the rest of the state dict is the components'
    rest = [k for k in module.state_dict() if k not in link]
    assert {k.split(".")[0] for k in rest} == {"sd_unet", "sd_vae", "sd_text_encoder"}

    states = _states(3)
    with torch.no_grad():
        expected = mapper(src=emb_proj(states), tgt=queries.repeat(3, 1, 1))
        got = module.condition(states.double())  # cast to the mapper's dtype
    assert got.shape == (3, 77, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mapper_construction_is_quiet(folders):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _module(folders["edit"], "edit", num_encoder_layers=2, num_decoder_layers=2, num_queries=10)


def test_condition_rejects_wrong_hidden_size(folders):
    module = _module(folders["gen"], "gen")
    with pytest.raises(InputError, match=r"states: must be \[n, S, 24\]"):
        module.condition(torch.zeros(1, SLOTS, LLM_HIDDEN + 1))


def test_null_condition_is_the_pipelines_negative_prompt_embedding(folders):
    module = _module(folders["gen"], "gen").eval()
    pipe = _reference_pipeline(folders["gen"], "gen")
    with torch.no_grad():
        condition = module.condition(_states(2))
        _, negative = pipe.encode_prompt(None, "cpu", 1, True, prompt_embeds=condition)
    null = module.null_condition(2)
    assert null.shape == (2, 77, 32)
    torch.testing.assert_close(null, negative, rtol=0, atol=0)


# ---------------------------------------------------------------------------- generation


def test_generate_matches_stable_diffusion_pipeline(folders):
    module = _module(folders["gen"], "gen", guidance_scale=3.0, num_inference_steps=2).eval()
    states = _states(2)
    images = module.generate(states, generator=torch.Generator().manual_seed(7))
    pipe = _reference_pipeline(folders["gen"], "gen")
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=module.condition(states),
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(7),
        ).images
    assert [im.size for im in images] == [(SIZE, SIZE)] * 2
    assert all(im.mode == "RGB" for im in images)
    for got, want in zip(images, expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    # explicit settings override the config's: guidance changes the result
    unguided = module.generate(states, guidance_scale=1.0, generator=torch.Generator().manual_seed(7))
    assert not np.array_equal(np.asarray(unguided[0]), np.asarray(images[0]))
    assert module.generate(states[:1], height=32, width=48, num_inference_steps=1)[0].size == (48, 32)


def test_generate_matches_instruct_pix2pix_pipeline(folders):
    module = _module(folders["edit"], "edit", num_inference_steps=2).eval()
    states = _states(2)
    inputs = [_pil(3), _pil(4, mode="RGBA")]  # RGBA is edited as its RGB
    images = module.generate(states, input_images=inputs, generator=torch.Generator().manual_seed(7))
    pipe = _reference_pipeline(folders["edit"], "edit")
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=module.condition(states),
            image=[im.convert("RGB") for im in inputs],
            num_inference_steps=2,
            guidance_scale=7.5,
            image_guidance_scale=1.5,
            generator=torch.Generator().manual_seed(7),
        ).images
    for got, want in zip(images, expected):
        assert got.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(got), np.asarray(want))
    # the output follows the input's size, or height x width (the input is resized first)
    resized = module.generate(
        states[:1], input_images=[_pil(5, w=48, h=32)], height=32, width=32, num_inference_steps=1
    )
    assert resized[0].size == (32, 32)
    with pytest.raises(InputError, match="input_images: an edit needs one image per route"):
        module.generate(states, input_images=inputs[:1])
    # a side under the VAE's factor (2 here) would be rounded down to 0 by the pipeline
    with pytest.raises(InputError, match=r"^input_images\[1\]: 5x1 pixels, a side under the VAE's 2$"):
        module.generate(states, input_images=[inputs[0], _pil(6, w=5, h=1)], num_inference_steps=1)


# ---------------------------------------------------------------------------- training loss


def _reference_loss(
    folder: Path,
    kind: str,
    condition: torch.Tensor,
    output_images: torch.Tensor,
    input_images: torch.Tensor | None,
    captions: list[str] | None,
    rate: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The diffusers text-to-image / InstructPix2Pix training step, written out with independently
    loaded components and the draws in the order the module makes them."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ddpm = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    n = condition.shape[0]

    def encode(texts: list[str], length: int) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return text_encoder(ids.input_ids)[0]

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        latents = vae.encode(output_images).latent_dist.sample(generator=g) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (n,), generator=g)
        image_latents = vae.encode(input_images).latent_dist.mode() if kind == "edit" else None
        used = condition
        if rate > 0:
            p = torch.rand(n, generator=g)
            used = torch.where((p < 2 * rate)[:, None, None], encode([""], 77), condition)
            if kind == "edit":
                dropped = (p >= rate) & (p < 3 * rate)
                image_latents = image_latents * (~dropped).float()[:, None, None, None]
        noisy = ddpm.add_noise(latents, noise, timesteps)
        if kind == "edit":
            noisy = torch.cat([noisy, image_latents], dim=1)
        prediction = unet(noisy, timesteps, encoder_hidden_states=used).sample
        image_loss = F.mse_loss(prediction, noise)
        if captions is None:
            return image_loss, image_loss, None
        caption_loss = F.mse_loss(condition, encode(captions, tokenizer.model_max_length))
        return image_loss + 0.1 * caption_loss, image_loss, caption_loss


@pytest.mark.parametrize("kind", ["gen", "edit"])
@pytest.mark.parametrize("rate", [0.0, 0.5])
@pytest.mark.parametrize("captions", [None, ["a red cat on the mat", "the blue sky"]])
def test_loss_matches_diffusers_training_step(folders, kind, rate, captions):
    module = _module(folders[kind], kind, cfg_drop_rate=rate)
    states, output_images = _states(2), _images(2)
    input_images = _images(2, seed=9) if kind == "edit" else None
    result = module.loss(
        states, output_images, captions, input_images, generator=torch.Generator().manual_seed(11)
    )
    assert isinstance(result, DiffusionLoss)
    with torch.no_grad():
        condition = module.condition(states)
    want = _reference_loss(folders[kind], kind, condition, output_images, input_images, captions, rate, 11)
    torch.testing.assert_close(result.image_loss, want[1])
    torch.testing.assert_close(result.loss, want[0])
    if captions is None:
        assert result.caption_loss is None
    else:
        torch.testing.assert_close(result.caption_loss, want[2])
        assert result.caption_loss.item() > 0


def test_cfg_dropout_replaces_the_condition(folders):
    """With rate 0.5 every route's prompt is dropped (p < 1): the loss no longer depends on the states,
    and it differs from the undropped loss on the same draws."""
    module = _module(folders["gen"], "gen", cfg_drop_rate=0.5)
    images = _images(2)
    dropped = [
        module.loss(_states(2, seed=s), images, generator=torch.Generator().manual_seed(3)) for s in (1, 2)
    ]
    torch.testing.assert_close(dropped[0].loss, dropped[1].loss, rtol=0, atol=0)
    module.config.cfg_drop_rate = 0.0
    kept = module.loss(_states(2, seed=1), images, generator=torch.Generator().manual_seed(3))
    assert kept.loss.item() != dropped[0].loss.item()


def test_caption_loss_needs_every_caption(folders):
    module = _module(folders["gen"], "gen")
    result = module.loss(_states(2), _images(2), ["a cat", None], generator=torch.Generator().manual_seed(0))
    assert result.caption_loss is None and result.loss is result.image_loss
    with pytest.raises(InputError, match="captions: 1 for 2 routes"):
        module.loss(_states(2), _images(2), ["a cat"])
    short = _module(folders["gen"], "gen", num_queries=16)
    assert short.condition(_states(1)).shape == (1, 16, 32) and short.null_condition(3).shape == (3, 16, 32)
    assert short.loss(_states(2), _images(2)).caption_loss is None
    with pytest.raises(
        InputError, match=r"captions: a caption loss needs sd.num_queries == .* \(77\), got 16"
    ):
        short.loss(_states(2), _images(2), ["a cat", "a dog"])


def test_loss_input_errors(folders):
    edit = _module(folders["edit"], "edit")
    with pytest.raises(InputError, match=r"input_images: required for an edit \(\[EDIT\]\) loss"):
        edit.loss(_states(2), _images(2))
    with pytest.raises(InputError, match="input_images: shape"):
        edit.loss(_states(2), _images(2), input_images=_images(2)[..., :32, :32])
    with pytest.raises(InputError, match=r"output_images: must be \[2, 3, h, w\]"):
        edit.loss(_states(2), _images(3), input_images=_images(3))


def _grads(module: nn.Module) -> tuple[bool, bool]:
    """(every parameter has a gradient, some parameter has one)."""
    has = [p.grad is not None for p in module.parameters()]
    return all(has), any(has)


@pytest.mark.parametrize(
    "kind, train_unet, unet_trained",
    [("gen", None, False), ("edit", None, True), ("gen", True, True), ("edit", False, False)],
)
def test_gradients_reach_the_link_and_only_a_trained_unet(folders, kind, train_unet, unet_trained):
    module = _module(folders[kind], kind, train_unet=train_unet, cfg_drop_rate=0.0)
    inputs = _images(2, seed=9) if kind == "edit" else None
    module.loss(_states(2), _images(2), ["a cat", "a dog"], inputs).loss.backward()
    for part in (module.emb_proj, module.llm2sd_mapper):
        assert _grads(part) == (True, True)
    assert module.llm2sd_mapper_queries.grad is not None
    assert _grads(module.sd_unet)[1] is unet_trained
    assert _grads(module.sd_vae) == (False, False)
    assert _grads(module.sd_text_encoder) == (False, False)
    trainable = module.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in module.parameters() if p.requires_grad}
    link_size = sum(p.numel() for p in module.link_state_dict().values())
    unet_size = sum(p.numel() for p in module.sd_unet.parameters()) if unet_trained else 0
    assert sum(p.numel() for p in trainable) == link_size + unet_size


def test_bfloat16_loss_and_generation(folders):
    torch.manual_seed(0)
    module = SuperLinkDiffusion.from_pretrained(
        folders["gen"], _config("gen"), LLM_HIDDEN, dtype=torch.bfloat16
    )
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    result = module.loss(
        _states(2), _images(2), ["a cat", "a dog"], generator=torch.Generator().manual_seed(0)
    )
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    images = module.generate(_states(1), num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert images[0].size == (SIZE, SIZE)


# ---------------------------------------------------------------------------- folders


def test_save_pipeline_round_trip(folders, tmp_path):
    for kind in ("gen", "edit"):
        module = _module(folders[kind], kind, num_inference_steps=2).eval()
        saved = module.save_pipeline(tmp_path / kind)
        assert saved == tmp_path / kind and (saved / "model_index.json").is_file()
        index = json.loads((saved / "model_index.json").read_text())
        assert index["_class_name"] == (
            "StableDiffusionPipeline" if kind == "gen" else "StableDiffusionInstructPix2PixPipeline"
        )
        assert index["requires_safety_checker"] is False
        again = _module(saved, kind, seed=1, num_inference_steps=2).eval()
        pipeline_weights = {k: v for k, v in module.state_dict().items() if k not in module.link_state_dict()}
        for name, tensor in again.state_dict().items():
            if name in pipeline_weights:
                assert torch.equal(tensor, pipeline_weights[name]), name
        assert not torch.equal(again.llm2sd_mapper_queries, module.llm2sd_mapper_queries)  # a fresh link
        again.load_state_dict(module.link_state_dict(), strict=False)
        assert type(again.sd_scheduler) is type(module.sd_scheduler)
        assert dict(again.sd_scheduler.config) == dict(module.sd_scheduler.config)
        inputs = [_pil(3)] if kind == "edit" else None
        outputs = [
            m.generate(_states(1), inputs, generator=torch.Generator().manual_seed(1))
            for m in (module, again)
        ]
        assert np.array_equal(np.asarray(outputs[0][0]), np.asarray(outputs[1][0]))
        _reference_pipeline(saved, kind)  # diffusers itself reads the saved folder


def test_tiny_pipeline_folder(folders, tmp_path):
    gen, edit = folders["gen"], folders["edit"]
    for folder in (gen, edit):
        names = {p.name for p in folder.iterdir()}
        assert names == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000
        tokenizer_files = {p.name for p in (folder / "tokenizer").iterdir()}
        assert {"vocab.json", "merges.txt"} <= tokenizer_files and "tokenizer.json" not in tokenizer_files
    assert UNet2DConditionModel.load_config(gen / "unet")["in_channels"] == 4
    assert UNet2DConditionModel.load_config(edit / "unet")["in_channels"] == 8
    assert AutoencoderKL.load_config(gen / "vae")["block_out_channels"] == [16, 32]  # factor 2
    betas = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
    }
    pndm = PNDMScheduler.load_config(gen / "scheduler")
    assert pndm["_class_name"] == "PNDMScheduler"
    assert {k: pndm[k] for k in betas} == betas
    assert (pndm["skip_prk_steps"], pndm["steps_offset"], pndm["set_alpha_to_one"]) == (True, 1, False)
    euler = EulerAncestralDiscreteScheduler.load_config(edit / "scheduler")
    assert euler["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert {k: euler[k] for k in betas} == betas
    # deterministic per seed, and the caller's random state is untouched
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = make_tiny_pipeline(tmp_path / "again", kind="gen", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / part).read_bytes() == (gen / part).read_bytes()
    with pytest.raises(ConfigError, match="sd.kind: must be 'gen' or 'edit', got 'video'"):
        make_tiny_pipeline(tmp_path / "bad", kind="video")


def test_tiny_vae_encodes_like_a_trained_one(folders):
    """A random VAE's posterior has std ~1, which buries every target in sampling noise: the tiny one's
    is a near point (as a trained VAE's), and its scaled latents have unit variance (as SD 1.5's
    0.18215 makes them), so two different images stay apart after encoding."""
    vae = AutoencoderKL.from_pretrained(folders["gen"] / "vae")
    images = torch.nn.functional.interpolate(torch.rand(6, 3, 8, 8) * 2 - 1, size=(64, 64), mode="bilinear")
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    assert posterior.std.max() < 0.01
    scaled = posterior.mean * vae.config.scaling_factor
    assert 0.7 < scaled.std() < 1.4
    red = torch.tensor([0.7, -0.8, -0.8])[:, None, None].expand(3, 64, 64)
    blue = torch.tensor([-0.8, -0.5, 0.7])[:, None, None].expand(3, 64, 64)
    with torch.no_grad():
        a, b = (vae.encode(x[None]).latent_dist.sample() * vae.config.scaling_factor for x in (red, blue))
    assert (a - b).pow(2).mean() > 0.1  # apart, well beyond the posterior noise (std < 0.01 x ~4)


def test_tiny_tokenizer_round_trips_text(folders):
    tokenizer = CLIPTokenizer.from_pretrained(folders["gen"] / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == 77
    text = "a photo of the red cat sitting on the mat"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert "the</w>" in tokenizer.convert_ids_to_tokens(ids)  # the merges apply
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # as CLIP's: lower case, digits one by one
    assert (
        tokenizer.decode(tokenizer("The Year 2024").input_ids, skip_special_tokens=True) == "the year 2 0 2 4"
    )
    every = " ".join(string.ascii_lowercase + string.digits + string.punctuation)
    every_ids = tokenizer(every).input_ids[1:-1]
    assert tokenizer.unk_token_id not in every_ids  # every ASCII character has a token
    assert tokenizer.decode(every_ids) == every
    padded = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77)
    vocab = json.loads((folders["gen"] / "tokenizer" / "vocab.json").read_text())
    config = CLIPTextConfig.from_pretrained(folders["gen"] / "text_encoder")
    assert config.vocab_size == len(vocab) and config.max_position_embeddings == 77


def test_from_pretrained_errors(folders, tmp_path):
    def fails(path: Path, config: DiffusionLinkConfig, *, match: str) -> str:
        with pytest.raises(CheckpointError, match=match) as err:
            SuperLinkDiffusion.from_pretrained(path, config, LLM_HIDDEN)
        message = str(err.value)
        assert "\n" not in message
        return message

    fails(
        tmp_path / "nowhere",
        _config("gen"),
        match=f"^{tmp_path / 'nowhere'}: no such diffusers pipeline folder",
    )
    (tmp_path / "empty").mkdir()
    fails(
        tmp_path / "empty",
        _config("gen"),
        match=r"empty: not a diffusers pipeline folder \(no model_index.json\)",
    )
    broken = shutil.copytree(folders["gen"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    fails(broken, _config("gen"), match=f"^{broken / 'vae'}: missing \\(the pipeline's vae\\)")
    fails(
        folders["edit"],
        _config("gen"),
        match=f"^{folders['edit']}/unet: in_channels 8 does not fit kind 'gen'",
    )
    fails(
        folders["gen"],
        _config("edit"),
        match=f"^{folders['gen']}/unet: in_channels 4 does not fit kind 'edit'",
    )
    corrupt = shutil.copytree(folders["gen"], tmp_path / "corrupt")
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    fails(corrupt, _config("gen"), match=f"^{corrupt / 'unet'}: cannot load ")
    with pytest.raises(ConfigError, match="sd.num_queries: at most the text encoder's 77 positions, got 78"):
        SuperLinkDiffusion.from_pretrained(folders["gen"], _config("gen", num_queries=78), LLM_HIDDEN)


def test_text_encoder_width_must_match_the_unet(folders):
    module = _module(folders["gen"], "gen")
    narrow = CLIPTextModel(
        CLIPTextConfig(vocab_size=520, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(CheckpointError, match="cross_attention_dim 32 != text_encoder hidden_size 16"):
        SuperLinkDiffusion(
            _config("gen"),
            LLM_HIDDEN,
            module.sd_unet,
            module.sd_vae,
            narrow,
            module.sd_tokenizer,
            module.sd_scheduler,
        )


def test_import_and_use_print_nothing(tmp_path):
    """Importing the module, building, loading, generating and saving write nothing to the terminal
    (with Python's DeprecationWarnings shown)."""
    script = (
        "import torch\n"
        "from interleaf.model.stable_diffusion import *\n"
        f"p = make_tiny_pipeline({str(tmp_path / 'p')!r}, kind='edit')\n"
        "m = SuperLinkDiffusion.from_pretrained(p, DiffusionLinkConfig(kind='edit', resolution=64), 8)\n"
        "from PIL import Image\n"
        "m.generate(torch.zeros(1, 2, 8), [Image.new('RGB', (64, 64))], num_inference_steps=1)\n"
        f"m.save_pipeline({str(tmp_path / 'q')!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


# ---------------------------------------------------------------------------- target images


def test_output_image_tensor_pads_gen_targets_on_white():
    wide = _pil(1, w=64, h=32)
    tensor = output_image_tensor(wide, _config("gen"))  # 64 x 64 after padding: no resize
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    assert torch.all(tensor[:, :16] == 1.0) and torch.all(tensor[:, 48:] == 1.0)  # white bands
    original = torch.from_numpy(np.array(wide)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(tensor[:, 16:48], original)
    tall = output_image_tensor(_pil(1, w=20, h=40).convert("L"), _config("gen", resolution=16))
    assert tall.shape == (3, 16, 16) and tall.min() >= -1 and tall.max() <= 1
    assert torch.all(tall[:, :, :3] == 1.0) and torch.all(tall[:, :, -3:] == 1.0)


def test_output_image_tensor_resizes_and_centre_crops_edit_images():
    wide = _pil(2, w=96, h=64)
    tensor = output_image_tensor(wide, _config("edit"))  # the short side is already 64: a crop only
    original = torch.from_numpy(np.array(wide)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(tensor, original[:, :, 16:80])
    small = output_image_tensor(_pil(3, w=300, h=200), DiffusionLinkConfig(kind="edit"))  # upstream's 256
    assert small.shape == (3, 256, 256) and small.min() >= -1 and small.max() <= 1
    # a square image: both kinds only resize it
    square = _pil(4, w=80, h=80)
    torch.testing.assert_close(
        output_image_tensor(square, _config("gen")), output_image_tensor(square, _config("edit"))
    )


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_a_component_missing_weights_is_one_error_not_random_weights(folders, tmp_path, capfd, component):
    """diffusers would leave a missing tensor randomly initialised (or on the meta device, which then
    failed in ``.to()`` naming nothing); it is one line naming the component."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(folders["gen"], tmp_path / "broken")
    weights = broken / component / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_in.bias" if component == "unet" else "decoder.conv_in.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=f"^{broken / component}: missing weights \\[") as err:
        SuperLinkDiffusion.from_pretrained(broken, _config("gen"), LLM_HIDDEN)
    assert "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # diffusers' "newly initialized" notice is the error's, not printed


def test_a_tokenizer_folder_without_its_vocabulary_is_one_error(folders, tmp_path):
    """transformers loads an empty tokenizer folder as a 2-token CLIPTokenizer (every word unknown)."""
    broken = shutil.copytree(folders["gen"], tmp_path / "broken")
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (broken / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=f"^{broken / 'tokenizer'}: no vocabulary"):
        SuperLinkDiffusion.from_pretrained(broken, _config("gen"), LLM_HIDDEN)
