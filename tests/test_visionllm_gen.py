"""VisionLLM v2's [GEN] / [EDIT] routes wired to the Stable Diffusion / InstructPix2Pix decoders: the
checkpoint layout, the training forward, records, training and `interleaf visionllm ask`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from interleaf.cli import main
from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.model.visionllm import answer, load_visionllm
from interleaf.train.visionllm import (
    GEN_QUESTION,
    clean_caption,
    collate_generation,
    encode_generation,
    next_batch,
    parse_generation_record,
    read_records,
    task_of,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def gen_ckpt(tmp_path_factory):
    """A tiny VisionLLM v2 folder with the detector and tiny [GEN] and [EDIT] pipelines."""
    out = tmp_path_factory.mktemp("vl") / "init"
    assert main(["visionllm", "init", "-o", str(out), "--image-size", "112", "--max-tiles", "1",
                 "--gen", "tiny", "--edit", "tiny"]) == 0  # fmt: skip
    return out


def _pictures(folder) -> list[dict]:
    """A square per colour (generation targets) and, per colour, the edit of the other colour's."""
    for colour, rgb in COLOURS.items():
        im = Image.new("RGB", (80, 64), (255, 255, 255))
        ImageDraw.Draw(im).rectangle([20, 12, 60, 52], fill=rgb)
        im.save(folder / f"{colour}.png")
    rows = [{"route": "gen", "caption": f"A {c} square!", "output_image": f"{c}.png"} for c in COLOURS]
    rows += [{"route": "edit", "image": "red.png", "caption": "make the square blue", "output_image": "blue.png"},
             {"route": "edit", "image": "blue.png", "caption": "make the square red", "output_image": "red.png"}]  # fmt: skip
    return rows


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 in diffusers' Euler scheduler
def test_checkpoint_keeps_the_links_with_the_weights_and_each_pipeline_as_a_diffusers_folder(gen_ckpt):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
    from safetensors import safe_open

    with safe_open(gen_ckpt / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"sd.emb_proj.0.weight", "sd.llm2sd_mapper_queries", "ip2p.emb_proj.2.weight",
            "emb_embeddings_gen.weight", "emb_embeddings_edit.weight"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(("sd.sd_", "ip2p.sd_"))]  # those live in the pipelines
    config = json.loads((gen_ckpt / "config.json").read_text())["visionllmv2"]
    assert (
        config["sd"]["kind"] == "gen"
        and config["ip2p"]["kind"] == "edit"
        and config["sd"]["resolution"] == 64
    )
    # diffusers reads the pipeline folders on its own
    assert StableDiffusionPipeline.from_pretrained(gen_ckpt / "stable_diffusion").unet.config.in_channels == 4
    assert (
        StableDiffusionInstructPix2PixPipeline.from_pretrained(
            gen_ckpt / "instruct_pix2pix"
        ).unet.config.in_channels
        == 8
    )

    model, _ = load_visionllm(gen_ckpt)
    again, _ = load_visionllm(gen_ckpt)
    assert model.sd.config.kind == "gen" and model.ip2p.config.kind == "edit"
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_pipeline_folder_or_a_wrong_kind_is_one_error(gen_ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gen_ckpt, broken)
    shutil.rmtree(broken / "instruct_pix2pix")
    with pytest.raises(CheckpointError, match="instruct_pix2pix"):
        load_visionllm(broken)
    shutil.copytree(gen_ckpt / "instruct_pix2pix", broken / "instruct_pix2pix")
    config = json.loads((broken / "config.json").read_text())
    config["visionllmv2"]["sd"]["kind"] = "edit"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="visionllmv2.sd.kind: must be 'gen'"):
        load_visionllm(broken)


def test_records_follow_upstreams_prompts_and_bad_ones_are_skipped_with_their_reason(tmp_path):
    rows = _pictures(tmp_path)
    bad = [
        {"route": "gen", "output_image": "red.png"},
        {"route": "gen", "caption": "x", "output_image": "none.png"},
        {"route": "gen", "caption": "x", "output_image": "red.png", "image": "red.png"},
        {"route": "edit", "caption": "x", "output_image": "red.png"},
        {"route": "gen", "caption": "a [GEN] b", "output_image": "red.png"},
        {"route": "gen", "caption": "...!", "output_image": "red.png"},
        {"route": "gen", "caption": "x", "output_image": "red.png", "question": "<image> draw it"},
    ]
    _write(tmp_path / "d.jsonl", rows + bad)
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [task_of(r) for r in records] == ["gen", "gen", "edit", "edit"]
    assert (
        records[0].question
        == GEN_QUESTION.format(caption="a red square")
        == ("Generate image with caption: a red square.")
    )
    assert records[2].question == "Make the square blue." and records[2].image.name == "red.png"
    reasons = [s["reason"] for s in skipped]
    assert [s["line"] for s in skipped] == list(range(5, 12))
    for want, got in zip(["caption: missing", "none.png not found", "image: a generation record has no input",
                          "image: missing", "contains '[GEN]'", "nothing left after", "has no image"], reasons):  # fmt: skip
        assert want in got, (want, got)
    # upstream's preprocess_caption: lower case, its punctuation to spaces, spaces squeezed
    assert clean_caption('A "Cat"; on: a mat~!  ') == "a cat on a mat"


