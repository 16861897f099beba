"""LCL: vision pretraining on interleaved image-text data by latent compression (arXiv 2406.07543).

A vision encoder is trained from scratch together with a causal language model that reads image
latents in place inside text. Maximising the mutual information between the causal model's inputs
and outputs splits into two terms (the paper's Eq. 5):

- **contrastive**: the causal model's output at each ``<start_of_img>`` token (a summary of the
  context *before* the image) is matched, by symmetric InfoNCE over the batch, with the pooled latent
  of the image that follows;
- **generation**: next-token cross-entropy on the text, which is conditioned on the image tokens.

Architecture (OpenCLIP towers, as the official code builds them; parameter names match its
checkpoints: ``visual.*``, ``text.*``, ``pool_project.*``, ``lm_head.{0,1}``, ``logit_scale``)::

    pixels [N, 3, S, S] -> visual (ViT: conv1, class token, ln_pre, pre-LN blocks, ln_post)
        -> patch tokens [N, P, Wv] (class token dropped)
        -> pool_project: attentive pooling with one query -> image latent [N, D]
                         value projection of every token  -> image tokens [N, P, D]
    ids [B, T] with <img_placehold> x P per image -> text token embeddings, image tokens in place
        -> text (causal transformer, learned positions) -> hidden [B, T, Wt]
        -> lm_head (LayerNorm + Linear) for generation; ln_final + text_projection at <soi> for contrast

Sequences: an image is ``<start_of_img> <img_placehold> x P <end_of_img>``; text runs from
``<start_of_text>`` to ``<end_of_text>``; pad id 0. D == Wt (the text width), as in every released config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.errors import CheckpointError, ConfigError, InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation, as LCL trains
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>", "<img_placehold>", "<start_of_img>", "<end_of_img>")


@dataclass
class LCLConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12  # OpenCLIP: width // 64
    mlp_ratio: float = 4.0
    vocab_size: int = 49411  # CLIP BPE (49408) + <img_placehold>, <start_of_img>, <end_of_img>
    context_length: int = 280
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 12
    embed_dim: int = 768  # text_projection output and pooled latent size
    pool_heads: int = 12
    init_logit_scale: float = math.log(1 / 0.07)
    special_token_ids: dict[str, int] = field(
        default_factory=lambda: dict(zip(SPECIAL_TOKENS, (49406, 49407, 49408, 49409, 49410)))
    )
    pad_id: int = 0

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self) -> None:
        missing = [t for t in SPECIAL_TOKENS if t not in self.special_token_ids]
        if missing:
            raise ConfigError(f"LCL config: special_token_ids lacks {missing[0]!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"LCL config: image_size {self.image_size} is not a multiple of {self.patch_size}"
            )
        for name, width, heads in (
            ("vision", self.vision_width, self.vision_heads),
            ("text", self.text_width, self.text_heads),
            ("pool", self.embed_dim, self.pool_heads),
        ):
            if width % heads:
                raise ConfigError(f"LCL config: {name} width {width} is not divisible by {heads} heads")

    def id(self, token: str) -> int:
        return self.special_token_ids[token]

    @classmethod
    def from_dict(cls, d: dict) -> LCLConfig:
        """Our ``config.json`` or the official model config (``LCL_ViT-B-16_laion.json`` layout:
        ``embed_dim``, ``vision_cfg``, ``text_cfg``, ``pool_project_cfg``, ``special_token_ids``)."""
        if "vision_cfg" in d:
            v, t, p = d["vision_cfg"], d["text_cfg"], d.get("pool_project_cfg", {})
            if p.get("pool_proj_type", "attn") != "attn":
                raise ConfigError(f"LCL config: pool_proj_type {p['pool_proj_type']!r} (only 'attn' exists)")
            embed = d["embed_dim"]
            if p.get("output_dim", embed) != embed or t.get("width", 512) != embed:
                raise ConfigError("LCL config: pool output_dim, text width and embed_dim must be equal")
            d = {
                "image_size": v.get("image_size", 224),
                "patch_size": v.get("patch_size", 16),
                "vision_width": v.get("width", 768),
                "vision_layers": v.get("layers", 12),
                "vision_heads": v.get("width", 768) // v.get("head_width", 64),
                "mlp_ratio": v.get("mlp_ratio", 4.0),
                "vocab_size": t.get("vocab_size", 49411),
                "context_length": t.get("context_length", 77),
                "text_width": t.get("width", 512),
                "text_heads": t.get("heads", 8),
                "text_layers": t.get("layers", 12),
                "embed_dim": embed,
                "pool_heads": p.get("attn_num_heads", 8),
                "special_token_ids": d.get("special_token_ids") or LCLConfig().special_token_ids,
            }
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"LCL config: unknown key {unknown[0]!r}")
        return cls(**d)


LCL_PRESETS: dict[str, dict] = {
    # the official model configs
    "lcl-vit-b-16-laion": {},
    "lcl-vit-b-32-laion": dict(patch_size=32, context_length=128, text_width=512, text_heads=8, embed_dim=512, pool_heads=8),
    "lcl-vit-b-32-mmc4": dict(patch_size=32, context_length=2048, text_width=512, text_heads=8, embed_dim=512, pool_heads=8),
    # random-weight test size; vocab and special ids set where the tokenizer is known
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4, context_length=128,
                 text_width=64, text_heads=4, text_layers=2, embed_dim=64, pool_heads=4),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# towers (OpenCLIP layout)


class MultiheadAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight`` [3W, W],
    ``in_proj_bias``, ``out_proj``), run with scaled-dot-product attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:  # x: [B, T, W]
        b, t, w = x.shape
        # the head size spelled out: -1 is ambiguous for a batch of no images
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


class VisionTower(nn.Module):
    """OpenCLIP's ViT without its output projection; returns the patch tokens after ``ln_post``."""

    def __init__(self, cfg: LCLConfig) -> None:
        super().__init__()
        w, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(w)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, 3, S, S] -> [N, P, Wv]
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 1:]


