"""VisionLLM v2's visual prompts: the ``<region>`` token, upstream's region encoder, region records and
`visionllm ask --region`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.cli import main
from interleaf.errors import InputError
from interleaf.model.visionllm import (
    REGION_TOKEN,
    RegionEncoder,
    Regions,
    answer,
    init_visionllm,
    load_visionllm,
    region_inputs,
    save_visionllm,
)
from interleaf.train.visionllm import read_records, task_of

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def _squares(folder, n: int, seed: int, prefix: str) -> list[dict]:
    """112 px images with a red and a blue square; one record per square asking its colour."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        img = np.full((112, 112, 3), 128, np.uint8)
        taken = []
        for colour in rng.sample(sorted(COLOURS), 2):
            while True:
                s = rng.randint(24, 40)
                x, y = rng.randint(0, 112 - s), rng.randint(0, 112 - s)
                if all(x + s <= a or a + t <= x or y + s <= b or b + t <= y for a, b, t in taken):
                    break
            taken.append((x, y, s))
            img[y : y + s, x : x + s] = COLOURS[colour]
            rows.append({"image": f"{prefix}{i}.png", "regions": [[x, y, x + s, y + s]],
                         "question": "<image>\nWhat colour is <region>?", "answer": colour})  # fmt: skip
        Image.fromarray(img).save(folder / f"{prefix}{i}.png")
    return rows


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_region_encoder_has_upstreams_weights_and_samples_mask_pixels_as_it_does():
    enc = RegionEncoder(embed_dim=32, out_dim=48, patch_size=14, num_points=5)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes == {
        "mask_embedding.0.weight": (64, 4, 7, 7), "mask_embedding.0.bias": (64,),
        "mask_embedding.1.weight": (64,), "mask_embedding.1.bias": (64,),
        "mask_embedding.3.weight": (256, 64, 2, 2), "mask_embedding.3.bias": (256,),
        "mask_embedding.4.weight": (256,), "mask_embedding.4.bias": (256,),
        "mask_embedding.6.weight": (32, 256, 1, 1), "mask_embedding.6.bias": (32,),
        "up_dim.weight": (48, 32), "up_dim.bias": (48,),
    }  # fmt: skip
    # LayerNorm2d is a LayerNorm over the channels
    x = torch.randn(2, 64, 3, 5)
    ln = enc.mask_embedding[1]
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.normal_()
    want = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (64,), ln.weight, ln.bias, 1e-6).permute(
        0, 3, 1, 2
    )
    assert torch.allclose(ln(x), want, atol=1e-5)
    # pixels as (column / side, row / side), in pixel order; a larger mask gives a subset of num_points
    masks = torch.zeros(2, 28, 28)
    masks[0, 3, 4] = masks[0, 10, 2] = 1
    masks[1, 5:9, 5:9] = 1
    points, valid = enc.sample_points(masks, torch.Generator().manual_seed(0))
    assert points.shape == (2, 5, 2) and valid.tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    assert torch.allclose(points[0, :2], torch.tensor([[4 / 28, 3 / 28], [2 / 28, 10 / 28]]))
    picked = (points[1] * 28).round().long()
    assert (
        all(masks[1, int(y), int(x)] == 1 for x, y in picked)
        and len({tuple(p) for p in picked.tolist()}) == 5
    )
    assert picked[:, 1].tolist() == sorted(picked[:, 1].tolist())  # row-major order kept


