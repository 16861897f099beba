"""ONNX export of an InternVL / Mono-InternVL checkpoint, and generation on the export with ONNX Runtime.

``export_onnx(MODEL_DIR, OUT)`` (``interleaf export-onnx``) writes three fp32 graphs, the weights of
large ones in ``<graph>.onnx.data`` beside them:

    vision_encoder.onnx  pixel_values [N, 3, 448, 448] -> image_features [N, 256, H]
                         (InternViT + pixel shuffle + mlp1; Mono-InternVL: its patch embedding + mlp1)
    embed_tokens.onnx    input_ids [B, S] (int64) -> inputs_embeds [B, S, H]
    decoder_model.onnx   inputs_embeds [B, S, H], attention_mask [B, P + S] (int64 1/0, left padding),
                         position_ids [B, S] (int64), (Mono-InternVL: visual_mask [B, S] bool,)
                         past_key_values.{i}.key / .value [B, n_kv, P, d] for every layer i
                      -> logits [B, V] (the last position's), present.{i}.key / .value [B, n_kv, P + S, d]

plus the checkpoint's ``config.json`` (InternVL-Chat layout) and tokenizer, and ``interleaf_onnx.json``
(what was exported, and how). One decoder graph serves the prefill (P = 0) and every decode step
(S = 1); the caller places the image features at the ``<IMG_CONTEXT>`` positions of the token
embeddings, as the model does, and for Mono-InternVL marks those positions in ``visual_mask`` (the
graph routes them to the visual experts by index, each expert on its own tokens).

:class:`OnnxModel` runs an export with ONNX Runtime on the CPU; ``ChatModel.from_pretrained(OUT)`` (so
``interleaf chat OUT`` and ``interleaf eval run --model OUT``) answers with it, through the same prompts,
tiling, sampling and stop rules as the PyTorch engine (:func:`~interleaf.generation.engine.decode_steps`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from interleaf.errors import CheckpointError, InputError
from interleaf.generation.engine import (
    GenerationConfig,
    StepGenerator,
    decode_steps,
)

MANIFEST = "interleaf_onnx.json"
FORMAT = "interleaf-onnx"
VERSION = 1
GRAPHS = {"vision": "vision_encoder.onnx", "embed": "embed_tokens.onnx", "decoder": "decoder_model.onnx"}
QUANTIZATIONS = {"int4": 4, "int8": 8}  # weight-only, the decoder's linear layers
QUANT_BLOCK = 32  # input channels per scale


def is_onnx_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_onnx`."""
    return (Path(path) / MANIFEST).is_file()


def export_summary(path: str | Path) -> str:
    """One line on an export's graphs (for ``interleaf info``)."""
    path = Path(path)
    manifest = read_manifest(path)
    files = [f for f in path.iterdir() if f.name.endswith((".onnx", ".onnx.data"))]
    size_gb = sum(f.stat().st_size for f in files) / 1e9
    graphs = ", ".join(manifest["graphs"].values())
    quant = manifest.get("quantization")
    how = f", decoder int{quant['bits']} weight-only" if quant else ""
    return f"ONNX export ({graphs}{how}), {size_gb:.3f} GB, {manifest.get('dtype', '?')}"


def _require(*modules: str) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(
                f"ONNX support needs the '{name}' package: pip install 'interleaf[onnx]'"
            ) from None


# ----------------------------------------------------------------------------------------------------
# the exported modules


class _ConcatCache:
    """Stands in for :class:`~interleaf.model.cache.KVCache` inside the exported decoder: each layer's new
    keys/values are appended to the past ones given as inputs, and the results are the graph's outputs."""

    full_attention = False

    def __init__(self, past: Sequence[torch.Tensor]) -> None:
        self.past = list(past)
        self.present = list(past)
        self.length = past[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position, kv_len):
        i = 2 * layer_idx
        self.present[i] = torch.cat([self.past[i], k], dim=2)
        self.present[i + 1] = torch.cat([self.past[i + 1], v], dim=2)
        return self.present[i], self.present[i + 1]


