"""VisionLLM v2's image generation and editing tools: diffusers' Stable Diffusion and InstructPix2Pix
conditioned on LLM "super-link" queries.

After a ``[GEN]`` (Stable Diffusion 1.5) or ``[EDIT]`` (InstructPix2Pix) routing token the MLLM writes
64 query tokens; their final hidden states replace the CLIP text embeddings the UNet cross-attends
to::

    states      [n, S, H]   the LLM's last hidden states at the S (64) query slots of n routes
      -> emb_proj: Linear(H, C) GELU Linear(C, C)                    [n, S, C]
      -> llm2sd_mapper: nn.Transformer (pre-norm, 1 encoder + 1 decoder layer, 8 heads, FFN 4C,
         no dropout), src = the projected states, tgt = num_queries learned queries [1, Q, C]
    condition   [n, Q, C]   Q = 77, C = the UNet's cross_attention_dim (768 for SD 1.5); the UNet's
                            ``encoder_hidden_states`` in place of ``text_encoder(prompt)``

Training (``SuperLinkDiffusion.loss``) is the diffusers text-to-image / InstructPix2Pix recipe with
the condition as the prompt embedding: VAE latents of the target image (``latent_dist.sample() *
scaling_factor``), Gaussian noise at a uniform random timestep added by a ``DDPMScheduler`` built from
the pipeline scheduler's config, the UNet's epsilon prediction against the noise (MSE in float32).
With ``cfg_drop_rate`` r > 0 a route's condition is replaced by the text encoder's embedding of the
empty prompt with probability 2r (so the pipelines' classifier-free guidance has something to
contrast with); for editing, the input image's latents (``latent_dist.mode()``, unscaled, concatenated
to the noisy latents on channels: an 8-channel UNet) are zeroed where r <= p < 3r, the same p. When
every route has a caption, ``caption_loss`` = MSE(condition, text_encoder(caption)) pulls the
condition towards CLIP's space and the total is ``image_loss + 0.1 * caption_loss``.

Generation builds diffusers' own ``StableDiffusionPipeline`` / ``StableDiffusionInstructPix2PixPipeline``
from the components and calls it with ``prompt_embeds=condition`` (the pipeline encodes the empty
negative prompt for guidance itself).

As upstream (OpenGVLab/VisionLLM, ``StableDiffusionWithLLMEmb`` / ``InstructPix2PixWithLLMEmb``): the
super-link weights keep upstream's names (``emb_proj.*``, ``llm2sd_mapper_queries``,
``llm2sd_mapper.*``), the VAE and text encoder are frozen and the UNet is frozen for generation but
trained for editing (``DiffusionLinkConfig.train_unet``). Departures: the two tools are one class
chosen by ``kind``; training noise always comes from the DDPMScheduler (upstream's SD noised with the
pipeline's PNDM scheduler, whose ``add_noise`` is bit-identical); the random draws can come from one
``torch.Generator``; the caption MSE is computed in float32; the VAE runs under ``no_grad``; the
components are loaded from a local diffusers folder only (never downloaded).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from interleaf.errors import CheckpointError, ConfigError, InputError, describe, is_number
from interleaf.model.visionllm import DECODER_OF  # the config section of each kind: sd / ip2p

__all__ = [
    "DiffusionLinkConfig",
    "DiffusionLoss",
    "SuperLinkDiffusion",
    "make_tiny_pipeline",
    "output_image_tensor",
]

KINDS = ("gen", "edit")
DEFAULT_RESOLUTION = {"gen": 512, "edit": 256}  # upstream's text2img / ip2p datasets
DEFAULT_CFG_DROP_RATE = {"gen": 0.1, "edit": 0.05}  # upstream sd.json / ip2p.json
DEFAULT_TRAIN_UNET = {"gen": False, "edit": True}  # upstream freezes SD's UNet, fine-tunes IP2P's
PIPELINE_NAMES = {"gen": "StableDiffusionPipeline", "edit": "StableDiffusionInstructPix2PixPipeline"}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CAPTION_WEIGHT = 0.1
MAPPER_HEADS = 8  # nn.Transformer's default, which upstream keeps
# Stable Diffusion 1.5's noise schedule (InstructPix2Pix was fine-tuned from it and keeps it)
SD15_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


@dataclass
class DiffusionLinkConfig:
    """Settings of one diffusion tool. ``resolution`` / ``train_unet`` None follow upstream per kind
    (see :attr:`image_size` / :attr:`trains_unet`): 512 and a frozen UNet for ``gen``, 256 and a
    trained UNet for ``edit``."""

    kind: str = "gen"  # "gen" (Stable Diffusion) or "edit" (InstructPix2Pix)
    num_queries: int = 77
    num_encoder_layers: int = 1
    num_decoder_layers: int = 1
    cfg_drop_rate: float | None = None  # None -> upstream's: 0.1 (sd.json) for gen, 0.05 (ip2p.json) for edit
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5  # edit only
    num_inference_steps: int = 50
    resolution: int | None = None
    train_unet: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"sd.kind: must be 'gen' or 'edit', got {self.kind!r}")
        key = DECODER_OF[self.kind]
        for name in ("num_queries", "num_encoder_layers", "num_decoder_layers", "num_inference_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{key}.{name}: must be an integer >= 1, got {value!r}")
        if self.cfg_drop_rate is None:
            self.cfg_drop_rate = DEFAULT_CFG_DROP_RATE[self.kind]
        # 2r is the probability of dropping the prompt: past 0.5 it would exceed 1
        if not is_number(self.cfg_drop_rate) or not 0 <= self.cfg_drop_rate <= 0.5:
            raise ConfigError(f"{key}.cfg_drop_rate: must be in [0, 0.5], got {self.cfg_drop_rate!r}")
        for name in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ConfigError(f"{key}.{name}: must be a number >= 0, got {value!r}")
        if self.resolution is not None and (
            not _is_int(self.resolution) or self.resolution < 8 or self.resolution % 8
        ):
            raise ConfigError(
                f"{key}.resolution: must be a multiple of 8 (>= 8) or null, got {self.resolution!r}"
            )
        if self.train_unet is not None and not isinstance(self.train_unet, bool):
            raise ConfigError(f"{key}.train_unet: must be true, false or null, got {self.train_unet!r}")

    @property
    def image_size(self) -> int:
        """The training images' side: ``resolution``, or upstream's for the kind."""
        return self.resolution if self.resolution is not None else DEFAULT_RESOLUTION[self.kind]

    @property
    def trains_unet(self) -> bool:
        """Whether the UNet is trained: ``train_unet``, or upstream's choice for the kind."""
        return self.train_unet if self.train_unet is not None else DEFAULT_TRAIN_UNET[self.kind]