def test_region_features_pool_the_mask_and_sum_the_levels_as_upstream():
    """With patch 2 (one mask-embedding cell per pixel pair), the feature of a one-pixel mask is the
    bilinear sample of (mask embedding + level 1 [+ level 2 ...]) at that pixel, averaged over levels."""
    torch.manual_seed(0)
    enc = RegionEncoder(embed_dim=8, out_dim=8, patch_size=4, hidden_dim=16).eval()
    image = torch.randn(1, 3, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[0, 6, 10] = 1
    levels = [torch.randn(1, 16, 8) for _ in range(3)]
    got = enc(image, mask, levels)
    base = enc.mask_embedding(torch.cat([image, mask[:, None]], 1))  # [1, 8, 4, 4]
    outs, x = [], base
    for level in levels:
        x = x + level.transpose(1, 2).reshape(1, 8, 4, 4)
        grid = torch.tensor([[[[2 * 10 / 16 - 1, 2 * 6 / 16 - 1]]]])
        outs.append(enc.up_dim(torch.nn.functional.grid_sample(x, grid, align_corners=False)[0, :, 0, 0]))
    assert torch.allclose(got[0], torch.stack(outs).mean(0), atol=1e-5)


def test_regions_replace_their_tokens_and_a_count_mismatch_is_one_error(tmp_path):
    model, tok = init_visionllm("tiny", detector=False, region=True)
    model.config.force_image_size, model.config.max_dynamic_patch = 112, 1
    assert tok.convert_tokens_to_ids(REGION_TOKEN) == model.link.region_token_id
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    regions = region_inputs(model, image, [[5, 5, 30, 30], [40, 10, 40.5, 10.5]])
    assert regions.image.shape == (3, 112, 112) and regions.masks.shape == (2, 112, 112)
    # the tile pixels whose centres fall in the box (x 5..30 of 80 -> columns 7..41 of 112)
    cols = regions.masks[0].any(0).nonzero()[:, 0]
    assert (cols.min().item(), cols.max().item()) == (7, 41)
    assert regions.masks[1].sum() == 1  # a box smaller than a pixel still names one
    ids = torch.tensor([tok.encode(f"a {REGION_TOKEN} and {REGION_TOKEN}", add_special_tokens=False)])
    plain = model.embed(ids)
    with_regions = model.embed(ids, regions=[regions])
    where = ids[0] == model.link.region_token_id
    assert torch.equal(plain[0, ~where], with_regions[0, ~where])
    assert not torch.allclose(plain[0, where], with_regions[0, where])
    with pytest.raises(InputError, match="row 0 has 2 <region> tokens and 1 regions"):
        model.embed(ids, regions=[Regions(regions.image, regions.masks[:1])])
    # saved and loaded with its region encoder
    save_visionllm(model, tok, tmp_path / "ck")
    again, tok2 = load_visionllm(tmp_path / "ck")
    assert again.link.region_token_id == model.link.region_token_id and again.region_encoder is not None
    assert torch.equal(again.embed(ids, regions=[regions]), with_regions)


def test_cli_trains_the_region_encoder_to_tell_which_square_a_region_names(tmp_path, capsys):
    """Each image has a red and a blue square and the same question for both: only the region tells
    them apart, so answering right on unseen images needs the region encoder end to end."""
    rows = _squares(tmp_path, 8, seed=1, prefix="tr")
    _write(tmp_path / "train.jsonl", rows)
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--region-encoder"]) == 0  # fmt: skip
    out = tmp_path / "trained"
    assert main(["visionllm", "train", str(tmp_path / "train.jsonl"), "--model", str(init), "-o", str(out),
                 "--steps", "200", "--lr", "2e-3", "--device", "cpu"]) == 0  # fmt: skip
    assert "on 16 records (0 skipped)" in capsys.readouterr().out
    hits = 0
    for row in _squares(tmp_path, 6, seed=2, prefix="te"):
        box = ",".join(str(v) for v in row["regions"][0])
        assert main(["visionllm", "ask", str(out), "--question", row["question"], "--image",
                     str(tmp_path / row["image"]), "--region", box, "--max-new-tokens", "4", "--device", "cpu"]) == 0  # fmt: skip
        hits += json.loads(capsys.readouterr().out)["text"].startswith(row["answer"])
    print("hits", hits)
    assert hits >= 10, hits  # of 12 (12 of 12 when written)


def test_bad_region_records_are_skipped_with_their_reason(tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    good = {"image": "a.png", "regions": [[1, 1, 9, 9]], "question": "What is <region>?", "answer": "a cat"}
    rows = [
        good,
        {**good, "regions": []},
        {**good, "regions": [[1, 1, "x", 9]]},
        {**good, "regions": [[9, 1, 1, 9]]},
        {**good, "regions": [[50, 1, 60, 9]]},
        {**good, "question": "What is this?"},
        {**good, "regions": [[1, 1, 9, 9], [2, 2, 5, 5]]},
        {**good, "answer": ""},
        {**good, "answer": "it is <region>"},
        {**good, "question": "What is <region> [DET]?"},
    ]
    _write(tmp_path / "d.jsonl", rows)
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [task_of(r) for r in records] == ["region"]
    want = ["regions: must be a non-empty list", "regions[0]: must be [x1", "regions[0]: x2 > x1",
            "lies outside the 40x30 image", "holds 0 '<region>', for 1 regions", "holds 1 '<region>', for 2",
            "answer: missing", "answer: contains '<region>'", "contains '[DET]'"]  # fmt: skip
    assert [s["line"] for s in skipped] == list(range(2, 11))
    for w, s in zip(want, skipped):
        assert w in s["reason"], (w, s)
    # a model without a region encoder skips them, and says why
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    capsys.readouterr()
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o",
                 str(tmp_path / "o")]) == 1  # fmt: skip
    assert "line 1: the model has no region encoder" in capsys.readouterr().err
    # and `ask` refuses regions it cannot use, in one line
    for argv, err in (
        (["--question", "<region>?", "--region", "1,2,3"], "--region: must be x1,y1,x2,y2"),
        (["--question", "<region>?", "--region", "1,1,5,5"], "--region: needs --image"),
        (
            ["--question", "hi", "--image", str(tmp_path / "a.png"), "--region", "1,1,5,5"],
            "holds 0 '<region>', for 1",
        ),
        (
            ["--question", "<region>?", "--image", str(tmp_path / "a.png"), "--region", "50,1,60,9"],
            "--region: [50.0, 1.0, 60.0, 9.0] lies outside the 40x30 image",
        ),
    ):
        assert main(["visionllm", "ask", str(init), *argv]) == 1
        got = capsys.readouterr().err
        assert got.count("\n") == 1 and err in got, (argv, got)