class TextTower(nn.Module):
    """OpenCLIP's causal text transformer; ``forward`` takes input embeddings (images in place)."""

    def __init__(self, cfg: LCLConfig) -> None:
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.embed_dim))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # [B, T, Wt] -> [B, T, Wt]
        x = embeds + self.positional_embedding[: embeds.shape[1]].to(embeds.dtype)
        return self.transformer(x, causal=True)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_final(hidden) @ self.text_projection


class CrossAttention(nn.Module):
    def __init__(self, dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, out_dim, bias=False)
        self.k = nn.Linear(dim, out_dim, bias=False)
        self.v = nn.Linear(dim, out_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(out_dim))
        self.k_bias = nn.Parameter(torch.zeros(out_dim))
        self.v_bias = nn.Parameter(torch.zeros(out_dim))
        self.proj = nn.Linear(out_dim, out_dim, bias=False)


class AttentivePooler(nn.Module):
    def __init__(self, dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim)
        self.norm1_k = nn.LayerNorm(dim)
        self.norm1_v = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, out_dim, heads)


class AttentivePoolingProjection(nn.Module):
    """One learned query attends over the patch tokens (pooled latent); the value projection of each
    token (``proj(v(norm1_v(x)))``) gives the image tokens the text model reads."""

    def __init__(self, dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pooler = AttentivePooler(dim, out_dim, heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [N, P, Wv]
        p, a = self.pooler, self.pooler.cross_attn
        n, tokens, _ = x.shape
        q = F.linear(p.norm1_q(self.query_token.expand(n, -1, -1)), a.q.weight, a.q_bias)
        k = F.linear(p.norm1_k(x), a.k.weight, a.k_bias)
        v = F.linear(p.norm1_v(x), a.v.weight, a.v_bias)
        split = lambda t: t.view(n, t.shape[1], a.heads, t.shape[2] // a.heads).transpose(1, 2)  # noqa: E731
        pooled = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [N, heads, 1, hd]
        pooled = a.proj(pooled.transpose(1, 2).reshape(n, a.proj.in_features))  # [N, D]
        return pooled, a.proj(v)  # [N, D], [N, P, D]


# ----------------------------------------------------------------------------------------------------
# the model


@dataclass
class LCLOutput:
    image_features: torch.Tensor  # [M, D] L2-normalised latents of the images with context before them
    text_features: torch.Tensor  # [M, D] L2-normalised causal outputs at their <start_of_img>
    logits: torch.Tensor  # [K, V] next-token logits at the K positions whose target is text
    labels: torch.Tensor  # [K]
    logit_scale: torch.Tensor  # exp(logit_scale)


class LCLModel(nn.Module):
    def __init__(self, cfg: LCLConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = VisionTower(cfg)
        self.text = TextTower(cfg)
        self.pool_project = AttentivePoolingProjection(cfg.vision_width, cfg.embed_dim, cfg.pool_heads)
        self.lm_head = nn.Sequential(
            nn.LayerNorm(cfg.text_width), nn.Linear(cfg.text_width, cfg.vocab_size, bias=False)
        )
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.init_weights()

    def init_weights(self) -> None:
        """OpenCLIP's initialisation: ``nn.MultiheadAttention``'s in the ViT (Xavier-uniform input
        projection, zero biases), the text tower's width- and depth-scaled normals."""
        for block in self.visual.transformer.resblocks:
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.out_proj.bias)
        width, layers = self.config.text_width, self.config.text_layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.text.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.positional_embedding, std=0.01)
        nn.init.normal_(self.text.text_projection, std=width**-0.5)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3, S, S] -> (pooled latents [N, D], image tokens [N, P, D])."""
        return self.pool_project(self.visual(pixels))

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the images' tokens at their ``<img_placehold>`` positions, images in
        the order their placeholders appear (row by row). [B, T] -> [B, T, Wt]."""
        is_img = input_ids == self.config.id("<img_placehold>")
        embeds = self.text.token_embedding(input_ids.masked_fill(is_img, 0))
        n_slots, n_tokens = int(is_img.sum()), image_tokens.shape[0] * image_tokens.shape[1]
        if n_slots != n_tokens:
            raise ValueError(f"{n_slots} <img_placehold> positions but {n_tokens} image tokens")
        return embeds.masked_scatter(is_img.unsqueeze(-1), image_tokens.to(embeds.dtype))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> LCLOutput:
        cfg = self.config
        latents, tokens = self.encode_image(pixels)
        hidden = self.text(self.embed(input_ids, tokens))
        # contrastive pairs: every <start_of_img> but one at position 0 (no context before it)
        soi = input_ids == cfg.id("<start_of_img>")
        with_context = soi.clone()
        with_context[:, 0] = False
        text_features = F.normalize(self.text.project(hidden[with_context]).float(), dim=-1)
        keep = with_context[soi]  # per image, in placeholder order
        image_features = F.normalize(latents[keep].float(), dim=-1)
        # generation: targets that are text (not image tokens, <end_of_img> or padding)
        target = input_ids[:, 1:]
        gen = (
            (target != cfg.id("<img_placehold>"))
            & (target != cfg.id("<end_of_img>"))
            & (target != cfg.pad_id)
        )
        logits = self.lm_head(hidden[:, :-1][gen])
        return LCLOutput(image_features, text_features, logits, target[gen], self.logit_scale.exp())

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled latents, [N, 3, S, S] -> [N, D] (retrieval, zero-shot use)."""
        return F.normalize(self.encode_image(pixels)[0].float(), dim=-1)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features for retrieval, [B, T] -> [B, D], as the official ``encode_text``:
        each ``<end_of_text>`` becomes ``<start_of_img>`` (text features are read where an image would
        follow), a row that has none gets one in its last position, and the feature is the causal output
        there through ``ln_final`` and ``text_projection``. Rows are ``<sot> text <eot>`` (+ padding)."""
        cfg = self.config
        soi = cfg.id("<start_of_img>")
        ids = input_ids.masked_fill(input_ids == cfg.id("<end_of_text>"), soi)
        ids[:, -1] = torch.where((ids == soi).any(dim=1), ids[:, -1], soi)
        if ((ids == soi).sum(dim=1) != 1).any():
            raise ValueError("text_features: each row needs exactly one <end_of_text>")
        hidden = self.text(self.text.token_embedding(ids))
        return F.normalize(self.text.project(hidden[ids == soi]).float(), dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` of equal-shape tensors; backward sums every rank's gradient for each part and
    hands this rank its own (the official ``GatherLayerWithoutStack``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = torch.stack(grads).contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every rank (this rank's first, as the official local loss orders them) and a
    padding mask: ranks hold different numbers of images, so each pads to the largest. Gradients
    flow back through the other ranks' features (``--gather-with-grad``, as the official scripts).
    A collective: every rank must call it, also one with no features."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    n = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    if most == 0:  # no rank has any: nothing to gather (every rank sees the same sizes)
        return features, torch.zeros(0, dtype=torch.bool, device=features.device)
    padded = torch.cat([features, features.new_zeros(most - features.shape[0], features.shape[1])])
    parts = _GatherWithGrad.apply(padded)
    rank = dist.get_rank()
    order = [rank] + [r for r in range(len(parts)) if r != rank]
    mask = [torch.arange(most, device=features.device) >= sizes[r].item() for r in order]
    return torch.cat([parts[r] for r in order]), torch.cat(mask)


def lcl_loss(
    out: LCLOutput, generation_weight: float = 1.0, contrastive_weight: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, generation, contrastive): weighted next-token cross-entropy (mean over text targets)
    and symmetric InfoNCE between this rank's pairs and every rank's (padding masked out)."""
    generation = (
        F.cross_entropy(out.logits.float(), out.labels) if out.labels.numel() else out.logits.sum() * 0
    )
    contrastive = out.logit_scale * 0
    if contrastive_weight:
        # every rank gathers, also one without pairs (an image at the start of each of its rows):
        # skipping the collective there would hang the others or pair it with their next one
        # the pairs travel together (one gather, one padding mask): [images | texts] side by side
        both, pad = gather_features(torch.cat([out.image_features, out.text_features], dim=1))
        all_image, all_text = both.split(out.image_features.shape[1], dim=1)
        if out.image_features.shape[0]:
            logits_i2t = (out.logit_scale * out.image_features @ all_text.t()).masked_fill(pad, float("-inf"))
            logits_t2i = (out.logit_scale * out.text_features @ all_image.t()).masked_fill(pad, float("-inf"))
            target = torch.arange(out.image_features.shape[0], device=logits_i2t.device)
            contrastive = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
        else:  # no pairs here, but the other ranks' backward reduces through this rank's gather too
            contrastive = contrastive + (all_text.sum() + all_image.sum()) * 0
    generation, contrastive = generation_weight * generation, contrastive_weight * contrastive
    return generation + contrastive, generation, contrastive


# ----------------------------------------------------------------------------------------------------
# checkpoints


def save_lcl(model: LCLModel, path: str | Path) -> Path:
    """``config.json`` + ``model.safetensors`` (the official parameter names)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps({"model_type": "lcl", **asdict(model.config)}, indent=2) + "\n"
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    # OpenCLIP training checkpoints (epoch_N.pt) hold DDP's "module." names
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_lcl(path: str | Path, config: str | Path | None = None) -> LCLModel:
    """An LCL checkpoint: a folder with ``config.json`` and ``model.safetensors`` (``save_lcl``), or an
    OpenCLIP weight file (``*.safetensors`` / ``*.pt`` / ``*.bin``, DDP names accepted) with the official
    model config JSON as ``config``. Missing or unexpected weights are an error naming them."""
    path = Path(path)
    if path.is_dir():
        weights = next(
            (path / n for n in ("model.safetensors", "open_clip_model.safetensors") if (path / n).exists()),
            None,
        )
        if weights is None:
            raise CheckpointError(f"{path}: no model.safetensors")
        config = config or path / "config.json"
    else:
        weights = path
    if config is None or not Path(config).is_file():
        raise CheckpointError(f"{path}: no LCL config (config.json, or pass the official model config)")
    try:
        raw = json.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config}: cannot read the LCL config ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config}: not an LCL config (a JSON {type(raw).__name__}, not an object)")
    raw.pop("model_type", None)
    for key in ("custom_text", "quick_gelu"):
        if raw.pop(key, False) and key == "quick_gelu":
            raise ConfigError(f"{config}: quick_gelu LCL models are not supported")
    try:
        lcl_config = LCLConfig.from_dict(raw)
    except (KeyError, TypeError, AttributeError) as exc:  # an official layout lacking a section, ...
        raise CheckpointError(f"{config}: not an LCL config ({type(exc).__name__}: {exc})") from None
    model = LCLModel(lcl_config)
    state = _read_state(weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own) - {"text.attn_mask"})
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        more = len(missing) + len(extra) - 1
        raise CheckpointError(
            f"{weights}: not an LCL checkpoint for this config ({what}{f' and {more} more' if more else ''})"
        )
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{weights}: {k} has shape {tuple(state[k].shape)}, the config wants {tuple(v.shape)}"
            )
    model.load_state_dict({k: state[k] for k in own})
    return model


# ----------------------------------------------------------------------------------------------------
# the pretrained vision encoder, for other pipelines


def _vision_state_for_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``visual.*`` weights (OpenCLIP names) under transformers' ``CLIPVisionModel`` names."""
    fixed = {
        "conv1.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_pre.weight": "pre_layrnorm.weight",
        "ln_pre.bias": "pre_layrnorm.bias",
        "ln_post.weight": "post_layernorm.weight",
        "ln_post.bias": "post_layernorm.bias",
    }
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not name.startswith("visual."):
            continue
        name = name.removeprefix("visual.")
        if name in fixed:
            out[fixed[name]] = value
            continue
        _, _, i, rest = name.split(".", 3)  # transformer.resblocks.<i>.<rest>
        layer = f"encoder.layers.{i}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.removeprefix("attn.in_proj_")  # weight | bias: q, k, v stacked
            for proj, part in zip("qkv", value.chunk(3)):
                out[f"{layer}self_attn.{proj}_proj.{kind}"] = part.clone()
            continue
        for ours, theirs in block.items():
            rest = rest.replace(ours, theirs)
        out[layer + rest] = value
    return out


def _holds_lcl(folder: Path) -> bool:
    """Whether ``folder`` holds an LCL model (``save_lcl``'s or an official weight file)."""
    if (folder / "open_clip_model.safetensors").exists():
        return True
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "lcl"


def export_vision(model: LCLModel, path: str | Path) -> Path:
    """The pretrained ViT as a transformers ``CLIPVisionModel`` folder (weights, config, and the CLIP
    image processor's settings for the model's image size), so pipelines that take a CLIP vision
    tower (LLaVA-style MLLMs, as the paper evaluates LCL) load it with ``from_pretrained``. Its
    ``last_hidden_state`` after ``post_layernorm``, class token dropped, is ``model.visual``'s output."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file (the destination is a folder)")
    if _holds_lcl(path):  # its weights and config.json would be replaced by the CLIP ones
        raise InputError(f"{path}: holds an LCL model; export the ViT to another folder")
    cfg = model.config
    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=cfg.vision_width,
            intermediate_size=int(cfg.vision_width * cfg.mlp_ratio),
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
    )
    weights = _vision_state_for_hf(model.state_dict())
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    missing, unexpected = hf.load_state_dict({prefix + k: v for k, v in weights.items()}, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise CheckpointError(
            f"CLIPVisionModel layout differs: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    hf.save_pretrained(str(path))
    size = cfg.image_size
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return path