class _Vision(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.extract_feature(pixel_values)


class _Embed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.language_model.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class _Decoder(nn.Module):
    """The LLM over ``inputs_embeds`` with an explicit past: causal attention over the past and the new
    tokens, padding keys (``attention_mask`` 0) hidden, exactly the model's own mask."""

    def __init__(self, model: nn.Module, mono: bool) -> None:
        super().__init__()
        self.lm = model.language_model
        self.mono = mono

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        from interleaf.model.llm import causal_mask

        visual_mask, past = (rest[0], rest[1:]) if self.mono else (None, rest)
        cache = _ConcatCache(past)
        s, total = inputs_embeds.shape[1], attention_mask.shape[1]
        mask = causal_mask(total, torch.arange(total - s, total), attention_mask.bool())
        if visual_mask is not None:
            from interleaf.model.mono_internvl import modality_route

            modality_route(visual_mask, in_graph=True)  # the layers find it on the mask
        out = self.lm(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
            kv_cache=cache, visual_mask=visual_mask, logits_to_keep=1,
        )  # fmt: skip
        return (out.logits[:, -1], *cache.present)


# ----------------------------------------------------------------------------------------------------
# export


QUIET_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript", "onnxruntime.quantization")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter and the quantizer report progress on stdout and at INFO (every node, every pass), and
    warn about optional operator sets (torchvision): only errors get through."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], shapes: dict, path: Path):
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamic_shapes=shapes, input_names=names, output_names=outputs,
            dynamo=True, optimize=True, verbose=False,
        )  # fmt: skip
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        program.save(str(path))