def test_forward_adds_each_decoders_loss_on_its_routes_slot_states(gen_ckpt, tmp_path):
    model, tok = load_visionllm(gen_ckpt)
    _write(tmp_path / "d.jsonl", _pictures(tmp_path))
    records, _ = read_records(tmp_path / "d.jsonl")
    for kind, name, chosen in (("gen", "sd", records[:2]), ("edit", "ip2p", records[2:])):
        batch = collate_generation([encode_generation(model, tok, r) for r in chosen], pad_id=0)
        assert batch["output_images"].shape == (2, 3, 64, 64)
        assert (batch["input_images"] is None) == (kind == "gen")
        assert (batch["pixel_values"] is None) == (kind == "gen")  # an edit's prompt shows its image
        torch.manual_seed(5)
        out = model(**batch)
        loss = getattr(out, f"{name}_loss")
        assert torch.allclose(out.loss, out.lm_loss + loss)
        # the decoder's own loss on the hidden states of the 64 slots after each routing token
        (link_a,), (link_b,) = out.links
        assert link_a.kind == kind and link_a.num_queries == 64
        states = torch.stack([out.hidden[0, link_a.slots], out.hidden[1, link_b.slots]])
        torch.manual_seed(5)
        module = model.diffusion(kind)
        want = module.loss(states, batch["output_images"], batch["captions"], batch["input_images"])
        assert torch.equal(loss, want.loss)
        assert want.caption_loss is not None  # every record has a caption

    # the diffusion loss alone reaches the LLM and the query table, not the frozen VAE
    model.zero_grad(set_to_none=True)
    batch = collate_generation([encode_generation(model, tok, r) for r in records[:2]], pad_id=0)
    model(**batch).sd_loss.backward()
    assert model.emb_embeddings_gen.weight.grad.abs().sum() > 0
    assert model.language_model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.sd.sd_vae.parameters())
    assert all(p.grad is None for p in model.sd.sd_unet.parameters())  # upstream's frozen SD UNet


def test_a_batch_holds_one_task_and_one_task_batches_as_before():
    from interleaf.train.visionllm import DetectionRecord, GenerationRecord

    recs = [GenerationRecord("gen", "c", None, "q"), GenerationRecord("edit", "c", None, "q"),
            DetectionRecord(None, ["c"], [], [], "q")]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    seen = []
    for _ in range(12):
        chosen, order = next_batch(order, recs, 2, gen)
        assert len({task_of(recs[i]) for i in chosen}) == 1
        seen += chosen
    assert {seen.count(i) for i in range(3)} == {8}  # every record as often (24 picks of 3 records)
    # one task: the first batch_size of the order, as the detection-only trainer took them
    order, gen = [2, 0, 1], torch.Generator().manual_seed(0)
    same = [GenerationRecord("gen", "c", None, "q")] * 3
    assert next_batch(order, same, 2, gen) == ([2, 0], [1])


