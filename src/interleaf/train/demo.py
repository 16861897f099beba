"""``interleaf demo``: train a tiny InternVL from random weights on offline images, on a CPU, in minutes.

1. Data: scikit-learn's handwritten digits (8x8, upscaled) and PIL-drawn shapes in colours, written in
   InternVL's fine-tuning format (meta JSON + JSONL + PNG files). Single-image questions ("What digit is
   this?", "What shape is this?", "What colour is the shape?") and two-image questions
   ("Image-1: <image>\\nImage-2: <image>\\nWhich image shows the larger digit?"). The test split uses
   digit images that training never saw and freshly drawn shapes.
2. Model: a tiny InternVL-architecture model (InternViT, pixel shuffle, ``mlp1``, a Qwen2-style LLM)
   with random weights and an offline BPE tokenizer. The tile is 224 px (14 px patches -> 16x16
   patches -> 64 image tokens per image: one token per digit pixel) instead of the family's 448 so that
   the demo fits a 2-core CPU budget; ``--image-size 448`` trains the full-size tile.
3. Train with ``interleaf.train`` (packing, AdamW, cosine), save a loss-curve PNG.
4. Answer held-out questions through the chat API and report accuracy against chance.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIGIT_Q = "What digit is this?"
SHAPE_Q = "What shape is this?"
COLOUR_Q = "What colour is the shape?"
LARGER_Q = "Which image shows the larger digit? Answer Image-1 or Image-2."
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class DemoSettings:
    out: Path
    image_size: int = 224
    steps: int = 2000
    seed: int = 0
    n_pairs: int = 800
    n_shapes: int = 600
    n_test: int = 200
    digit_repeat: int = 2  # repeat_time of the single-digit questions in the meta file
    max_digits: int | None = None  # use only the first N of the 1797 digit images (tests)


# ---------------------------------------------------------------------------------------------------
# images


def shape_image(shape: str, colour: str, rng: random.Random, size: int):
    """A filled shape of a colour at a random place and scale on a light background."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.24, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    return img


# ---------------------------------------------------------------------------------------------------
# data set