def _past_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    check: bool = True,
    quantize: str | None = None,
    accuracy_level: int = 4,
) -> dict[str, Any]:
    """Export the checkpoint ``model_dir`` (either layout, InternVL or Mono-InternVL) to ``out_dir`` as
    described in the module docstring; returns the manifest. ``check`` runs each graph once with ONNX
    Runtime against the PyTorch model and records the largest differences in the manifest.

    ``quantize`` (``"int4"`` or ``"int8"``): the decoder's linear layers (lm_head included) as ONNX
    Runtime's ``MatMulNBits``, weights rounded to the nearest level of a symmetric scale per block of
    32 input channels; activations stay fp32. ``accuracy_level``: ONNX Runtime's compute type for them
    (4: int8 products, the fast one on CPU; 0: fp32 on the dequantized weights, exact but slower). The
    check then compares the decoder with the PyTorch model on the dequantized weights.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"accuracy_level must be 0..4 (ONNX Runtime's), got {accuracy_level!r}")
    _require("onnx", "onnxscript", *(["onnxruntime"] if quantize else []))
    from torch.export import Dim

    from interleaf.model.checkpoint import load_checkpoint
    from interleaf.model.mono_internvl import MonoInternVLChatModel

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.resolve() == Path(model_dir).resolve():
        raise InputError(f"{out}: the export would overwrite the checkpoint's own files")
    model, tokenizer = load_checkpoint(model_dir, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # written last: a half-written folder is not an export
    cfg, llm = model.config, model.config.llm
    mono = isinstance(model, MonoInternVLChatModel)
    n = llm.num_hidden_layers
    gen = torch.Generator().manual_seed(0)

    size = cfg.image_size
    pixels = torch.randn(2, 3, size, size, generator=gen)
    _export(_Vision(model), (pixels,), ["pixel_values"], ["image_features"],
            {"pixel_values": {0: Dim("tiles")}}, out / GRAPHS["vision"])  # fmt: skip

    ids = torch.randint(0, llm.vocab_size, (2, 3), generator=gen)
    _export(_Embed(model), (ids,), ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: Dim("batch"), 1: Dim("seq")}}, out / GRAPHS["embed"])  # fmt: skip

    batch, seq, past_len, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    example = _decoder_example(model, mono, batch=2, seq=3, past=2, gen=gen)
    names = ["inputs_embeds", "attention_mask", "position_ids", *(["visual_mask"] if mono else [])]
    per_token = {0: batch, 1: seq}
    shapes = {
        "inputs_embeds": per_token,
        "attention_mask": {0: batch, 1: total},
        "position_ids": per_token,
        "rest": ((per_token,) if mono else ())
        + ({0: batch, 2: past_len},) * (2 * n),  # (visual_mask,) + past
    }
    _export(_Decoder(model, mono), example, names + _past_names(n, "past_key_values"),
            ["logits", *_past_names(n, "present")], shapes, out / GRAPHS["decoder"])  # fmt: skip

    if quantize:
        _quantize_graph(out / GRAPHS["decoder"], QUANTIZATIONS[quantize], accuracy_level)
    (out / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2, ensure_ascii=False) + "\n")
    tokenizer.save_pretrained(str(out))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": "mono-internvl" if mono else "internvl",
        "dtype": "float32",
        "graphs": GRAPHS,
        "num_hidden_layers": n,
        "num_key_value_heads": llm.num_key_value_heads,
        "head_dim": llm.head_dim,
        "hidden_size": llm.hidden_size,
        "source": str(model_dir),
        "torch": torch.__version__,
    }
    if quantize:
        manifest["quantization"] = {
            "graphs": ["decoder"],
            "op": "MatMulNBits",
            "bits": QUANTIZATIONS[quantize],
            "block_size": QUANT_BLOCK,
            "symmetric": True,
            "accuracy_level": accuracy_level,
        }
    if check:
        manifest["check"] = _check(model, mono, out, manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _quantize_graph(path: Path, bits: int, accuracy_level: int) -> None:
    """Rewrite the graph at ``path`` with its MatMul weights as ``MatMulNBits`` (weight-only, symmetric,
    round to nearest, one scale per ``QUANT_BLOCK`` input channels)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=accuracy_level, bits=bits
    )
    with _quiet_exporter():
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(path)), algo_config=config)
        quantizer.process()
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        onnx.save_model(
            quantizer.model.model, str(path), save_as_external_data=True,
            all_tensors_to_one_file=True, location=path.name + ".data",
        )  # fmt: skip


