"""LCL pretraining: sequences as the official code lays them out, CLIP preprocessing against
transformers' CLIP image processor, training that lowers the loss, exact resume, torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from interleaf.cli import main
from interleaf.errors import ConfigError
from interleaf.model.lcl import LCL_PRESETS, LCLConfig
from interleaf.train.data import SkipLog
from interleaf.train.lcl import (
    CLIP_MEAN,
    CLIP_STD,
    LCLDataset,
    LCLTrainConfig,
    clip_pixels,
    collate,
    load_lcl_tokenizer,
    pretrain,
)

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 40, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def tok():
    return load_lcl_tokenizer("offline")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rows = []
    for name, colour in COLOURS.items():
        img = Image.new("RGB", (48, 40), colour)
        img.paste((255, 255, 255), (4, 4, 12, 12))
        img.save(tmp_path / f"{name}.png")
        rows.append({"image": f"{name}.png", "text": f"a plain {name} square with a white corner"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "texts": [
            "a page about colours.",
            None,
            "the first picture is red, the next one blue.",
            None,
            "end.",
        ],
        "images": [None, "red.png", None, "blue.png", None],
    }
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    return tmp_path


def config(tok, **kw) -> LCLConfig:
    fields = {**LCL_PRESETS["tiny"], "vocab_size": len(tok), "special_token_ids": dict(tok.ids), **kw}
    return LCLConfig(**fields)


def test_pairs_are_laid_out_as_the_official_wrapper(data, tok):
    cfg = config(tok, context_length=40)  # 16 image tokens: text keeps 40 - 16 - 4 = 20 tokens
    i = tok.ids
    block = [i["<start_of_img>"], *[i["<img_placehold>"]] * 16, i["<end_of_img>"]]
    text = tok.encode("a plain red square with a white corner")
    first = LCLDataset([str(data / "pairs.jsonl")], tok, cfg, img_first_prob=1.0).get(0)
    last = LCLDataset([str(data / "pairs.jsonl")], tok, cfg, img_first_prob=0.0).get(0)
    assert first.ids == block + text + [i["<end_of_text>"]]
    assert last.ids == [i["<start_of_text>"]] + text + block
    assert first.pixels.shape == (1, 3, 32, 32)
    long = data / "long.jsonl"
    long.write_text(json.dumps({"image": "red.png", "text": "red " * 100}) + "\n")
    seq = LCLDataset([str(long)], tok, cfg, img_first_prob=0.0).get(0).ids
    assert len(seq) == 1 + 20 + 18 and seq[21:] == block
    # the coin is per sample and seeded: both layouts occur, and the same seed gives the same ones
    ds = LCLDataset([str(data / "pairs.jsonl")] * 10, tok, cfg, seed=3)
    layouts = [ds.get(k).ids[0] == i["<start_of_img>"] for k in range(len(ds))]
    assert 0 < sum(layouts) < len(layouts)
    assert layouts == [LCLDataset([str(data / "pairs.jsonl")] * 10, tok, cfg, seed=3).get(k).ids[0]
                       == i["<start_of_img>"] for k in range(len(ds))]  # fmt: skip


def test_documents_keep_images_in_place_and_cut_whole_blocks(data, tok):
    i = tok.ids
    cfg = config(tok)
    block = [i["<start_of_img>"], *[i["<img_placehold>"]] * 16, i["<end_of_img>"]]
    sample = LCLDataset([str(data / "docs.jsonl")], tok, cfg).get(0)
    want = [i["<start_of_text>"], *tok.encode("a page about colours.\n"), *block,
            *tok.encode("the first picture is red, the next one blue.\n"), *block, *tok.encode("end.\n"),
            i["<end_of_text>"]]  # fmt: skip
    assert sample.ids == want and sample.pixels.shape == (2, 3, 32, 32)
    assert torch.equal(sample.pixels[0], clip_pixels(str(data / "red.png"), 32))
    assert torch.equal(sample.pixels[1], clip_pixels(str(data / "blue.png"), 32))
    # a context that ends inside the second image block: the document stops at its <soi>, with <eot>
    n_before = len(want[: want.index(i["<start_of_img>"], want.index(i["<end_of_img>"]))])
    cut = LCLDataset([str(data / "docs.jsonl")], tok, config(tok, context_length=n_before + 10)).get(0)
    assert cut.ids == want[:n_before] + [i["<end_of_text>"]] and cut.pixels.shape[0] == 1
    one = LCLDataset([str(data / "docs.jsonl")], tok, cfg, max_images=1).get(0)
    assert one.ids.count(i["<start_of_img>"]) == 1 and one.pixels.shape[0] == 1


def test_bad_rows_are_skipped_and_counted(data, tok):
    rows = ['{"image": "nowhere.png", "text": "x"}', "{oops", '{"texts": ["a"], "images": [null, null]}',
            '{"image": "red.png", "text": "fine"}']  # fmt: skip
    (data / "bad.jsonl").write_text("\n".join(rows) + "\n")
    log = SkipLog()
    ds = LCLDataset([str(data / "bad.jsonl")], tok, config(tok), skip_log=log)
    assert [ds.get(k) is None for k in range(4)] == [True, True, True, False]
    assert dict(log.counts) == {"missing_image": 1, "bad_json": 1, "bad_document": 1}


def test_clip_preprocessing_matches_transformers(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = random.Random(0)
    for size in [(48, 40), (300, 200), (33, 97), (32, 32)]:  # random pixels: resampling errors would show
        img = Image.new("RGB", size)
        img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size[0] * size[1])])
        img.save(tmp_path / "t.png")
        want = torch.as_tensor(ref(images=img, return_tensors="np")["pixel_values"][0])
        assert torch.allclose(clip_pixels(str(tmp_path / "t.png"), 32), want, atol=1e-6), size


def test_collate_pads_right_and_orders_images(tok, data):
    ds = LCLDataset(
        [str(data / "docs.jsonl"), str(data / "pairs.jsonl")], tok, config(tok), img_first_prob=0.0
    )
    samples = [ds.get(0), ds.get(1)]
    ids, pixels = collate(samples)
    assert ids.shape == (2, max(len(s.ids) for s in samples)) and (ids[1, len(samples[1].ids) :] == 0).all()
    assert torch.equal(pixels, torch.cat([samples[0].pixels, samples[1].pixels]))


def run_config(data: Path, out: Path, **kw) -> LCLTrainConfig:
    args = dict(data=[str(data / "pairs.jsonl"), str(data / "docs.jsonl")], output_dir=str(out), steps=24,
                batch_size=4, lr=2e-3, warmup=2, save_every=8, log_every=100)  # fmt: skip
    return LCLTrainConfig(**{**args, **kw})


def test_pretraining_lowers_both_losses_and_trains_the_vit(data, tmp_path):
    from interleaf.model.lcl import LCLModel, load_lcl

    result = pretrain(run_config(data, tmp_path / "run", steps=40), log=lambda m: None)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = log[:8], log[-8:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "generation") < 0.7 * mean(first, "generation")
    # the contrastive term is per pair; compare per pair (losses are means over the batch's pairs)
    assert all(r["pairs"] >= 1 for r in log)
    assert mean(last, "contrastive") < mean(first, "contrastive")
    model = load_lcl(result["model"])
    torch.manual_seed(0)
    fresh = LCLModel(model.config)
    assert not torch.equal(model.visual.conv1.weight, fresh.visual.conv1.weight)
    assert load_lcl_tokenizer(result["model"]).ids == model.config.special_token_ids


def test_resume_after_a_kill_ends_exactly_as_an_unbroken_run(data, tmp_path):
    full = tmp_path / "full"
    pretrain(run_config(data, full), log=lambda m: None)
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    # as if killed right after checkpoint-16 was written: checkpoint-24 and the model are gone
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]
    for name in ("checkpoint-24", "model"):
        shutil.rmtree(broken / name)
    messages: list[str] = []
    pretrain(run_config(data, broken), log=messages.append)
    assert messages[0] == f"resumed from {broken / 'checkpoint-16'} at step 16"
    a, b = load_file(full / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "log.jsonl").read_text() == (broken / "log.jsonl").read_text()
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]


def test_pretraining_aligns_images_with_their_captions(tmp_path, capsys):
    """Zero-shot retrieval on 16 colour x shape pairs (official loss weights and layout): near chance
    before training, every pair found after 150 steps."""
    from PIL import ImageDraw

    rows = []
    for name, colour in {**COLOURS, "purple": (140, 20, 160), "orange": (240, 140, 10), "black": (10, 10, 10),
                         "white": (245, 245, 245)}.items():  # fmt: skip
        for shape in ("square", "circle"):
            img = Image.new("RGB", (40, 40), (128, 128, 128))
            draw = ImageDraw.Draw(img)
            (draw.rectangle if shape == "square" else draw.ellipse)((6, 6, 34, 34), fill=colour)
            img.save(tmp_path / f"{name}_{shape}.png")
            rows.append({"image": f"{name}_{shape}.png", "text": f"a {name} {shape} on grey"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recalls = {}
    for steps, lr in ((1, 1e-9), (150, 2e-3)):
        out = tmp_path / f"run{steps}"
        argv = ["lcl", "pretrain", str(tmp_path / "pairs.jsonl"), "-o", str(out), "--steps", str(steps),
                "--batch-size", "16", "--lr", str(lr), "--warmup", "10", "--log-every", "1000"]  # fmt: skip
        assert main(argv) == 0
        capsys.readouterr()
        assert main(["lcl", "retrieval", str(out / "model"), str(tmp_path / "pairs.jsonl")]) == 0
        recalls[steps] = json.loads(capsys.readouterr().out)
    before, after = recalls[1], recalls[150]
    assert before["pairs"] == after["pairs"] == 16
    assert before["image_to_text_R@1"] <= 0.5 and before["text_to_image_R@1"] <= 0.5
    assert after["image_to_text_R@1"] >= 0.9 and after["text_to_image_R@1"] >= 0.9


def test_cli_pretrain_and_its_errors(data, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["lcl", "pretrain", str(data / "pairs.jsonl"), "-o", str(out), "--steps", "3", "--batch-size", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "model"))
    for extra, message in [
        (["--preset", "huge"], "unknown LCL preset 'huge'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--img-first-prob", "2"], "--img-first-prob must be in [0, 1]"),
        (["--tokenizer", str(tmp_path / "none")], "tokenizer folder not found"),
    ]:
        assert main([*argv[:3], "-o", str(tmp_path / "x"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert main(["lcl", "pretrain", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "y")]) == 1
    assert "file not found" in capsys.readouterr().err


def test_torchrun_two_ranks_share_the_contrastive_batch(data, tmp_path, torchrun):
    out = tmp_path / "ddp"
    torchrun("lcl", "pretrain", str(data / "pairs.jsonl"), str(data / "docs.jsonl"), "-o", str(out),
             "--steps", "4", "--batch-size", "2", "--save-every", "2")  # fmt: skip
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    state = torch.load(out / "checkpoint-4" / "train_state.pt", weights_only=False)
    assert len(state["order"]) == 2 and state["order"][0] == state["order"][1]  # both ranks at one position
    assert (out / "model" / "model.safetensors").exists()


def test_text_features_are_read_where_the_image_would_follow(data, tok):
    """Retrieval's text feature (the official encode_text: <eot> read as <soi>) is the feature the
    contrastive loss pairs with the image after the same text."""
    from interleaf.model.lcl import LCLModel

    torch.manual_seed(0)
    cfg = config(tok)
    model = LCLModel(cfg).eval()
    sample = LCLDataset([str(data / "pairs.jsonl")], tok, cfg, img_first_prob=0.0).get(1)
    with torch.no_grad():
        out = model(sample.pixels, torch.tensor([sample.ids]))
        n_text = sample.ids.index(tok.ids["<start_of_img>"])
        row = [*sample.ids[:n_text], tok.ids["<end_of_text>"], 0, 0]
        feats = model.text_features(torch.tensor([row]))
        assert torch.allclose(feats, out.text_features, atol=1e-6)
        assert torch.allclose(model.image_features(sample.pixels), out.image_features, atol=1e-6)
        with pytest.raises(ValueError, match="exactly one <end_of_text>"):
            model.text_features(
                torch.tensor([[*row[:-3], tok.ids["<end_of_text>"], tok.ids["<end_of_text>"]]])
            )


def test_text_that_spells_a_special_token_stays_text(data, tok):
    """A caption or document text containing '<img_placehold>', '<start_of_img>' or '<end_of_text>'
    is tokenized as text: one placeholder run and one <soi> per image (the model's invariant)."""
    from interleaf.model.lcl import LCLModel

    text = "see <img_placehold><start_of_img> here <end_of_img><end_of_text><start_of_text>"
    assert not set(tok.encode(text)) & set(tok.ids.values())
    (data / "tricky.jsonl").write_text(
        json.dumps({"image": "red.png", "text": text})
        + "\n"
        + json.dumps({"texts": [text, None, text], "images": [None, "red.png", None]})
        + "\n"
    )
    cfg = config(tok)
    ds = LCLDataset([str(data / "tricky.jsonl")], tok, cfg, img_first_prob=0.0)
    samples = [ds.get(0), ds.get(1)]
    ends = (tok.ids["<start_of_text>"], tok.ids["<end_of_text>"])
    for s, want in zip(samples, ([ends[0]], list(ends))):  # the pair is text first: no <eot>
        assert s.ids.count(tok.ids["<start_of_img>"]) == s.pixels.shape[0] == 1
        assert s.ids.count(tok.ids["<img_placehold>"]) == cfg.num_image_tokens
        assert [t for t in s.ids if t in ends] == want
    torch.manual_seed(0)
    out = LCLModel(cfg)(*reversed(collate(samples)))
    assert out.image_features.shape == out.text_features.shape == (2, cfg.embed_dim)


def test_sequences_fit_the_context_and_keep_one_block_per_image(data, tok):
    """Pairs and documents of every length, at context lengths down to the least that holds an image
    and a text token: never longer than the context (the positional embedding's rows), one <soi> and
    P placeholders per image, some text; a context too short for that is a config error."""
    rng = random.Random(0)
    words = "red blue green a the square picture of colours".split()
    rows = []
    for n in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))
        if n % 2:
            rows.append({"image": "red.png", "text": text})
        else:
            nodes = [rng.choice([text[: rng.randrange(1, 80)], None]) for _ in range(rng.randrange(1, 9))]
            nodes.append(text)
            rows.append({"texts": nodes, "images": [None if t else "blue.png" for t in nodes]})
    (data / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ends = set(tok.ids.values())
    for ctx in (21, 22, 23, 37, 40, 60, 128):  # tiny: 16 image tokens, so 21 = 16 + 4 + 1
        cfg = config(tok, context_length=ctx)
        for first in (0.0, 1.0):
            log = SkipLog()
            ds = LCLDataset([str(data / "mixed.jsonl")], tok, cfg, img_first_prob=first, skip_log=log)
            for k in range(len(ds)):
                s = ds.get(k)
                if s is None:
                    continue
                assert len(s.ids) <= ctx, (ctx, k)
                assert s.ids.count(tok.ids["<start_of_img>"]) == s.pixels.shape[0]
                assert s.ids.count(tok.ids["<img_placehold>"]) == 16 * s.pixels.shape[0]
                assert any(t not in ends for t in s.ids)
            assert set(log.counts) <= {"empty_document"}
    with pytest.raises(ConfigError, match="context length 20 cannot hold an image of 16 tokens"):
        LCLDataset([str(data / "pairs.jsonl")], tok, config(tok, context_length=20))


def test_documents_without_text_in_the_context_are_skipped(data, tok):
    """A document whose images fill the context before any text is skipped (empty_document), and an
    image that is not a local file is harmless where the document is cut before it."""
    i = tok.ids
    (data / "imgs.jsonl").write_text(
        json.dumps(
            {"texts": [None, None, "words after the pictures"], "images": ["red.png", "blue.png", None]}
        )
        + "\n"
        + json.dumps({"texts": ["some words", None, None], "images": [None, "red.png", "http://x/y.png"]})
        + "\n"
    )
    log = SkipLog()
    ds = LCLDataset([str(data / "imgs.jsonl")], tok, config(tok, context_length=36), skip_log=log)
    assert ds.get(0) is None and dict(log.counts) == {"empty_document": 1}  # <sot> block <eot>: no text
    s = ds.get(1)  # the remote image lies past the context: the document is kept, cut at it
    assert s is not None and s.pixels.shape[0] == 1 and s.ids[-1] == i["<end_of_text>"]


def test_resume_drops_cut_lines_and_never_duplicates_skips(data, tmp_path, capsys):
    """Kills at awkward points: a log line cut short, a run killed before its first checkpoint (its
    skip records must not be written twice), a finished run whose checkpoints were deleted (an error,
    not a run from scratch over its model), a checkpoint of another world size (an error)."""
    (data / "bad.jsonl").write_text(json.dumps({"image": "gone.png", "text": "lost"}) + "\n")
    files = [str(data / "pairs.jsonl"), str(data / "bad.jsonl")]
    cfg = lambda out: dataclasses.replace(run_config(data, out, steps=6, save_every=3), data=files)  # noqa: E731
    full = tmp_path / "full"
    pretrain(cfg(full), log=lambda m: None)
    assert len((full / "skipped.jsonl").read_text().splitlines()) == 1

    def rerun(name: str, *remove: str) -> Path:
        run = tmp_path / name
        shutil.copytree(full, run)
        for sub in remove:
            shutil.rmtree(run / sub)
        return run

    cut = rerun("cut", "checkpoint-6", "model")
    with (cut / "log.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.')  # killed while writing a line
    early = rerun("early", "checkpoint-3", "checkpoint-6", "model")  # killed before the first checkpoint
    for run in (cut, early):
        pretrain(cfg(run), log=lambda m: None)
        for name in ("log.jsonl", "skipped.jsonl"):
            assert (run / name).read_text() == (full / name).read_text(), (run.name, name)
        a, b = load_file(full / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)

    done = rerun("done", "checkpoint-3", "checkpoint-6")
    before = (done / "model" / "model.safetensors").read_bytes()
    argv = ["lcl", "pretrain", *files, "-o", str(done), "--steps", "6", "--batch-size", "4"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "exists but no checkpoint to resume from" in err and "\n" not in err
    assert (done / "model" / "model.safetensors").read_bytes() == before

    other = rerun("other", "model")
    state = torch.load(other / "checkpoint-6" / "train_state.pt", weights_only=False)
    state["order"] *= 2
    torch.save(state, other / "checkpoint-6" / "train_state.pt")
    with pytest.raises(ConfigError, match="written by 2 process"):
        pretrain(cfg(other), log=lambda m: None)


def test_cli_tokenizer_errors_are_one_line(data, tmp_path, capsys):
    """A folder that is not a tokenizer, and a model folder without its tokenizer/ (retrieval names
    one with --tokenizer), are one-line errors."""
    out = tmp_path / "run"
    pretrain(run_config(data, out, steps=1, batch_size=2), log=lambda m: None)
    shutil.rmtree(out / "model" / "tokenizer")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a tokenizer")
    pairs = str(data / "pairs.jsonl")
    for argv, message in [
        (
            ["pretrain", pairs, "-o", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "junk")],
            "not a tokenizer",
        ),
        (["retrieval", str(out / "model"), pairs], "a model folder without its tokenizer/"),
    ]:
        assert main(["lcl", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert main(["lcl", "retrieval", str(out / "model"), pairs, "--tokenizer", "offline"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 4


def test_a_batch_without_images_trains(data, tmp_path):
    """Documents whose images were all cut (or that have none) make batches with no image at all: the
    ViT runs on zero images (it crashed reshaping an empty batch) and only the generation term counts."""
    (data / "text.jsonl").write_text(
        json.dumps({"texts": ["only words here", "and more"], "images": [None, None]}) + "\n"
    )
    out = tmp_path / "noimg"
    cfg = dataclasses.replace(run_config(data, out, steps=2, batch_size=2), data=[str(data / "text.jsonl")])
    assert pretrain(cfg, log=lambda m: None)["steps"] == 2
    assert [json.loads(ln)["pairs"] for ln in (out / "log.jsonl").read_text().splitlines()] == [0, 0]


def test_very_elongated_images_are_scaled_in_their_kept_region(tmp_path):
    """A 20 x 3000 image at 32 px would be 32 x 4800 after CLIP's resize: only the centre crop's
    region is scaled, which comes out as the full resize's crop up to resampling rounding."""
    import numpy as np

    rng = random.Random(1)
    img = Image.new("RGB", (20, 3000))
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(20 * 3000)])
    img.save(tmp_path / "tall.png")
    full = img.resize((32, 4800), Image.BICUBIC).crop((0, 2384, 32, 2416))
    want = (
        np.asarray(full, dtype=np.float32).transpose(2, 0, 1) / 255.0 - np.asarray(CLIP_MEAN).reshape(3, 1, 1)
    ) / np.asarray(CLIP_STD).reshape(3, 1, 1)
    got = clip_pixels(str(tmp_path / "tall.png"), 32)
    assert got.shape == (3, 32, 32) and (got - torch.as_tensor(want, dtype=torch.float32)).abs().mean() < 0.02


def test_bf16_autocast_trains_with_fp32_weights(data, tmp_path):
    from interleaf.model.lcl import load_lcl

    result = pretrain(run_config(data, tmp_path / "bf16", steps=6, precision="bf16"), log=lambda m: None)
    log = [json.loads(x) for x in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"]
    assert all(p.dtype == torch.float32 for p in load_lcl(result["model"]).parameters())


def test_each_rank_uses_its_own_gpu(data, tmp_path, monkeypatch):
    # torchrun on GPUs: NCCL's object collectives (the checkpoint's all_gather_object) use the current
    # CUDA device, so each rank must make cuda:LOCAL_RANK current, or every rank would use GPU 0
    chosen = []

    def set_device(device) -> None:
        chosen.append(torch.device(device))
        raise KeyboardInterrupt  # stop here: this machine may have no GPU

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    cfg = LCLTrainConfig(data=[str(data / "pairs.jsonl")], output_dir=str(tmp_path / "gpu"), device="cuda")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, log=lambda _: None)
    assert chosen == [torch.device("cuda", 3)]


def test_device_cuda_without_a_gpu_is_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["lcl", "pretrain", str(data / "pairs.jsonl"), "-o", str(tmp_path / "x"), "--device", "cuda"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == "error: --device cuda: no GPU is available"


def test_cli_device_defaults_to_auto(data, tmp_path, monkeypatch):
    # as LCLTrainConfig and README: without --device, pretrain takes the GPU where there is one
    import interleaf.train.lcl as lcl_train

    seen = []
    monkeypatch.setattr(lcl_train, "pretrain", lambda cfg: seen.append(cfg.device) or {"model": "m"})
    assert main(["lcl", "pretrain", str(data / "pairs.jsonl"), "-o", str(tmp_path / "x")]) == 0
    assert seen == ["auto"]


def mmc4_row() -> dict:
    return {
        "text_list": ["The first sentence.", "A red thing.", "A blue thing.", "The end."],
        "image_info": [
            {"image_name": "red.png", "matched_text_index": 1, "matched_sim": 0.31},
            {"image_name": "green.png", "matched_text_index": 0, "matched_sim": 0.20},  # below 0.24
            {"image_name": "blue.png", "matched_text_index": 2, "matched_sim": 0.28},
            {"image_name": "yellow.png", "matched_text_index": 2, "matched_sim": 0.30},  # same sentence
            {"image_name": "gone.png", "matched_text_index": 3, "matched_sim": 0.40},  # not on disk
        ],
    }


def test_mmc4_rows_follow_the_official_recipe(data, tok):
    (data / "mmc4.jsonl").write_text(json.dumps(mmc4_row()) + "\n")
    i = tok.ids
    block = [i["<start_of_img>"], *[i["<img_placehold>"]] * 16, i["<end_of_img>"]]
    enc = lambda t: tok.encode(t + " ")  # noqa: E731  sentences joined by spaces
    for prob, first in ((1.0, True), (0.0, False)):
        ds = LCLDataset([str(data / "mmc4.jsonl")], tok, config(tok), img_first_prob=prob, seed=1)
        sample = ds.get(0)
        # green: below the threshold; blue or yellow: one image for sentence 2; gone.png: unreadable, left out
        assert sample.pixels.shape[0] == 2
        assert torch.equal(sample.pixels[0], clip_pixels(str(data / "red.png"), 32))
        picked = [
            n
            for n in ("blue", "yellow")
            if torch.equal(sample.pixels[1], clip_pixels(str(data / f"{n}.png"), 32))
        ]
        assert len(picked) == 1
        s = [enc(t) for t in mmc4_row()["text_list"]]
        body = s[0] + (block + s[1] + block + s[2] if first else s[1] + block + s[2] + block) + s[3]
        assert sample.ids == [i["<start_of_text>"], *body, i["<end_of_text>"]]
    # the choice among one sentence's images is random per sample, and seeded
    many = LCLDataset([str(data / "mmc4.jsonl")] * 12, tok, config(tok), seed=5)
    chosen = {
        bool(torch.equal(many.get(k).pixels[1], clip_pixels(str(data / "blue.png"), 32))) for k in range(12)
    }
    assert chosen == {True, False}


def test_mmc4_rows_without_a_usable_image_are_skipped(data, tok):
    row = mmc4_row()
    row["image_info"] = [
        info for info in row["image_info"] if info["image_name"] in ("green.png", "gone.png")
    ]
    bad = {"text_list": ["x"], "image_info": [{"image_name": "red.png", "matched_text_index": 7}]}
    (data / "mmc4.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    log = SkipLog()
    ds = LCLDataset([str(data / "mmc4.jsonl")], tok, config(tok), skip_log=log)
    assert ds.get(0) is None and ds.get(1) is None
    assert dict(log.counts) == {"no_image": 1, "bad_document": 1}
    # images without a similarity (interleaf's own corpus convert --to mmc4) are kept
    row["image_info"] = [{"image_name": "red.png", "matched_text_index": 0, "matched_sim": None}]
    (data / "mmc4.jsonl").write_text(json.dumps(row) + "\n")
    assert LCLDataset([str(data / "mmc4.jsonl")], tok, config(tok)).get(0).pixels.shape[0] == 1


@pytest.mark.parametrize(
    ("sim", "kept"), [(0.3, 1), ("0.3", 1), ("0.1", 0), (float("nan"), 0), (True, 0), (False, 0), ("high", 0)]
)
def test_mmc4_similarity_must_be_a_number_over_the_threshold(data, tok, sim, kept):
    """A numeric string is its number; NaN, a bool or a word is no similarity over the threshold."""
    row = {"text_list": ["A red thing."], "image_info": [{"image_name": "red.png", "matched_text_index": 0}]}
    row["image_info"][0]["matched_sim"] = sim
    (data / "mmc4.jsonl").write_text(json.dumps(row) + "\n")  # NaN as JSON's NaN, which json reads back
    log = SkipLog()
    sample = LCLDataset([str(data / "mmc4.jsonl")], tok, config(tok), skip_log=log).get(0)
    assert (0 if sample is None else sample.pixels.shape[0]) == kept
    assert dict(log.counts) == ({} if kept else {"no_image": 1})


def test_resume_refuses_other_settings_but_takes_more_steps(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["lcl", "pretrain", str(data / "pairs.jsonl"), "-o", str(out), "--steps", "4", "--batch-size", "2",
            "--save-every", "2"]  # fmt: skip
    assert main(argv) == 0
    shutil.rmtree(out / "model")  # as if killed before the end
    assert main([*argv, "--batch-size", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert "was trained with batch_size=2, not 3" in err and "\n" not in err
    assert main([*argv[:-2], "--save-every", "1", "--steps", "6"]) == 0  # more steps, other saving: fine
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


def test_export_vit_loads_in_transformers_and_sees_what_lcl_sees(data, tmp_path, capsys):
    """The pretrained ViT as a CLIPVisionModel folder: transformers loads it with from_pretrained, its
    image processor gives clip_pixels' tensor, and its features are LCL's own (post_layernorm, CLS dropped)."""
    from transformers import CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from interleaf.model.lcl import load_lcl

    run = tmp_path / "run"
    assert (
        main(
            [
                "lcl",
                "pretrain",
                str(data / "pairs.jsonl"),
                "-o",
                str(run),
                "--steps",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["lcl", "export-vit", str(run / "model"), "-o", str(tmp_path / "vit")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "vit")
    hf = CLIPVisionModel.from_pretrained(str(tmp_path / "vit")).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(tmp_path / "vit"))
    model = load_lcl(run / "model").eval()
    img = Image.open(data / "red.png").convert("RGB")
    pixels = torch.as_tensor(processor(images=img, return_tensors="np")["pixel_values"])
    assert torch.allclose(pixels[0], clip_pixels(str(data / "red.png"), 32), atol=1e-6)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        theirs = getattr(hf, "vision_model", hf).post_layernorm(out.last_hidden_state)[:, 1:]
        torch.testing.assert_close(theirs, model.visual(pixels), atol=2e-5, rtol=1e-5)


def test_resume_takes_the_same_data_spelled_otherwise_and_older_checkpoints(
    data, tmp_path, monkeypatch, capsys
):
    """The same file by a relative or an absolute path is the same data; a checkpoint saved without
    the settings (or with one this version lacks) resumes."""
    out = tmp_path / "run"
    monkeypatch.chdir(data)
    argv = ["lcl", "pretrain", "pairs.jsonl", "-o", str(out), "--steps", "2", "--batch-size", "2",
            "--save-every", "1"]  # fmt: skip
    assert main(argv) == 0
    shutil.rmtree(out / "model")
    assert main([*argv[:2], str(data / "pairs.jsonl"), *argv[3:]]) == 0
    shutil.rmtree(out / "model")
    other = tmp_path / "other"  # the same spelling from another folder names another file
    other.mkdir()
    shutil.copy(data / "pairs.jsonl", other)
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert main(argv) == 1
    assert f"was trained with data=[{str(data / 'pairs.jsonl')!r}]" in capsys.readouterr().err
    monkeypatch.chdir(data)
    for steps, config in ((3, None), (4, {"a_setting_since_removed": 1})):
        ckpt = out / f"checkpoint-{steps - 1}" / "train_state.pt"
        state = torch.load(ckpt, weights_only=False)
        if config is None:
            del state["config"]
        else:
            state["config"].update(config)
        torch.save(state, ckpt)
        assert main([*argv, "--steps", str(steps)]) == 0
        shutil.rmtree(out / "model")


def test_export_vit_never_writes_over_an_lcl_model(tok, tmp_path, capsys):
    """-o naming the model's own folder (or any LCL model folder) would replace its weights and config
    with the CLIP ones: refused in one line, the model left whole; a file as -o is one line too."""
    from interleaf.model.lcl import LCLModel, load_lcl, save_lcl

    model = save_lcl(LCLModel(config(tok)), tmp_path / "model")
    before = (model / "model.safetensors").read_bytes()
    (tmp_path / "file").write_text("x")
    for dest in (model, tmp_path / "file"):
        capsys.readouterr()
        assert main(["lcl", "export-vit", str(model), "-o", str(dest)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {dest}") and "\n" not in err
    assert (model / "model.safetensors").read_bytes() == before and load_lcl(model)
    assert main(["lcl", "export-vit", str(model), "-o", str(tmp_path / "vit")]) == 0