@dataclass
class DiffusionLoss:
    """``loss`` = ``image_loss`` (+ 0.1 * ``caption_loss`` when every route had a caption)."""

    loss: torch.Tensor
    image_loss: torch.Tensor
    caption_loss: torch.Tensor | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """diffusers' SD pipelines import transformers' ``CLIPImageProcessor`` (the safety checker's feature
    extractor, which we never use); without torchvision, transformers 5 warns once while falling back
    to the PIL processor. Keep that out of the user's terminal."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _pipeline_class(kind: str) -> type:
    with _quiet_transformers():
        import diffusers

        return getattr(diffusers, PIPELINE_NAMES[kind])


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers 5 draws a progress bar for every model it loads or saves ("Loading weights",
    "Writing model shards"), even for a 150 kB text encoder; hide them while we load and save."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():  # already off (e.g. HF_HUB_DISABLE_PROGRESS_BARS)
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs missing or unused weights while loading; from_pretrained reports missing ones
    itself, as one error (unused ones do no harm)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextmanager
def _quiet_scheduler() -> Iterator[None]:
    # diffusers' Euler schedulers build their sigmas with np.array(tensor), which numpy 2 reports as
    # a DeprecationWarning on every construction (the values are right)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        yield


def _mapper(width: int, config: DiffusionLinkConfig) -> nn.Transformer:
    """Upstream's ``nn.Transformer(batch_first=True, norm_first=True, d_model=C, dim_feedforward=4C,
    dropout=0)``. Its encoder is passed in, built as nn.Transformer would build it but with
    ``enable_nested_tensor=False``: nested tensors do not apply to pre-norm layers, and nn.Transformer
    warns so at every construction. Same modules, same names, same draws from the global generator,
    so the same initial weights as upstream's for a given seed."""
    layer = nn.TransformerEncoderLayer(
        width, MAPPER_HEADS, 4 * width, dropout=0.0, batch_first=True, norm_first=True
    )
    encoder = nn.TransformerEncoder(
        layer, config.num_encoder_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
    )
    return nn.Transformer(
        d_model=width,
        nhead=MAPPER_HEADS,
        num_encoder_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers,
        dim_feedforward=4 * width,
        dropout=0.0,
        batch_first=True,
        norm_first=True,
        custom_encoder=encoder,
    )