def build_dataset(s: DemoSettings, log=print) -> dict[str, Any]:
    """Write train/test JSONL + images; returns paths and the test records."""
    from sklearn.datasets import load_digits

    from interleaf.eval.mini import digit_image  # 8x8 digit -> dark-on-white RGB, nearest upscale

    rng = random.Random(s.seed)
    data_dir = s.out / "data"
    img_dir = data_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    n = len(digits.target)
    order = list(range(n))
    rng.shuffle(order)
    if s.max_digits:
        order = order[: s.max_digits]
    n_test_digits = max(s.n_test, len(order) // 6)
    test_idx, train_idx = order[:n_test_digits], order[n_test_digits:]

    def save_digit(i: int) -> str:
        name = f"images/digit_{i:04d}.png"
        if not (data_dir / name).exists():
            digit_image(digits.images[i], s.image_size).save(data_dir / name)
        return name

    def digit_samples(indices, k_pairs, split):
        out = []
        for i in indices:
            label = int(digits.target[i])
            out.append(
                {
                    "id": f"{split}-digit-{i}",
                    "image": save_digit(i),
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{DIGIT_Q}"},
                        {"from": "gpt", "value": str(label)},
                    ],
                    "task": "digit",
                    "answer": str(label),
                }
            )
        for k in range(k_pairs):
            while True:
                a, b = rng.sample(list(indices), 2)
                if digits.target[a] != digits.target[b]:
                    break
            answer = "Image-1" if digits.target[a] > digits.target[b] else "Image-2"
            out.append(
                {
                    "id": f"{split}-pair-{k}",
                    "image": [save_digit(a), save_digit(b)],
                    "conversations": [
                        {"from": "human", "value": f"Image-1: <image>\nImage-2: <image>\n{LARGER_Q}"},
                        {"from": "gpt", "value": answer},
                    ],
                    "task": "larger",
                    "answer": answer,
                }
            )
        return out

    def shape_samples(count, split):
        """Training: both questions about one drawing, as a two-turn conversation (random order);
        test: one question per drawing, alternating shape / colour."""
        out = []
        for k in range(count):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            name = f"images/{split}_shape_{k:04d}.png"
            shape_image(shape, colour, rng, s.image_size).save(data_dir / name)
            qa = [(SHAPE_Q, shape, "shape"), (COLOUR_Q, colour, "colour")]
            if split == "train":
                rng.shuffle(qa)
            else:
                qa = [qa[k % 2]]
            conv = []
            for i, (q, a, _) in enumerate(qa):
                conv += [
                    {"from": "human", "value": f"<image>\n{q}" if i == 0 else q},
                    {"from": "gpt", "value": a},
                ]
            out.append(
                {
                    "id": f"{split}-shape-{k}",
                    "image": name,
                    "conversations": conv,
                    "task": qa[0][2],
                    "answer": qa[0][1],
                }
            )
        return out

    train = digit_samples(train_idx, s.n_pairs, "train") + shape_samples(s.n_shapes, "train")
    test = digit_samples(test_idx[: s.n_test], s.n_test // 2, "test") + shape_samples(s.n_test // 2, "test")
    # one JSONL per task, mixed by the meta file's repeat_time (single digits count double)
    files = {"digits": ("digit",), "pairs": ("larger",), "shapes": ("shape", "colour")}
    meta = {}
    for name, tasks in files.items():
        rows = [r for r in train if r["task"] in tasks]
        with open(data_dir / f"train_{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        repeat = s.digit_repeat if name == "digits" else 1
        meta[f"demo_{name}"] = {"root": ".", "annotation": f"train_{name}.jsonl", "repeat_time": repeat}
    with open(data_dir / "test.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in test)
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    log(
        f"data: {len(train)} training samples ({len(train_idx)} digit images x{s.digit_repeat}, {s.n_pairs} "
        f"two-image pairs, {s.n_shapes} shapes), {len(test)} held-out test samples -> {data_dir}"
    )
    return {"meta": data_dir / "meta.json", "root": data_dir, "test": test}


# ---------------------------------------------------------------------------------------------------
# model


def init_demo_model(
    out_dir: Path,
    image_size: int = 224,
    seed: int = 0,
    vit: tuple[int, int] = (96, 2),
    llm: tuple[int, int] = (128, 4),
    template: str = "Hermes-2",
    tokenizer: Any = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """A tiny InternVL (ViT 2x96, LLM 4x128, Qwen2-style; sizes as (hidden, layers)) with random
    weights and an offline tokenizer (or ``tokenizer``), saved in the InternVL-Chat layout."""
    import torch

    from interleaf.model.checkpoint import save_checkpoint
    from interleaf.model.config import InternVLConfig, LLMConfig, VisionConfig
    from interleaf.model.internvl import InternVLChatModel
    from interleaf.model.tokenizer import build_offline_tokenizer
    from interleaf.processing.templates import get_template

    tok = tokenizer if tokenizer is not None else build_offline_tokenizer()
    vocab = tok.get_vocab()
    cfg = InternVLConfig(
        vision=VisionConfig(
            hidden_size=vit[0],
            num_hidden_layers=vit[1],
            num_attention_heads=4,
            intermediate_size=4 * vit[0],
            image_size=image_size,
        ),
        llm=LLMConfig(
            family="qwen2",
            vocab_size=len(tok),
            hidden_size=llm[0],
            intermediate_size=4 * llm[0],
            num_hidden_layers=llm[1],
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            qkv_bias=True,
            tie_word_embeddings=tie_word_embeddings,
            eos_token_id=vocab[get_template(template).stop_str],
            pad_token_id=tok.pad_token_id,
        ),
        template=template,
        force_image_size=image_size,
        max_dynamic_patch=1,
        use_thumbnail=False,
        system_message="You are a helpful assistant.",
        img_context_token_id=vocab["<IMG_CONTEXT>"],
        img_start_token_id=vocab["<img>"],
        img_end_token_id=vocab["</img>"],
    )
    torch.manual_seed(seed)
    model = InternVLChatModel(cfg)
    model.init_weights(seed=seed)
    save_checkpoint(model, tok, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------
# evaluation


def evaluate(ckpt: Path, test: list[dict], root: Path, log=print) -> dict[str, dict[str, float]]:
    """Greedy answers to the held-out questions through ``interleaf.load(ckpt).chat``; accuracy per task."""
    try:
        import interleaf

        chat_model = interleaf.load(str(ckpt))

        def ask_batch(questions: list[str], paths: list[list[str]]) -> list[str]:
            return chat_model.batch_chat(questions, images=paths, max_new_tokens=16, do_sample=False)

    except ImportError:  # runtime not installed: a plain greedy loop over the same prompt
        greedy = _GreedyChat(ckpt)

        def ask_batch(questions: list[str], paths: list[list[str]]) -> list[str]:
            return [greedy(q, p) for q, p in zip(questions, paths)]

    per_task: dict[str, list[int]] = {}
    examples: dict[str, tuple[str, str, str]] = {}
    chunk = 16
    for k in range(0, len(test), chunk):
        recs = test[k : k + chunk]
        paths = [
            [str(root / p) for p in ([r["image"]] if isinstance(r["image"], str) else r["image"])]
            for r in recs
        ]
        questions = [r["conversations"][0]["value"] for r in recs]
        for rec, question, reply in zip(recs, questions, ask_batch(questions, paths)):
            ok = int(final_answer(reply, rec["task"]) == rec["answer"])
            per_task.setdefault(rec["task"], []).append(ok)
            examples.setdefault(rec["task"], (question.replace("\n", " / "), reply.strip(), rec["answer"]))
    chance = {"digit": 0.1, "larger": 0.5, "shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS)}
    results = {}
    for task, oks in per_task.items():
        acc = sum(oks) / len(oks)
        results[task] = {"accuracy": acc, "chance": chance[task], "n": len(oks)}
        q, r, a = examples[task]
        log(
            f"  {task:7s} accuracy {acc:6.1%}  (chance {chance[task]:.0%}, n={len(oks)})   e.g. '{q}' -> '{r}' (truth '{a}')"
        )
    return results


def final_answer(reply: str, task: str) -> str:
    """The answer a reply commits to: the last ``Image-k`` for the two-image task, else the reply."""
    if task == "larger":
        found = re.findall(r"Image-[0-9]+", reply)
        return found[-1] if found else reply.strip()
    return reply.strip()


class _GreedyChat:
    """Greedy decoding without a KV cache (short answers): the prompt built as ``chat`` builds it."""

    def __init__(self, ckpt: Path) -> None:
        from interleaf.model.checkpoint import load_checkpoint
        from interleaf.processing.templates import get_template

        self.model, self.tok = load_checkpoint(str(ckpt))
        cfg = self.model.config
        self.template = get_template(cfg.template, cfg.system_message)
        self.stop = self.tok.convert_tokens_to_ids(self.template.stop_str)

    def __call__(self, question: str, paths: list[str], max_new_tokens: int = 16) -> str:
        import torch

        from interleaf.processing.image import preprocess_images
        from interleaf.processing.prompt import expand_image_placeholders

        cfg = self.model.config
        pixels, tiles = preprocess_images(paths, cfg.max_dynamic_patch, 1, cfg.image_size, cfg.use_thumbnail)
        prompt = expand_image_placeholders(self.template.chat_prompt(question), tiles, cfg.num_image_token)
        ids = torch.tensor([self.tok(prompt)["input_ids"]])
        out: list[int] = []
        with torch.no_grad():
            embeds = self.model.embed(ids, pixels)
            cache = self.model.make_cache(1, ids.shape[1] + max_new_tokens)
            logits = self.model(inputs_embeds=embeds, kv_cache=cache, logits_to_keep=1).logits
            for _ in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                if nxt == self.stop:
                    break
                out.append(nxt)
                logits = self.model(input_ids=torch.tensor([[nxt]]), kv_cache=cache).logits
        return self.tok.decode(out, skip_special_tokens=True)


def plot_losses(losses: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, lw=1, alpha=0.5, label="loss")
    k = max(1, len(values) // 25)
    smooth = [
        sum(values[max(0, i - k) : i + 1]) / len(values[max(0, i - k) : i + 1]) for i in range(len(values))
    ]
    ax.plot(steps, smooth, lw=2, label=f"moving mean ({k + 1})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title("interleaf demo: tiny InternVL from random weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def run_mini_suite(ckpt: Path, out: Path, log=print) -> dict | None:
    """Best effort: the evaluation harness's offline mini MMIU (multi-image multiple choice, official
    scoring) on the demo model. It never trained on those tasks, so expect about chance."""
    try:
        from interleaf.eval import mini
        from interleaf.eval.runner import run
    except ImportError:
        return None
    try:
        data = mini.make_mini_mmiu(out / "mini_mmiu", per_task=3)
        scores = run(str(ckpt), "mmiu", str(data), out / "mini_mmiu_run", progress=False)
    except Exception as exc:  # noqa: BLE001 - optional step; the demo's own results stand
        log(f"  mini MMIU suite skipped: {type(exc).__name__}: {exc}")
        return None
    summary = {"overall": scores.get("overall"), "num_samples": scores.get("num_samples")}
    log(
        f"  mini MMIU (eval harness, official scoring, {summary['num_samples']} questions, tasks never trained): "
        f"overall {summary['overall']:.1%} -> {out / 'mini_mmiu_run' / 'report.md'}"
    )
    return summary


def _pick_threads() -> int:
    """All cores on a quiet machine; one thread when the machine is already busy (oversubscribed
    intra-op threads make small matmuls many times slower on a shared machine)."""
    import os

    import torch

    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > 1.5 * cores
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


def run_demo(
    out: str = "runs/demo",
    steps: int = 2000,
    image_size: int = 224,
    seed: int = 0,
    log=print,
    settings: dict[str, Any] | None = None,
    mini_suite: bool = True,
) -> dict[str, Any]:
    """The whole demo; ``settings`` overrides :class:`DemoSettings` fields (smaller data for tests)."""
    import torch

    from interleaf.train.config import build_config
    from interleaf.train.trainer import train

    t0 = time.perf_counter()
    threads = _pick_threads()
    torch.set_num_threads(threads)
    s = DemoSettings(Path(out).resolve(), image_size=image_size, steps=steps, seed=seed, **(settings or {}))
    s.out.mkdir(parents=True, exist_ok=True)
    log(f"[1/4] building the offline training set (digits, shapes, colours; {image_size} px tiles)")
    data = build_dataset(s, log)
    log("[2/4] initialising a tiny InternVL-architecture model from random weights")
    init_dir = s.out / "init"
    if not (init_dir / "config.json").exists():
        init_demo_model(init_dir, image_size, seed)
    train_dir = s.out / "train"
    cfg = build_config(
        {
            "model_path": str(init_dir),
            "meta_path": str(data["meta"]),
            "output_dir": str(train_dir),
            "packing": True,
            "max_packed_tokens": 1024,
            "max_packed_images": 32,
            "max_seq_length": 1024,
            "max_dynamic_patch": 1,
            "loss_reduction": "token",
            "lr": 6e-4,
            "weight_decay": 0.01,
            "warmup_ratio": 0.05,
            "min_lr_ratio": 0.05,
            "max_steps": steps,
            "save_steps": 0,
            "seed": seed,
            "log_steps": 10,
            "resume": False,
        }
    )
    log(f"[3/4] training {steps} steps (packed sequences of up to {cfg.max_packed_tokens} tokens)")
    result = train(cfg, log=lambda m: log("      " + m))
    ckpt = Path(result["checkpoint"])
    plot = s.out / "loss_curve.png"
    plot_losses(result["losses"], plot)
    t_train = time.perf_counter() - t0
    log(f"[4/4] answering {len(data['test'])} held-out questions (images never seen in training)")
    results = evaluate(ckpt, data["test"], data["root"], log)
    mini = run_mini_suite(ckpt, s.out, log) if mini_suite else None
    if mini is not None:
        results["mini_mmiu"] = mini
    (s.out / "results.json").write_text(json.dumps(results, indent=1))
    example = next(r for r in data["test"] if r["task"] == "digit")
    log("")
    log(f"loss curve: {plot}")
    log(f"checkpoint: {ckpt}")
    log("try it:")
    log(f'  interleaf chat {ckpt} --image {data["root"] / example["image"]} "{DIGIT_Q}"')
    pair = next((r for r in data["test"] if r["task"] == "larger"), None)
    if pair is not None:
        a, b = (data["root"] / p for p in pair["image"])
        log(f'  interleaf chat {ckpt} --image {a} --image {b} "{LARGER_Q}"')
    log(f"total time {time.perf_counter() - t0:.0f}s (data + training {t_train:.0f}s)")
    return {"checkpoint": str(ckpt), "results": results, "loss_curve": str(plot)}