def dequantize_nbits(
    packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int
) -> np.ndarray:
    """The weight [N, K] of a symmetric ``MatMulNBits`` (no zero points: the level ``2^(bits-1)`` is 0):
    ``packed`` uint8 [N, blocks, block * bits / 8] (4 bits: low nibble first), ``scales`` [N * blocks]."""
    blocks = -(-k // block)
    packed = packed.reshape(n, blocks, block * bits // 8)
    if bits == 4:
        levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block)
    else:
        levels = packed.reshape(n, blocks, block)
    weight = (levels.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(n, blocks, 1)
    return weight.reshape(n, blocks * block)[:, :k]


def dequantized_weights(path: Path, lm: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a quantized graph computes with, by the name of the ``lm`` linear layer each replaces
    (the one of that shape it is closest to: within a quantization step of it)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    linears = {name: m.weight.detach() for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise CheckpointError(f"{path}: {node.name} has zero points (not a symmetric quantization)")
        scales = numpy_helper.to_array(inits[node.input[2]])
        weight = torch.from_numpy(
            dequantize_nbits(
                numpy_helper.to_array(inits[node.input[1]]),
                scales,
                attrs["K"],
                attrs["N"],
                attrs["bits"],
                attrs["block_size"],
            )
        )
        errors = {
            name: float((w.float() - weight).abs().max())
            for name, w in linears.items()
            if w.shape == weight.shape and name not in out
        }
        best = min(errors, key=errors.get, default=None)
        if best is None or errors[best] > float(scales.max()):
            raise CheckpointError(f"{path}: {node.name} matches no linear layer of the model")
        out[best] = weight
    return out


def _decoder_example(model, mono: bool, batch: int, seq: int, past: int, gen: torch.Generator) -> tuple:
    llm = model.config.llm
    embeds = torch.randn(batch, seq, llm.hidden_size, generator=gen) * 0.02
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, 0] = 0  # one padded slot, so the padding path is traced too
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [
        torch.randn(batch, llm.num_key_value_heads, past, llm.head_dim, generator=gen)
        for _ in range(2 * llm.num_hidden_layers)
    ]
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[:, 1:-1] = True  # image tokens between text ones
    return (embeds, mask, positions, *([visual] if mono else []), *kv)


def _check(model, mono: bool, out: Path, manifest: dict) -> dict[str, float]:
    """Largest |ONNX Runtime - PyTorch| of each graph's outputs on fresh random inputs (other shapes
    than the traced ones)."""
    onnx_model = OnnxModel(out, manifest=manifest)
    gen = torch.Generator().manual_seed(1)
    size = model.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=gen)
    ids = torch.randint(0, model.config.llm.vocab_size, (1, 5), generator=gen)
    example = _decoder_example(model, mono, batch=3, seq=4, past=5, gen=gen)
    reference = model
    if "quantization" in manifest:  # the decoder computes with the dequantized weights
        reference = copy.deepcopy(model)
        modules = dict(reference.language_model.named_modules())
        for name, weight in dequantized_weights(out / GRAPHS["decoder"], model.language_model).items():
            modules[name].weight = nn.Parameter(weight)  # its own tensor, even where lm_head was tied
    with torch.no_grad():
        want_vision = model.extract_feature(pixels)
        want_embed = model.language_model.model.embed_tokens(ids)
        want_decoder = _Decoder(reference, mono)(*example)
    got_vision = onnx_model.image_features(pixels.numpy())
    got_embed = onnx_model.run("embed", {"input_ids": ids.numpy()})[0]
    nvis = 1 if mono else 0
    got_logits, got_past = onnx_model.decoder_step(
        example[0].numpy(), example[1].numpy(), example[2].numpy(),
        [t.numpy() for t in example[3 + nvis :]], example[3].numpy() if mono else None,
    )  # fmt: skip

    def diff(got, want) -> float:
        return float(np.abs(got - want.numpy()).max())

    return {
        "vision": diff(got_vision, want_vision),
        "embed": diff(got_embed, want_embed),
        "decoder_logits": diff(got_logits, want_decoder[0]),
        "decoder_present": max(diff(g, w) for g, w in zip(got_past, want_decoder[1:])),
    }


# ----------------------------------------------------------------------------------------------------
# running an export


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked ``interleaf_onnx.json`` of the export folder ``path``."""
    path = Path(path)
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an ONNX export (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an interleaf ONNX manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{file}: export format version {manifest.get('version')!r}; this interleaf reads {VERSION}"
        )
    for key in ("model", "graphs", "num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size"):
        if key not in manifest:
            raise CheckpointError(f"{file}: no field {key!r}")
    if not isinstance(manifest["graphs"], dict):
        raise CheckpointError(f"{file}: field 'graphs' must map graph names to files")
    return manifest


class OnnxModel:
    """An export of :func:`export_onnx` loaded in ONNX Runtime (CPU).

    Attributes:
        config: the checkpoint's ``InternVLConfig``; tokenizer: its tokenizer; manifest: the export's.
        device: ``cpu`` (inputs and outputs of the generator are CPU tensors).
    """

    def __init__(
        self, path: str | Path, threads: int | None = None, manifest: dict[str, Any] | None = None
    ) -> None:
        """``threads``: ONNX Runtime's intra-op threads (default: torch's thread count)."""
        _require("onnxruntime")
        import onnxruntime as ort

        from interleaf.model.checkpoint import load_config, load_model_tokenizer

        path = Path(path)
        self.path = path
        self.manifest = manifest or read_manifest(path)
        self.config = load_config(path)
        self.tokenizer = load_model_tokenizer(path, self.config)
        self.mono = self.manifest["model"] == "mono-internvl"
        self.device = torch.device("cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as the PyTorch engine
        self.sessions = {}
        for key, name in GRAPHS.items():
            file = path / self.manifest["graphs"].get(key, name)
            if not file.is_file():
                raise CheckpointError(f"{file}: missing from the ONNX export")
            try:
                self.sessions[key] = ort.InferenceSession(
                    str(file), options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, reported as one line
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"{file}: ONNX Runtime cannot load it ({first})") from None
        self.num_layers = int(self.manifest["num_hidden_layers"])
        self.num_kv_heads = int(self.manifest["num_key_value_heads"])
        self.head_dim = int(self.manifest["head_dim"])
        self.generator = OnnxGenerator(self)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, feeds)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] -> [N, num_image_token, hidden]."""
        return self.run("vision", {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]

    def embed(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings [B, S, H] with the tiles' image features at the ``<IMG_CONTEXT>`` positions."""
        embeds = self.run("embed", {"input_ids": input_ids.astype(np.int64)})[0]
        if pixel_values is None:
            return embeds
        from interleaf.model.internvl import check_image_tokens

        ctx, per_tile = self.config.image_token_id, self.config.num_image_token
        positions = np.flatnonzero(input_ids.reshape(-1) == ctx)
        n_tiles = pixel_values.shape[0]
        check_image_tokens(positions.size, n_tiles * per_tile, n_tiles, ctx, per_tile)
        flat = embeds.reshape(-1, embeds.shape[-1])
        flat[positions] = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
        return embeds

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Keys/values of no tokens yet, [B, n_kv, 0, d] for every layer (the prefill's past)."""
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), np.float32)
        return [empty] * (2 * self.num_layers)

    def decoder_step(
        self,
        embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
        visual_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: ``(logits [B, V] of the last position, present keys/values)``."""
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
        }
        if self.mono:
            if visual_mask is None:
                visual_mask = np.zeros(embeds.shape[:2], dtype=bool)
            feeds["visual_mask"] = visual_mask.astype(bool)
        feeds.update(zip(_past_names(self.num_layers, "past_key_values"), past))
        logits, *present = self.run("decoder", feeds)
        return logits, present


class OnnxGenerator(StepGenerator):
    """:class:`~interleaf.generation.engine.Generator`'s ``generate`` / ``stream`` / ``stream_rows`` on an
    :class:`OnnxModel`: one prefill over the left-padded batch (``stream_rows`` pads the rows, as
    :meth:`StepGenerator.stream_padded`), then one decoder call per step, tokens picked by the engine's
    own :func:`~interleaf.generation.engine.decode_steps`."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.device = model.device

    def _run(self, input_ids, attention_mask, pixel_values, cfg: GenerationConfig, record):
        model = self.model
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b = input_ids.shape[0]
        if cfg.max_new_tokens == 0:
            if record is not None:
                record.finish_reasons = ["length"] * b
            return
        t0 = time.perf_counter()
        ids = input_ids.numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.numpy().astype(np.int64)
        px = None if pixel_values is None else pixel_values.float().numpy()
        embeds = model.embed(ids, px)
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        visual = ids == model.config.image_token_id if model.mono else None
        logits, past = model.decoder_step(embeds, mask, positions, model.empty_past(b), visual)
        first = mask.sum(-1, keepdims=True)  # the first generated token's position
        state = {"past": past, "mask": mask}

        def step(nxt: torch.Tensor, i: int) -> torch.Tensor:
            state["mask"] = np.concatenate([state["mask"], np.ones((b, 1), np.int64)], axis=1)
            step_embeds = model.embed(nxt.numpy().reshape(b, 1))
            out, state["past"] = model.decoder_step(step_embeds, state["mask"], first + i, state["past"])
            return torch.from_numpy(out)

        yield from decode_steps(torch.from_numpy(logits), step, cfg, record, t0)