def _check_components(
    config: DiffusionLinkConfig, unet: Any, vae: Any, text_encoder: Any, scheduler: Any, where: str
) -> None:
    """The UNet fits the kind and the text encoder; ``where`` names the pipeline in the messages."""
    latent = vae.config.latent_channels
    wanted = latent if config.kind == "gen" else 2 * latent  # edit: noisy + input-image latents
    if unet.config.in_channels != wanted:
        raise CheckpointError(
            f"{where}/unet: in_channels {unet.config.in_channels} does not fit kind {config.kind!r} "
            f"(needs {wanted}: {'the noisy' if config.kind == 'gen' else 'noisy + input-image'} latents)"
        )
    width = unet.config.cross_attention_dim
    hidden = text_encoder.config.hidden_size
    if not _is_int(width) or width != hidden:
        raise CheckpointError(
            f"{where}: unet cross_attention_dim {width} != text_encoder hidden_size {hidden}"
        )
    if width % MAPPER_HEADS:
        raise CheckpointError(
            f"{where}/unet: cross_attention_dim {width} is not a multiple of the mapper's {MAPPER_HEADS} heads"
        )
    positions = text_encoder.config.max_position_embeddings
    if config.num_queries > positions:
        raise ConfigError(
            f"{DECODER_OF[config.kind]}.num_queries: at most the text encoder's {positions} positions, got {config.num_queries}"
        )
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction != "epsilon":  # the loss regresses the noise, as upstream
        raise CheckpointError(
            f"{where}/scheduler: prediction_type {prediction!r} not supported (needs 'epsilon')"
        )