def _tiny_region_model():
    torch.manual_seed(0)
    model, tok = init_visionllm("tiny", detector=False, region=True)
    model.config.force_image_size, model.config.max_dynamic_patch = 112, 1
    return model, tok


def test_a_sub_pixel_box_over_the_left_or_top_edge_names_the_pixel_on_that_edge():
    """A box narrower than a tile pixel whose centre lies just off the image (a record's box may
    overlap the image by a fraction of a pixel) named a pixel on the opposite side: the negative
    index wrapped around."""
    model, _ = _tiny_region_model()
    image = Image.new("RGB", (80, 60))
    masks = region_inputs(model, image, [[-5, 10, 0.2, 10.3], [10, -5, 10.3, 0.2]]).masks
    assert masks[0].nonzero().tolist() == [[18, 0]]  # row of y 10.15, the first column
    assert masks[1].nonzero().tolist() == [[0, 14]]  # the first row, column of x 10.15


def test_a_box_off_the_image_is_refused_not_pinned_to_some_pixel(tmp_path, capsys):
    """`ask --region` and answer(regions=) checked only x2 > x1 and y2 > y1: a box wholly off the image
    became a mask of one arbitrary pixel (a corner, or one wrapped from a negative index)."""
    model, tok = _tiny_region_model()
    image = Image.new("RGB", (40, 30))
    for box in ([50, 1, 60, 9], [-20, -20, -5, -5], [1, 30, 9, 40]):
        with pytest.raises(InputError, match=r"regions\[1\]: .* lies outside the 40x30 image"):
            region_inputs(model, image, [[1, 1, 9, 9], box])
    with pytest.raises(InputError, match="lies outside"):
        answer(model, tok, "<image>\nWhat is <region>?", image, max_new_tokens=1, regions=[[50, 1, 60, 9]])


def test_a_region_token_without_its_region_is_refused_by_generate_and_answer():
    """answer()/generate() with a <region> in the prompt but no regions ran on the token's bare
    embedding, silently (forward's count check only ran when regions were given)."""
    model, tok = _tiny_region_model()
    image = Image.new("RGB", (40, 30))
    with pytest.raises(InputError, match="1 <region> tokens and no regions"):
        answer(model, tok, "<image>\nWhat is <region>?", image, max_new_tokens=1)
    ids = torch.tensor([tok.encode(f"a {REGION_TOKEN}", add_special_tokens=False)])
    with pytest.raises(InputError, match="1 <region> tokens and no regions"):
        model.generate(ids, max_new_tokens=1)


def test_answer_with_a_region_is_repeatable_and_leaves_the_callers_rng_alone():
    """A mask with more pixels than num_points contributes a random subset of them (2304 of a 448 px
    tile: most boxes); answer() drew it from the global RNG, so the same call gave another region
    feature each time, and moved the caller's RNG."""
    model, tok = _tiny_region_model()
    model.region_encoder.num_points = 20
    feats: list[torch.Tensor] = []
    model.region_encoder.register_forward_hook(lambda m, i, o: feats.append(o.clone()))
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 80, 3), dtype=np.uint8))
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        answer(model, tok, "<image>\nWhat is <region>?", image, max_new_tokens=1, regions=[[0, 0, 40, 40]])
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(feats[0], feats[1])


def test_vision_levels_are_upstreams_last_three_hidden_states_also_for_a_shallow_vit():
    """Upstream takes ``hidden_states[-3:]`` (embeddings output, block 1 .. block L outputs): for a
    2-block ViT (the tiny preset) that is the embeddings and both blocks; only 2 levels came back."""
    model, _ = _tiny_region_model()
    vit = model.vision_model.eval()
    pixels = torch.randn(1, 3, 112, 112)
    states = [vit.embeddings(pixels)]
    for layer in vit.encoder.layers:
        states.append(layer(states[-1]))
    levels = model.vision_levels(pixels)
    assert len(vit.encoder.layers) == 2 and len(levels) == 3
    assert all(torch.allclose(a, b[:, 1:]) for a, b in zip(levels, states[-3:]))


def test_embed_checks_every_row_against_its_regions():
    """embed(regions=) replaced the rows it was given regions for: a batch with fewer entries than
    rows, or with None entries only, left those rows' <region> tokens on their bare embedding."""
    model, tok = _tiny_region_model()
    regions = region_inputs(model, Image.new("RGB", (40, 30)), [[1, 1, 9, 9]])
    ids = torch.tensor([tok.encode(f"a {REGION_TOKEN}", add_special_tokens=False)] * 2)
    with pytest.raises(InputError, match="regions: 1 rows for a batch of 2"):
        model.embed(ids, regions=[regions])
    with pytest.raises(InputError, match="row 0 has 1 <region> tokens and 0 regions"):
        model.embed(ids, regions=[None, None])