def test_train_then_ask_routes_generation_and_editing_to_their_pipelines(gen_ckpt, tmp_path, capsys):
    """Mixed generation + editing + detection records, one task per batch; the trained LLM answers with
    a [GEN] or [EDIT] route, and `ask` draws (or edits) an image from that route's hidden states."""
    rows = _pictures(tmp_path)
    rows.append({"image": "red.png", "objects": [{"phrase": "red square", "box": [20, 12, 60, 52]}]})
    _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "trained"
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(gen_ckpt), "-o", str(out),
                 "--steps", "160", "--lr", "2e-3", "--batch-size", "2", "--device", "cpu"]) == 0  # fmt: skip
    assert "on 5 records (0 skipped)" in capsys.readouterr().out
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert {e["task"] for e in log} == {"gen", "edit", "det"}
    for e in log:  # each step's loss is its task's
        assert ("sd_loss" in e, "ip2p_loss" in e, "det_loss" in e) == tuple(
            e["task"] == t for t in ("gen", "edit", "det")
        )
    assert log[-1]["lm_loss"] < 0.1
    first = [e["sd_loss"] for e in log[:40] if "sd_loss" in e]
    last = [e["sd_loss"] for e in log[-40:] if "sd_loss" in e]
    assert sum(last) / len(last) < sum(first) / len(first)

    assert main(["visionllm", "ask", str(out), "--question", "Generate image with caption: a red square.",
                 "--steps", "3", "-o", str(tmp_path / "drawn"), "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["text"].startswith("Here it is [GEN]") and result["routes"][0]["kind"] == "gen"
    assert result["images"] == [{"route": 0, "kind": "gen", "file": str(tmp_path / "drawn" / "route0.png"),
                                 "size": [64, 64]}]  # fmt: skip
    assert Image.open(tmp_path / "drawn" / "route0.png").size == (64, 64)
    assert json.loads((tmp_path / "drawn" / "answer.json").read_text()) == result

    assert main(["visionllm", "ask", str(out), "--question", "<image>\nMake the square blue.", "--image",
                 str(tmp_path / "red.png"), "--steps", "3", "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["routes"][0]["kind"] == "edit" and result["images"][0]["kind"] == "edit"
    assert result["images"][0]["file"] is None and result["images"][0]["size"] == [80, 64]  # the input's size

    # a route whose decoder the model lacks is reported, not run
    model, tok = load_visionllm(out)
    model.sd = None
    result = answer(model, tok, "Generate image with caption: a blue square.")
    assert result["images"] == [] and result["not_run"] == [{"route": 0, "reason": "the model has no sd"}]


def test_generation_training_resumes_exactly_and_keeps_frozen_parts_out_of_the_state(
    gen_ckpt, tmp_path, capsys
):
    from safetensors.torch import load_file

    _write(tmp_path / "d.jsonl", _pictures(tmp_path))
    args = [str(tmp_path / "d.jsonl"), "--model", str(gen_ckpt), "--save-every", "2", "--batch-size", "2",
            "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["visionllm", "train", *args, "--steps", "4", "-o", str(whole)]) == 0
    assert main(["visionllm", "train", *args, "--steps", "2", "-o", str(parts)]) == 0
    state = torch.load(parts / "train_state.pt", weights_only=False)["model"]
    assert "ip2p.sd_unet.conv_in.weight" in state  # InstructPix2Pix's UNet trains (upstream)
    assert not [
        k for k in state if k.startswith(("sd.sd_unet.", "sd.sd_vae.", "ip2p.sd_vae.", "sd.sd_text_encoder."))
    ]
    assert main(["visionllm", "train", *args, "--steps", "4", "-o", str(parts)]) == 0
    assert "2 steps (4 in all)" in capsys.readouterr().out
    assert (parts / "train_log.jsonl").read_text() == (whole / "train_log.jsonl").read_text()
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unet = "instruct_pix2pix/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / unet), load_file(parts / unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in load_file(gen_ckpt / unet).items())  # it did train


def test_records_for_a_decoder_the_model_lacks_are_skipped_and_cli_errors_are_one_line(tmp_path, capsys):
    _write(tmp_path / "d.jsonl", _pictures(tmp_path)[:1])
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    capsys.readouterr()
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o",
                 str(tmp_path / "o")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "no usable records (first skipped: line 1: the model has no sd for [GEN])" in err
    )
    # an answer without routes still gets its folder and answer.json
    assert main(["visionllm", "ask", str(init), "--question", "hi", "--max-new-tokens", "3", "-o",
                 str(tmp_path / "said")]) == 0  # fmt: skip
    said = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "said" / "answer.json").read_text()) == said and said["images"] == []
    for argv, want in (
        (["init", "-o", str(tmp_path / "x"), "--gen", str(tmp_path / "nowhere")], "--gen: "),
        (["init", "-o", str(tmp_path / "x"), "--train-gen-unet"], "--train-gen-unet: needs --gen"),
        (["ask", str(init), "--question", "<image> what is it?"], "no --image is given"),
        (["ask", str(init), "--question", "hi", "--steps", "0"], "--steps"),
    ):
        assert main(["visionllm", *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err, (argv, err)


def test_edit_records_need_their_input_image(tmp_path):
    _pictures(tmp_path)
    with pytest.raises(InputError, match="image: missing"):
        parse_generation_record({"route": "edit", "caption": "x", "output_image": "red.png"}, tmp_path)


def test_an_undecodable_image_is_skipped_when_read_not_a_crash_mid_training(tmp_path):
    """A truncated file has a readable header: only decoding finds it, which training did when it drew
    the record (the run stopped there, and again at every resume)."""
    _pictures(tmp_path)
    data = (tmp_path / "red.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _write(tmp_path / "d.jsonl", [
        {"route": "gen", "caption": "a red square", "output_image": "cut.png"},
        {"route": "edit", "image": "cut.png", "caption": "make it blue", "output_image": "blue.png"},
        {"route": "gen", "caption": "a blue square", "output_image": "blue.png"},
    ])  # fmt: skip
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [r.line for r in records] == [3]
    assert [s["line"] for s in skipped] == [1, 2]
    assert skipped[0]["reason"].startswith("output_image: ") and "cut.png" in skipped[0]["reason"]
    assert skipped[1]["reason"].startswith("image: ") and "truncated" in skipped[1]["reason"]


def test_edit_instructions_are_capitalised_as_upstreams(tmp_path):
    """upstream's ip2p.py: ``caption.strip().capitalize().strip('.') + '.'`` (str.capitalize lowers the
    rest)."""
    _pictures(tmp_path)
    record = {"route": "edit", "image": "red.png", "output_image": "blue.png"}
    for caption, want in (("Make it look like a Van Gogh.", "Make it look like a van gogh."),
                          ("turn the SKY red", "Turn the sky red."), (".", ".")):  # fmt: skip
        assert parse_generation_record({**record, "caption": caption}, tmp_path).question == want


def test_a_caption_that_lower_cases_to_a_special_token_is_refused(tmp_path):
    """upstream's caption cleaning lower-cases: ``<DET>`` became the special token ``<det>`` in the prompt."""
    _pictures(tmp_path)
    for caption in ("a <DET> square", "a <IMAGE> square"):
        with pytest.raises(InputError, match="^caption: contains '<"):
            parse_generation_record({"route": "gen", "caption": caption, "output_image": "red.png"}, tmp_path)


def test_a_16_bit_grey_target_keeps_its_grey(tmp_path):
    """PIL converts 16-bit grey to RGB by clipping at 255: a mid-grey 16-bit PNG became white."""
    import numpy as np

    from interleaf.processing.image import load_image

    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert np.array(load_image(tmp_path / "grey16.png")).max() == 128


def test_an_edit_of_an_image_smaller_than_the_vae_factor_is_not_run_and_the_rest_is(monkeypatch):
    """diffusers rounds the edit's size down to the VAE factor: a 1-pixel image became 0 x 0 and the
    whole answer failed (ValueError: height and width must be > 0)."""
    from interleaf.model.visionllm import Generation, Route, init_visionllm

    model, tok = init_visionllm("tiny", gen="tiny", edit="tiny", detector=False)
    hidden = model.config.llm.hidden_size
    routes = [Route(kind, "", torch.randn(64, hidden), 0) for kind in ("edit", "gen")]
    monkeypatch.setattr(model, "generate", lambda *a, **k: Generation([], "x", routes, "stop"))
    result = answer(model, tok, "edit it", Image.new("RGB", (1, 5), "red"), num_inference_steps=1)
    assert result["not_run"] == [{"route": 0, "reason": "the image (1x5) has a side under ip2p's 2 pixels"}]
    assert [(i["route"], i["image"].size) for i in result["images"]] == [(1, (64, 64))]


def test_ask_refuses_a_seed_torch_cannot_take(tmp_path, capsys):
    for seed in (str(2**64), str(-(2**63) - 1)):
        assert main(["visionllm", "ask", str(tmp_path), "--question", "hi", "--seed", seed]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--seed" in err, err


def test_a_bad_diffusion_setting_in_the_checkpoint_names_the_file_and_section(gen_ckpt, tmp_path):
    import shutil

    broken = shutil.copytree(gen_ckpt, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["visionllmv2"]["ip2p"]["cfg_drop_rate"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    want = f"^{broken / 'config.json'}: visionllmv2.ip2p.cfg_drop_rate: must be in \\[0, 0.5\\], got 2$"
    with pytest.raises(ConfigError, match=want):
        load_visionllm(broken)


def test_a_generation_target_too_elongated_to_square_is_skipped(tmp_path):
    """Upstream pads a target to a square before resizing: a 1 x 10000 strip would become a 100M-pixel
    canvas (past PIL's decompression-bomb limit), so the record is skipped, not a crash mid-run."""
    Image.new("RGB", (10000, 1), "red").save(tmp_path / "strip.png")
    Image.new("RGB", (2000, 1), "red").save(tmp_path / "short.png")
    _write(
        tmp_path / "d.jsonl",
        [{"route": "gen", "caption": "a strip", "output_image": n} for n in ("strip.png", "short.png")],
    )
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [r.output_image.name for r in records] == ["short.png"]
    assert (
        skipped[0]["line"] == 1 and "10000x1 would be padded to a 10000x10000 square" in skipped[0]["reason"]
    )