class SuperLinkDiffusion(nn.Module):
    """A Stable Diffusion (``kind="gen"``) or InstructPix2Pix (``"edit"``) pipeline driven by LLM queries.

    Submodules: ``emb_proj``, ``llm2sd_mapper_queries``, ``llm2sd_mapper`` (the super link, upstream's
    names), ``sd_unet``, ``sd_vae``, ``sd_text_encoder`` (diffusers / transformers models). Plain
    attributes: ``sd_tokenizer`` (CLIPTokenizer), ``sd_scheduler`` (the pipeline's sampler),
    ``noise_scheduler`` (a DDPMScheduler with its config, for training).
    """

    def __init__(
        self,
        config: DiffusionLinkConfig,
        llm_hidden_size: int,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: SchedulerMixin,
    ) -> None:
        super().__init__()
        if not _is_int(llm_hidden_size) or llm_hidden_size < 1:
            raise ConfigError(f"llm_hidden_size: must be an integer >= 1, got {llm_hidden_size!r}")
        _check_components(config, unet, vae, text_encoder, scheduler, "pipeline")
        self.config = config
        width = unet.config.cross_attention_dim
        # built in upstream's order (projection, queries, mapper): same seed, same initial weights
        self.emb_proj = nn.Sequential(nn.Linear(llm_hidden_size, width), nn.GELU(), nn.Linear(width, width))
        self.llm2sd_mapper_queries = nn.Parameter(torch.randn(1, config.num_queries, width))
        self.llm2sd_mapper = _mapper(width, config)

        self.sd_unet = unet
        self.sd_vae = vae
        self.sd_text_encoder = text_encoder
        self.sd_tokenizer = tokenizer
        self.sd_scheduler = scheduler
        # training noise: DDPM's forward process with the pipeline's betas (as diffusers' training scripts)
        with _quiet_scheduler():
            self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.sd_vae.requires_grad_(False)
        self.sd_text_encoder.requires_grad_(False)
        self.sd_unet.requires_grad_(config.trains_unet)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: DiffusionLinkConfig,
        llm_hidden_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> SuperLinkDiffusion:
        """The components of the diffusers pipeline folder ``path`` (``model_index.json``, ``unet/``,
        ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``: e.g. a downloaded
        runwayml/stable-diffusion-v1-5 or timbrooks/instruct-pix2pix) in ``dtype``, and a freshly
        initialised super link (global generator). Local files only; one-line ``CheckpointError``s."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such diffusers pipeline folder")
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise CheckpointError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index_file}: cannot read ({describe(exc)})") from None
        for name in COMPONENTS:
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder / name}: missing (the pipeline's {name})")
        scheduler_class = _scheduler_class(index, folder)

        def load(name: str, loader: Any) -> Any:
            try:
                with _quiet_scheduler(), _no_progress_bars(), _quiet_diffusers():
                    return loader()
            except Exception as exc:  # any library's failure on a bad folder: one line naming it
                raise CheckpointError(f"{folder / name}: cannot load ({describe(exc)})") from None

        def complete(name: str, loaded: tuple[Any, dict[str, Any]]) -> Any:
            model, info = loaded
            if info["missing_keys"]:  # the libraries would leave them random (diffusers: on the meta device)
                missing = sorted(info["missing_keys"])
                raise CheckpointError(
                    f"{folder / name}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                )
            return model

        common = {"local_files_only": True}
        # diffusers' default needs accelerate, and without it prints that it falls back: ask for what works
        weights = {
            **common,
            "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
            "output_loading_info": True,
        }
        unet = complete(
            "unet",
            load(
                "unet",
                lambda: UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **weights),
            ),
        )
        vae = complete(
            "vae",
            load("vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, **weights)),
        )
        text_encoder = complete(
            "text_encoder",
            load(
                "text_encoder",
                lambda: CLIPTextModel.from_pretrained(
                    folder / "text_encoder", dtype=dtype, output_loading_info=True, **common
                ),
            ),
        )
        # transformers loads a folder without vocabulary files as a 2-token tokenizer (all words unknown)
        if not any((folder / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise CheckpointError(f"{folder / 'tokenizer'}: no vocabulary (vocab.json or tokenizer.json)")
        tokenizer = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer", **common))
        scheduler = load("scheduler", lambda: scheduler_class.from_pretrained(folder / "scheduler", **common))
        _check_components(config, unet, vae, text_encoder, scheduler, str(folder))
        module = cls(config, llm_hidden_size, unet, vae, text_encoder, tokenizer, scheduler)
        return module.to(dtype)

    def pipeline(self) -> Any:
        """diffusers' own pipeline for the kind, over this module's components (no safety checker)."""
        kwargs = {
            "vae": self.sd_vae,
            "text_encoder": self.sd_text_encoder,
            "tokenizer": self.sd_tokenizer,
            "unet": self.sd_unet,
            "scheduler": self.sd_scheduler,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
        pipe = _pipeline_class(self.config.kind)(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pipeline(self, path: str | Path) -> Path:
        """Write the components as a diffusers pipeline folder (diffusers' ``save_pretrained``: each
        component's own files and ``model_index.json``); ``from_pretrained`` and diffusers'
        ``from_pretrained`` read it back. The super link is not in it (see ``link_state_dict``)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        with _no_progress_bars():
            self.pipeline().save_pretrained(out)
        return out

    def link_state_dict(self) -> dict[str, torch.Tensor]:
        """The super-link weights (``emb_proj.*``, ``llm2sd_mapper_queries``, ``llm2sd_mapper.*``),
        named relative to this module: what a checkpoint stores besides the pipeline folder."""
        prefixes = ("emb_proj.", "llm2sd_mapper.")
        return {
            k: v
            for k, v in self.state_dict().items()
            if k.startswith(prefixes) or k == "llm2sd_mapper_queries"
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The super link's parameters, and the UNet's when the config trains it (``__init__`` freezes
        the rest)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side (8 for SD 1.5), as the pipelines compute it."""
        return 2 ** (len(self.sd_vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ conditioning

    def condition(self, states: torch.Tensor) -> torch.Tensor:
        """states [n, S, H] (the query slots' hidden states) -> the UNet's condition [n, num_queries, C]."""
        weight = self.emb_proj[0].weight
        if states.dim() != 3 or states.shape[-1] != weight.shape[1]:
            raise InputError(
                f"states: must be [n, S, {weight.shape[1]}] (the LLM's hidden size), got {list(states.shape)}"
            )
        source = self.emb_proj(states.to(device=weight.device, dtype=weight.dtype))
        queries = self.llm2sd_mapper_queries.expand(states.shape[0], -1, -1)
        return self.llm2sd_mapper(src=source, tgt=queries)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], length: int) -> torch.Tensor:
        """The frozen text encoder's last hidden states of ``texts``, padded / truncated to ``length``
        tokens, as the pipelines encode prompts: [len(texts), length, C]."""
        inputs = self.sd_tokenizer(
            list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        device = self.sd_text_encoder.device
        mask = None
        if getattr(self.sd_text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(device)
        return self.sd_text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]

    def null_condition(self, n: int) -> torch.Tensor:
        """The empty prompt's embedding, padded to ``num_queries`` tokens, for n routes: [n, Q, C]
        (the unconditional branch the pipelines guide against)."""
        return self.encode_text([""], self.config.num_queries).expand(n, -1, -1)

    # ------------------------------------------------------------------ training

    def loss(
        self,
        states: torch.Tensor,
        output_images: torch.Tensor,
        captions: Sequence[str | None] | None = None,
        input_images: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """The denoising loss of n routes. ``states`` [n, S, H]; ``output_images`` [n, 3, h, w] in
        [-1, 1] (the targets); ``input_images`` the same for the images to edit (``edit`` only);
        ``captions`` one per route (a caption loss only when none is None). Random draws, in this
        order: VAE posterior sample, noise, timesteps, then (cfg_drop_rate > 0) one uniform per
        route, from ``generator`` (else the global generator of the VAE's device)."""
        n = states.shape[0]
        _check_images("output_images", output_images, n)
        edit = self.config.kind == "edit"
        if edit:
            if input_images is None:
                raise InputError("input_images: required for an edit ([EDIT]) loss")
            _check_images("input_images", input_images, n)
            if input_images.shape != output_images.shape:
                raise InputError(
                    f"input_images: shape {list(input_images.shape)} != output_images {list(output_images.shape)}"
                )
        if captions is not None and len(captions) != n:
            raise InputError(f"captions: {len(captions)} for {n} routes")
        with_captions = captions is not None and all(c is not None for c in captions)
        length = self.sd_tokenizer.model_max_length
        if with_captions and length != self.config.num_queries:  # the MSE compares them token by token
            raise InputError(
                f"captions: a caption loss needs {DECODER_OF[self.config.kind]}.num_queries == the tokenizer's "
                f"model_max_length ({length}), got {self.config.num_queries}"
            )

        condition = self.condition(states)
        vae = self.sd_vae
        with torch.no_grad():  # the VAE is frozen: no graph through it
            posterior = vae.encode(output_images.to(vae.device, vae.dtype)).latent_dist
            latents = posterior.sample(generator=generator) * vae.config.scaling_factor
            # as upstream's InstructPix2Pix (and the diffusers pipeline): the mode, unscaled
            image_latents = (
                vae.encode(input_images.to(vae.device, vae.dtype)).latent_dist.mode() if edit else None
            )
        device = latents.device
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = _draw(
            lambda d: torch.randint(0, steps, (n,), generator=generator, device=d), generator, device
        )

        unet_condition = condition
        rate = self.config.cfg_drop_rate
        if rate > 0:
            p = _draw(lambda d: torch.rand(n, generator=generator, device=d), generator, device)
            null = self.null_condition(n).to(device=condition.device, dtype=condition.dtype)
            unet_condition = torch.where((p < 2 * rate).to(condition.device)[:, None, None], null, condition)
            if edit:  # the image is dropped for r <= p < 3r (both dropped for r <= p < 2r)
                keep = 1.0 - ((p >= rate) & (p < 3 * rate)).to(image_latents.dtype)
                image_latents = image_latents * keep[:, None, None, None]

        model_input = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if edit:
            model_input = torch.cat([model_input, image_latents], dim=1)
        unet = self.sd_unet
        prediction = unet(
            model_input.to(unet.dtype), timesteps, encoder_hidden_states=unet_condition.to(unet.dtype)
        ).sample
        image_loss = F.mse_loss(prediction.float(), noise.float())

        caption_loss = None
        loss = image_loss
        if with_captions:
            target = self.encode_text([str(c) for c in captions], length)
            caption_loss = F.mse_loss(condition.float(), target.to(condition.device).float())
            loss = image_loss + CAPTION_WEIGHT * caption_loss
        return DiffusionLoss(loss=loss, image_loss=image_loss, caption_loss=caption_loss)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        states: torch.Tensor,
        input_images: Sequence[Image.Image] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[Image.Image]:
        """One PIL image per route: diffusers' pipeline called with ``prompt_embeds=condition(states)``.

        ``gen``: ``height`` / ``width`` default to the pipeline's (the UNet's sample size times the
        VAE factor: 512 for SD 1.5). ``edit``: ``input_images`` (one per route) are the images to
        edit, converted to RGB; the result has their size (the pipeline resizes all to the first
        one's, rounded down to a multiple of the VAE factor), or ``height`` x ``width`` when given
        (the inputs are resized to it first, bilinear). Unset settings come from the config."""
        config = self.config
        condition = self.condition(states)
        n = condition.shape[0]
        kwargs: dict[str, Any] = {
            "prompt_embeds": condition,
            "num_inference_steps": (
                config.num_inference_steps if num_inference_steps is None else num_inference_steps
            ),
            "guidance_scale": config.guidance_scale if guidance_scale is None else guidance_scale,
            "generator": generator,
            "output_type": "pil",
        }
        if config.kind == "gen":
            kwargs.update(height=height, width=width)
        else:
            if input_images is None or len(input_images) != n:
                got = "none" if input_images is None else len(input_images)
                raise InputError(f"input_images: an edit needs one image per route ({n}), got {got}")
            images = []
            for i, image in enumerate(input_images):
                # an RGBA image would reach the pipeline as 4 channels, which it takes for latents
                image = image.convert("RGB")
                if height is not None or width is not None:
                    image = image.resize((width or image.width, height or image.height), Image.BILINEAR)
                if min(image.size) < self.vae_factor:  # the pipeline rounds the size down to 0
                    raise InputError(
                        f"input_images[{i}]: {image.width}x{image.height} pixels, a side under the VAE's "
                        f"{self.vae_factor}"
                    )
                images.append(image)
            kwargs.update(
                image=images,
                image_guidance_scale=(
                    config.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
                ),
            )
        with _quiet_scheduler():  # the Euler schedulers' set_timesteps warns as their __init__
            return self.pipeline()(**kwargs).images


def _check_images(name: str, images: torch.Tensor, n: int) -> None:
    if images.dim() != 4 or images.shape[0] != n or images.shape[1] != 3:
        raise InputError(f"{name}: must be [{n}, 3, h, w] (one per route), got {list(images.shape)}")


def _draw(sample: Any, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``sample(device)`` on the generator's device (a CPU generator cannot fill a CUDA tensor), moved
    to ``device``; on ``device`` itself without a generator."""
    where = generator.device if generator is not None else device
    return sample(where).to(device)


def _scheduler_class(index: dict[str, Any], folder: Path) -> type:
    entry = index.get("scheduler") if isinstance(index, dict) else None
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers" else None
    if not isinstance(name, str):
        raise CheckpointError(f"{folder / 'model_index.json'}: no diffusers scheduler entry")
    import diffusers

    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise CheckpointError(f"{folder / 'model_index.json'}: unknown scheduler class {name!r}")
    return found


# ---------------------------------------------------------------------------- target images


def output_image_tensor(image: Image.Image, config: DiffusionLinkConfig) -> torch.Tensor:
    """An image as the loss takes it, [3, r, r] in [-1, 1] (r = ``config.image_size``), preprocessed as
    upstream's datasets do: ``gen`` pads the target to a square on white (image centred) first; then
    (both kinds, and both images of an edit) the shortest side is resized to r (bilinear) and the
    centre r x r cropped, as torchvision's Resize(r) + CenterCrop(r) on a PIL image."""
    size = config.image_size
    image = image.convert("RGB")
    if config.kind == "gen":
        image = _expand_to_square(image, (255, 255, 255))
    w, h = image.size
    short, long = min(w, h), max(w, h)
    resized_long = int(size * long / short)  # torchvision truncates the long side
    new_w, new_h = (size, resized_long) if w <= h else (resized_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (pixels - 0.5) / 0.5


def _expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square canvas of ``fill`` whose side is its longer side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


# ---------------------------------------------------------------------------- tiny offline pipeline


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for bytes, in CLIP's vocab order:
    bytes that are printable Latin-1 stand for themselves, the others map to chr(256 + k)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


# a few merges so the tokenizer really merges (the byte symbols alone would cover any text)
TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>")]


def _write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer in the layout of SD 1.5's ``tokenizer/`` folder (vocab.json, merges.txt,
    configs): CLIP's vocabulary layout (byte symbols, their end-of-word forms, merges, then
    ``<|startoftext|>`` / ``<|endoftext|>``) over a handful of merges."""
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in TINY_MERGES)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges = "".join(f"{a} {b}\n" for a, b in TINY_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, **specials}, indent=2) + "\n"
    )


def make_tiny_pipeline(path: str | Path, kind: str = "gen", seed: int = 0, sample_size: int = 32) -> Path:
    """A random-weight diffusers pipeline folder small enough for CPU tests, made offline (1.7 MB,
    well under a second): a UNet2DConditionModel with channels (16, 32), one cross-attention
    block each way, cross_attention_dim 32, ``sample_size`` latents and in_channels 4 (``gen``) or 8
    (``edit``); a two-block AutoencoderKL (downsampling factor 2, 4 latent channels), so images of
    2 * ``sample_size`` pixels (64 by default); a 2-layer CLIPTextModel of width 32 with 77
    positions and the tokenizer of :func:`_write_tiny_tokenizer`; SD 1.5's scheduler config
    (PNDM) for ``gen``, InstructPix2Pix's (Euler ancestral, same betas) for ``edit``. The global
    random state is left as it was."""
    if kind not in KINDS:
        raise ConfigError(f"sd.kind: must be 'gen' or 'edit', got {kind!r}")
    out = Path(path)
    _write_tiny_tokenizer(out / "tokenizer")
    with _no_progress_bars():
        return _save_tiny(out, kind, seed, sample_size)


def _save_tiny(out: Path, kind: str, seed: int, sample_size: int) -> Path:
    from diffusers import EulerAncestralDiscreteScheduler, PNDMScheduler

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4 if kind == "gen" else 8,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=2 * sample_size,
        )
        _like_a_trained_vae(vae, 2 * sample_size)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    with _quiet_scheduler():
        if kind == "gen":  # runwayml/stable-diffusion-v1-5's scheduler_config.json
            scheduler = PNDMScheduler(
                **SD15_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
            )
        else:  # timbrooks/instruct-pix2pix's
            scheduler = EulerAncestralDiscreteScheduler(**SD15_BETAS)
    pipe = _pipeline_class(kind)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # a downloaded pipeline's layout: model_index.json and one folder per component; the tokenizer
    # keeps its vocab.json / merges.txt (save_pretrained would write tokenizer.json instead)
    pipe.save_config(out)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    return out


@torch.no_grad()
def _like_a_trained_vae(vae: AutoencoderKL, size: int) -> None:
    """Give a random VAE the two properties of a trained one that training relies on. Its posterior is
    nearly a point: a trained VAE's log-variances sit far below 0, a random one's near 0 (std 1),
    which would bury every target image in sampling noise; the log-variance half of ``quant_conv`` is
    set to -10 (std e^-5). And its scaled latents have unit variance: SD 1.5's ``scaling_factor``
    (0.18215) is 1 / the std of its latents; here it is measured on smooth random images."""
    half = vae.quant_conv.out_channels // 2
    vae.quant_conv.weight[half:] = 0
    vae.quant_conv.bias[half:] = -10.0
    probe = F.interpolate(torch.rand(8, 3, 8, 8) * 2 - 1, size=(size, size), mode="bilinear")
    std = vae.encode(probe).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
