"""VisionLLM v2's masks end to end: COCO polygon / RLE masks in detection records, the detector's mask
head through init, save and load, training, ``answer`` / ``visionllm detect`` / ``ask`` ([SEG] routes),
and eval-det's segm AP, each checked against pycocotools itself."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from interleaf.cli import main
from interleaf.errors import ConfigError, InputError
from interleaf.eval.detection import (
    STAT_NAMES,
    coco_ground_truth,
    coco_results,
    coco_scores,
    detect_categories,
)
from interleaf.model.visionllm import (
    Generation,
    Route,
    VisionLLMv2Model,
    answer,
    detector_inputs,
    init_visionllm,
    load_visionllm,
    save_visionllm,
)
from interleaf.train.visionllm import (
    DetectionRecord,
    collate_detection,
    encode_detection,
    parse_detection_record,
    read_records,
    train_visionllm,
)
from test_visionllm import _Forced
from test_visionllm_train import _write, squares

MASK_DIM = 16


def _drawing(model: VisionLLMv2Model, seed: int = 0) -> VisionLLMv2Model:
    """``model`` with its mask MLPs' last layers random: they start at zero (transformers' init, as
    upstream's head starts), where every mask logit is 0 and no pixel passes ``sigmoid > 0.5``."""
    g = torch.Generator().manual_seed(seed)
    gdino = model.gdino.gdino
    with torch.no_grad():
        for head in (gdino.mask_embed[0], gdino.model.mask_embed):
            last = head.layers[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(torch.randn(last.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def seg_model():
    """The tiny model with a mask head that draws (MLLM tiles of 112, detector input 64)."""
    model, tok = init_visionllm("tiny", mask_dim=MASK_DIM, seed=0)
    model.config.force_image_size, model.config.max_dynamic_patch, model.link.detector_size = 112, 1, 64
    return _drawing(model).eval(), tok


def _seg_folder(folder, mask_dim: int = 8):
    """A saved tiny model with a drawing mask head (MLLM tiles of 112, detector input 64)."""
    model, tok = init_visionllm("tiny", mask_dim=mask_dim, seed=0)
    model.config.force_image_size, model.config.max_dynamic_patch, model.link.detector_size = 112, 1, 64
    return save_visionllm(_drawing(model), tok, folder)


def _with_masks(rows: list[dict]) -> list[dict]:
    """``squares`` records whose objects carry their square as a COCO polygon."""
    out = []
    for row in rows:
        objects = []
        for obj in row["objects"]:
            x1, y1, x2, y2 = obj["box"]
            objects.append({**obj, "mask": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
        out.append({**row, "objects": objects})
    return out


def _coco_decode(segm, height: int, width: int) -> np.ndarray:
    """pycocotools' own drawing of a COCO segmentation (``COCO.annToRLE``), [h, w] uint8."""
    if isinstance(segm, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = coco_mask.frPyObjects(segm, height, width)
    else:
        rle = segm
    return coco_mask.decode(rle)


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))


# ----------------------------------------------------------------------------- records


def test_polygon_and_rle_masks_are_drawn_by_pycocotools_and_resized_into_the_detector_frame(
    tmp_path, seg_model
):
    model, tok = seg_model
    w, h = 100, 60
    triangle = [[10, 5, 60, 5, 30, 50]]
    two_parts = [[70, 10, 90, 10, 90, 30, 70, 30], [72, 40, 95, 40, 95, 55]]
    blob = np.zeros((h, w), np.uint8)
    blob[35:58, 5:40] = 1
    blob[45:50, 10:20] = 0  # a hole
    compressed = coco_mask.encode(np.asfortranarray(blob))
    compressed = {"size": [h, w], "counts": compressed["counts"].decode()}
    bar = np.zeros((h, w), np.uint8)
    bar[2:6, 40:98] = 1
    flat = bar.flatten(order="F")  # COCO's uncompressed runs: column-major, from a run of 0s
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], edges])).tolist()
    uncompressed = {"size": [h, w], "counts": runs}
    assert coco_mask.decode(coco_mask.frPyObjects(uncompressed, h, w)).sum() == bar.sum()

    segms = [triangle, two_parts, compressed, uncompressed]
    image = np.full((h, w, 3), 128, np.uint8)
    for segm in segms:  # the objects, painted red where pycocotools draws them
        image[_coco_decode(segm, h, w).astype(bool)] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "a.png")
    boxes = [[10, 5, 60, 50], [70, 10, 95, 55], [5, 35, 40, 58], [40, 2, 98, 6]]
    raw = {
        "image": "a.png",
        "objects": [{"phrase": "red", "box": b, "mask": m} for b, m in zip(boxes, segms)],
    }
    record = parse_detection_record(raw, tmp_path)
    assert len(record.masks) == 4
    for rle, segm in zip(record.masks, segms):  # at the image's size, as pycocotools draws them
        assert rle["size"] == [h, w]
        assert np.array_equal(coco_mask.decode(rle), _coco_decode(segm, h, w))

    # a second, larger image in the batch pads the first: its masks stay its own resized size
    Image.new("RGB", (80, 120), "grey").save(tmp_path / "b.png")
    other = parse_detection_record({"image": "b.png", "objects": [{"phrase": "red", "box": [1, 1, 9, 9],
                                    "mask": [[1, 1, 9, 1, 9, 9]]}]}, tmp_path)  # fmt: skip
    batch = collate_detection(
        [encode_detection(model, tok, record), encode_detection(model, tok, other)], 0, detector_size=64
    )
    alone, _ = detector_inputs([Image.open(tmp_path / "a.png")], 64)
    rh, rw = alone.shape[-2:]  # the processor's own resize of the image: shortest edge 64
    assert (rh, rw) == (64, 106)
    masks = batch["det_targets"][0]["masks"]
    assert masks.dtype == torch.bool and masks.shape == (4, rh, rw)
    assert batch["det_pixel_values"].shape[-2:] == (96, 106)  # padded to b.png's 96 x 64
    for got, segm in zip(masks, segms):  # pycocotools' mask resized as the processor resizes masks
        assert np.array_equal(got.numpy(), _nearest(_coco_decode(segm, h, w), rh, rw).astype(bool))
    # and they sit where the objects are in the detector's (bilinearly resized) image: its red pixels
    pixels = batch["det_pixel_values"][0, :, :rh, :rw]
    red = (pixels[0] > 1.0) & (pixels[2] < 0)  # ImageNet-normalised: red high, blue low
    union = masks.any(dim=0)
    assert (red == union).float().mean() > 0.97
    assert batch["det_targets"][1]["masks"].shape == (1, 96, 64)
    # the batch trains: finite mask terms
    with torch.no_grad():
        out = model(**batch)
    assert {"loss_mask", "loss_dice"} <= set(out.det.loss_dict)
    assert all(torch.isfinite(v) for k, v in out.det.loss_dict.items() if "mask" in k or "dice" in k)


def test_bad_masks_are_one_line_errors_naming_the_field(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    box = [1, 1, 9, 9]
    ok = [[1, 1, 9, 1, 9, 9]]
    cases = [
        ("square", "objects[0].mask: must be polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or an RLE"),
        ([1, 1, 9, 1, 9, 9], "objects[0].mask: must be polygons"),  # one flat list: not a list of polygons
        ([], "objects[0].mask: must be polygons"),
        ([[1, 1, 9, 9]], "objects[0].mask[0]: a polygon needs 3 or more (x, y) points, got 4 numbers"),
        ([ok[0], [1, 1, 9, 1, 9]], "objects[0].mask[1]: a polygon needs 3 or more (x, y) points, got 5"),
        ([[1, 1, 9, "x", 9, 9]], "objects[0].mask[0]: a polygon is [x1, y1, x2, y2, ...], numbers"),
        ([[1, 1, 9, 1, 9, True]], "objects[0].mask[0]: a polygon is"),
        ([[30, 30, 40, 30, 40, 40]], "objects[0].mask: covers no pixel of the 20x10 image"),
        # pycocotools would draw every edge point at 5x scale: a wild coordinate takes gigabytes or the OOM
        # killer instead of an error
        ([[1, 1, 9, 1, 3e8, 9]], "objects[0].mask[0]: coordinate 300000000.0 lies far outside the 20x10 image"),
        ([ok[0], [1, -1e12, 9, 1, 9, 9]], "objects[0].mask[1]: coordinate -1000000000000.0 lies far outside"),
        ({"counts": [200]}, "objects[0].mask: an RLE needs size [height, width], integers"),
        ({"size": [20, 10], "counts": [200]}, "RLE size [20, 10] is not the image's [height, width] [10, 20]"),
        ({"size": [10, 20], "counts": [100, 50]}, "objects[0].mask: counts: the runs cover 150 pixels, not 10x20 = 200"),
        ({"size": [10, 20], "counts": [100, -5, 105]}, "objects[0].mask: counts: a negative run length"),
        ({"size": [10, 20], "counts": 7}, "objects[0].mask: counts: must be COCO's compressed string or a list"),
        ({"size": [10, 20], "counts": "ab~"}, "objects[0].mask: counts: not a COCO compressed RLE (character '~'"),
        ({"size": [10, 20], "counts": "Q"}, "objects[0].mask: counts: not a COCO compressed RLE (the string ends"),
        ({"size": [10, 20], "counts": "52"}, "objects[0].mask: counts: the runs cover 7 pixels, not 10x20 = 200"),
        ({"size": [10, 20], "counts": [200]}, "objects[0].mask: covers no pixel of the 20x10 image"),
    ]  # fmt: skip
    for mask, message in cases:
        with pytest.raises(InputError) as err:
            parse_detection_record({"image": "a.png", "objects": [{"phrase": "cat", "box": box, "mask": mask}]},
                                   tmp_path)  # fmt: skip
        assert message in str(err.value) and "\n" not in str(err.value), (mask, str(err.value))
    mixed = {
        "image": "a.png",
        "objects": [{"phrase": "cat", "box": box, "mask": ok}, {"phrase": "dog", "box": box}],
    }
    with pytest.raises(
        InputError, match=r"^objects\[1\].mask: missing, and objects\[0\] has one \(every object"
    ):
        parse_detection_record(mixed, tmp_path)
    # in a records file: skipped with their line and reason; the good ones kept with their masks
    good = {"image": "a.png", "objects": [{"phrase": "cat", "box": box, "mask": ok}]}
    _write(tmp_path / "d.jsonl", [good, mixed, {**good, "objects": [{**good["objects"][0], "mask": [[1, 2]]}]},
                                  {"image": "a.png", "objects": [{"phrase": "cat", "box": box}]}])  # fmt: skip
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [(r.line, r.masks is not None) for r in records] == [(1, True), (4, False)]
    assert [s["line"] for s in skipped] == [2, 3] and skipped[1]["reason"].startswith("objects[0].mask[0]:")


# ----------------------------------------------------------------------------- init, save, load


def test_init_with_a_mask_head_saves_and_loads_it_exactly(tmp_path, seg_model, capsys):
    model, tok = seg_model
    gdino = model.gdino.gdino
    assert model.gdino.mask_dim == MASK_DIM and gdino.model.mask_features.out_channels == MASK_DIM
    assert model.link.gdino["mask_dim"] == MASK_DIM
    assert model.link.gdino["backbone_config"]["out_indices"] == [1, 2, 3, 4]  # the finest level for masks
    assert model.link.gdino["d_model"] == 64  # the default detector's overrides kept
    names = {k for k in model.state_dict() if k.startswith("gdino.")}
    assert {"gdino.gdino.mask_embed.0.layers.2.weight", "gdino.gdino.model.mask_features.weight",
            "gdino.gdino.model.lateral_convs.0.weight", "gdino.gdino.model.mask_embed.layers.0.weight"} <= names  # fmt: skip
    out = save_visionllm(model, tok, tmp_path / "vl")
    assert json.loads((out / "config.json").read_text())["visionllmv2"]["gdino"]["mask_dim"] == MASK_DIM
    loaded, _ = load_visionllm(out)
    assert loaded.gdino.mask_dim == MASK_DIM
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the decoder layers still share one mask MLP (as they share the box head), trained as one
    shared = loaded.gdino.gdino.mask_embed
    assert all(layer is shared[0] for layer in shared)

    # the CLI: --mask-dim, and what the default leaves out
    assert main(["visionllm", "init", "-o", str(tmp_path / "cli"), "--mask-dim", "8"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["visionllmv2"]["gdino"]["mask_dim"] == 8
    assert load_visionllm(tmp_path / "cli")[0].gdino.gdino.model.mask_features.out_channels == 8
    assert main(["visionllm", "init", "-o", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())["visionllmv2"]["gdino"]
    assert "mask_dim" not in plain and plain["backbone_config"]["out_indices"] == [2, 3, 4]
    capsys.readouterr()
    assert main(["visionllm", "init", "-o", str(tmp_path / "neg"), "--mask-dim", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mask-dim must be >= 0" in err
    # a detector config of one's own whose backbone has one level: no room for the masks' level
    from interleaf.model.grounding_dino import tiny_grounding_dino_config

    one_level = tiny_grounding_dino_config(num_feature_levels=2).to_dict()
    one_level["backbone_config"]["out_indices"], one_level["backbone_config"]["out_features"] = (
        [4],
        ["stage4"],
    )
    with pytest.raises(
        ConfigError, match=r"^gdino: mask_dim needs a backbone with at least two output levels"
    ):
        init_visionllm("tiny", gdino=one_level, mask_dim=8)
    with pytest.raises(ConfigError, match="detector=False builds none"):
        init_visionllm("tiny", detector=False, mask_dim=8)


# ----------------------------------------------------------------------------- training


def _mask_head(model: VisionLLMv2Model) -> dict[str, torch.Tensor]:
    """The mask head's own parameters (nothing else reads them)."""
    return {k: v.detach().clone() for k, v in model.gdino.named_parameters()
            if any(p in k for p in ("mask_features", "lateral_convs", "output_convs", "mask_embed"))}  # fmt: skip


def test_training_on_masks_gives_finite_mask_losses_and_trains_the_mask_head(tmp_path):
    rows = _with_masks(squares(tmp_path, 2, seed=5, size=64))
    _write(tmp_path / "m.jsonl", rows)
    _write(tmp_path / "b.jsonl", squares(tmp_path, 2, seed=5, size=64))
    masked, _ = read_records(tmp_path / "m.jsonl")
    boxes, _ = read_records(tmp_path / "b.jsonl")
    assert all(r.masks is not None for r in masked) and all(r.masks is None for r in boxes)
    for records, learns in ((masked, True), (boxes, False)):
        model, tok = init_visionllm("tiny", mask_dim=MASK_DIM, seed=0)
        model.config.force_image_size, model.config.max_dynamic_patch, model.link.detector_size = 112, 1, 64
        before = _mask_head(model)
        batch = collate_detection([encode_detection(model, tok, r) for r in records], 0, 64)
        with torch.no_grad():
            out = model(**batch)
        terms = {k: v for k, v in out.det.loss_dict.items() if k.startswith(("loss_mask", "loss_dice"))}
        if learns:
            assert {"loss_mask", "loss_dice", "loss_mask_enc", "loss_dice_enc"} <= set(terms)
            assert all(torch.isfinite(v) and v > 0 for v in terms.values()), terms
        else:
            assert not terms  # records without masks add no mask loss
        train_visionllm(model, tok, records, steps=2, batch_size=2, lr=1e-3)
        after = _mask_head(model)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        if learns:  # the pixel decoder and the decoder layers' mask MLP both learn
            assert any("mask_features" in k for k in changed) and any(
                k.startswith("gdino.mask_embed") for k in changed
            )
        else:  # box records never reach the mask head (AdamW skips parameters without gradients)
            assert not changed, changed


def test_mask_records_for_a_detector_without_a_mask_head_are_skipped_with_the_reason(tmp_path, capsys):
    rows = squares(tmp_path, 2, seed=6, size=64)
    _write(tmp_path / "d.jsonl", [*rows, *_with_masks(rows)])
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--detector-size", "64"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o", str(tmp_path / "o"),
                 "--steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0  # fmt: skip
    assert "on 2 records (2 skipped)" in capsys.readouterr().out
    skipped = [json.loads(x) for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"line": n, "reason": "objects' masks: the detector has no mask head (visionllm init "
                        "--mask-dim)"} for n in (3, 4)]  # fmt: skip
    # the Python API refuses them outright, and the forward refuses mask targets it would drop
    model, tok = load_visionllm(init)
    records, _ = read_records(tmp_path / "d.jsonl")
    with pytest.raises(InputError, match="the detector has no mask head"):
        train_visionllm(model, tok, records[2:], steps=1, batch_size=1)
    batch = collate_detection([encode_detection(model, tok, records[2])], 0, 64)
    with pytest.raises(ConfigError, match="mask targets given but the detector has no mask head"):
        model(**batch)


# ----------------------------------------------------------------------------- inference


def _routes(model: VisionLLMv2Model, tok, script_words: list[tuple[str, str]]) -> list[int]:
    """A greedy script emitting ``phrase[ROUTE]`` for each (phrase, route), then the end of turn."""
    script = []
    for i, (phrase, kind) in enumerate(script_words):
        script += tok.encode((", " if i else "") + phrase, add_special_tokens=False)
        script.append(model.link.route_token_ids[kind])
    return [*script, model.config.llm.eos_token_id]


def test_answer_gives_each_seg_detection_its_mask_at_the_images_size_and_det_routes_none(seg_model):
    from interleaf.train.visionllm import json_result

    model, tok = seg_model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    hook = model.language_model.lm_head.register_forward_hook(
        _Forced(_routes(model, tok, [("red square", "seg"), ("blue square", "det")]))
    )
    try:
        result = answer(
            model, tok, "<image>\nSegment the red square.", image, threshold=0.0, max_new_tokens=30
        )
    finally:
        hook.remove()
    assert [(r["kind"], r["phrase"]) for r in result["routes"]] == [
        ("seg", "red square"),
        ("det", "blue square"),
    ]
    dets = result["detections"]
    assert {d["route"] for d in dets} == {0, 1} and len(dets) == model.gdino.config.num_queries
    for d in dets:
        if d["route"] == 0:
            assert (
                isinstance(d["mask"], np.ndarray) and d["mask"].dtype == bool and d["mask"].shape == (70, 90)
            )
        else:
            assert "mask" not in d
    assert 0 < np.mean([d["mask"].mean() for d in dets if d["route"] == 0]) < 1
    # JSON: COCO RLE that pycocotools decodes back to the very mask
    encoded = json_result(result)
    json.dumps(encoded)
    for d, e in zip(dets, encoded["detections"]):
        if "mask" in d:
            assert e["mask"]["size"] == [70, 90] and isinstance(e["mask"]["counts"], str)
            assert np.array_equal(coco_mask.decode(e["mask"]).astype(bool), d["mask"])
        assert e["box"] == d["box"]
    # a detector without a mask head: boxes only, for SEG too
    plain, ptok = init_visionllm("tiny", seed=0)
    plain.config.force_image_size, plain.config.max_dynamic_patch, plain.link.detector_size = 112, 1, 64
    hook = plain.language_model.lm_head.register_forward_hook(
        _Forced(_routes(plain, ptok, [("red square", "seg")]))
    )
    try:
        result = answer(
            plain, ptok, "<image>\nSegment the red square.", image, threshold=0.0, max_new_tokens=30
        )
    finally:
        hook.remove()
    assert result["detections"] and not any("mask" in d for d in result["detections"])


def test_cli_detect_and_ask_write_seg_masks_as_rle_and_png(tmp_path, monkeypatch, capsys):
    init = _seg_folder(tmp_path / "init")

    def scripted(self, input_ids, pixel_values=None, max_new_tokens=64, eos_token_id=None, tokenizer=None,
                 regions=None):  # fmt: skip
        """The model's answer, fixed: a [SEG] and a [DET] route with seeded slot states."""
        g = torch.Generator().manual_seed(0)
        h = self.config.llm.hidden_size
        routes = [Route("seg", "red square", torch.randn(4, h, generator=g), 2),
                  Route("det", "blue square", torch.randn(4, h, generator=g), 5)]  # fmt: skip
        return Generation([], "red square[SEG], blue square[DET]", routes, "stop")

    monkeypatch.setattr(VisionLLMv2Model, "generate", scripted)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 75, 3), dtype=np.uint8)).save(
        tmp_path / "i.png"
    )
    model, tok = load_visionllm(init)
    direct = answer(model, tok, "Segment it.", tmp_path / "i.png", threshold=0.0)
    capsys.readouterr()
    assert main(["visionllm", "detect", str(init), str(tmp_path / "i.png"), "--question", "Segment it.",
                 "--threshold", "0", "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert len(result["detections"]) == len(direct["detections"])
    drawn = []
    for got, want in zip(result["detections"], direct["detections"]):
        assert got["route"] == want["route"] and got["box"] == pytest.approx(want["box"])
        if got["route"] == 0:  # [SEG]
            assert got["mask"]["size"] == [50, 75]
            decoded = coco_mask.decode(got["mask"]).astype(bool)
            assert np.array_equal(decoded, want["mask"])
            drawn.append(decoded.mean())
        else:  # [DET]
            assert "mask" not in got and "mask" not in want
    assert drawn and 0 < max(drawn) < 1  # masks of something, not nothing or everything
    # ask -o: the masks as PNGs too, named by each detection
    assert main(["visionllm", "ask", str(init), "--question", "<image>\nSegment it.", "--image",
                 str(tmp_path / "i.png"), "-o", str(tmp_path / "o"), "--threshold", "0", "--device", "cpu"]) == 0  # fmt: skip
    asked = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "o" / "answer.json").read_text()) == asked
    for k, d in enumerate(asked["detections"]):
        if d["route"] == 0:
            assert d["mask_file"] == str(tmp_path / "o" / f"mask{k}.png")
            png = np.asarray(Image.open(d["mask_file"]))
            assert png.shape == (50, 75) and np.array_equal(png, coco_mask.decode(d["mask"]) * 255)
        else:
            assert "mask_file" not in d and not (tmp_path / "o" / f"mask{k}.png").exists()


# ----------------------------------------------------------------------------- evaluation


def _pycocotools(gt: dict, dt: list, iou_type: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dt), iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


def test_segm_scores_are_pycocotools_on_the_same_masks_in_cocos_own_format():
    """Masks whose areas put them in another COCO size bucket than their boxes (small < 32^2 <=
    medium): the truth's areas must be its masks', and a detection's its mask's (no box in the segm
    results), or AP/AR by size move."""
    h, w = 60, 80

    def rle(x1, y1, x2, y2):
        m = np.zeros((h, w), np.uint8)
        m[y1:y2, x1:x2] = 1
        return coco_mask.encode(np.asfortranarray(m))

    # (category, box, mask rectangle): the first object's box is medium (40 x 35), its mask small
    truth = [(0, [5, 5, 45, 40], [5, 5, 45, 25]), (1, [40, 10, 75, 30], [40, 10, 75, 30]),
             (1, [10, 45, 20, 55], [10, 45, 20, 55])]  # fmt: skip
    records = [DetectionRecord(image=None, phrases=["cat", "dog"], class_labels=[k for k, _, _ in truth],
                               boxes=[b for _, b, _ in truth], question="q",
                               masks=[rle(*m) for _, _, m in truth])]  # fmt: skip
    # (category, score, box, mask rectangle); the second is a false positive, medium box, small mask
    found = [(0, 0.9, [6, 5, 45, 38], [6, 5, 45, 18]), (1, 0.95, [0, 0, 50, 40], [0, 30, 10, 40]),
             (1, 0.8, [45, 10, 75, 30], [45, 10, 75, 30]), (1, 0.7, [0, 40, 20, 60], [0, 40, 20, 60]),
             (0, 0.3, [40, 10, 75, 30], [40, 10, 75, 30])]  # fmt: skip
    detections = [[{"category": k, "score": sc, "box": [float(v) for v in b],
                    "mask": {"size": [h, w], "counts": rle(*m)["counts"].decode()}}
                   for k, sc, b, m in found]]  # fmt: skip
    gt_ours = coco_ground_truth(records, [(w, h)], ["cat", "dog"], masks=True)
    segm = coco_scores(gt_ours, coco_results(detections, "segm"), "segm")
    bbox = coco_scores(gt_ours, coco_results(detections))

    # by hand, in COCO's own format: polygons that pycocotools draws itself, areas of the masks
    def poly(x1, y1, x2, y2):
        return [[x1, y1, x2, y1, x2, y2, x1, y2]]

    gt = {
        "images": [{"id": 0, "width": w, "height": h}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": n + 1, "image_id": 0, "category_id": k + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "area": (m[2] - m[0]) * (m[3] - m[1]), "iscrowd": 0, "segmentation": poly(*m)}
            for n, (k, b, m) in enumerate(truth)
        ],
    }  # fmt: skip
    for a in gt["annotations"]:  # (a polygon along pixel edges draws the pixels inside it, as the RLEs hold)
        assert coco_mask.area(coco_mask.merge(coco_mask.frPyObjects(a["segmentation"], h, w))) == a["area"]
    # (loadRes takes results' masks as RLEs: pycocotools' own, from the polygons)
    dt = [{"image_id": 0, "category_id": k + 1, "score": sc,
           "segmentation": coco_mask.merge(coco_mask.frPyObjects(poly(*m), h, w))} for k, sc, _, m in found]  # fmt: skip
    # (COCOeval turns the truth's polygons into RLEs in place: each run gets its own copy)
    ref = _pycocotools(json.loads(json.dumps(gt)), dt, "segm")
    assert [segm[k] for k in STAT_NAMES] == pytest.approx(ref, abs=1e-12)
    box_dt = [{"image_id": 0, "category_id": k + 1, "score": sc, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
              for k, sc, b, _ in found]  # fmt: skip
    ref_box = _pycocotools(json.loads(json.dumps(gt)), box_dt, "bbox")
    assert [bbox[k] for k in STAT_NAMES] == pytest.approx(ref_box, abs=1e-12)
    assert 0 < segm["AP"] < 1 and segm["AP"] != bbox["AP"]
    assert segm["AP_small"] >= 0 and segm["AP_medium"] == -1.0  # every mask is small


def test_teacher_forced_masks_are_upstreams_post_processing_of_the_topk_queries(seg_model):
    import torch.nn.functional as F

    from interleaf.model.visionllm import detector_inputs
    from interleaf.train.visionllm import DEFAULT_QUESTION, answer_text, pad_examples, prompt_example

    model, tok = seg_model
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    names = ["red square", "blue square"]
    dets = detect_categories(model, tok, image, names, topk=9)
    assert len(dets) == 9 and all(d["mask"]["size"] == [45, 70] for d in dets)
    # upstream's post_process_instseg_gdino on the same forward, step by step
    ex = prompt_example(model, tok, DEFAULT_QUESTION.format(phrases=", ".join(names)), image,
                        answer_text(names, "det", model.link.num_embs))  # fmt: skip
    batch = pad_examples([ex], 0)
    batch.pop("labels")
    px, pmask = detector_inputs([image], model.link.detector_size)
    with torch.no_grad():
        out = model(**batch, det_pixel_values=px, det_pixel_mask=pmask).det
    prob = out.logits[0, :, :2].sigmoid().flatten()
    _, index = prob.topk(9)
    logits = out.pred_masks()[0][index // 2][:, None]  # [topk, 1, h/4, w/4]
    stride = 4  # Swin's first stage: the finest level is a quarter of the input
    up = F.interpolate(logits, size=(logits.shape[-2] * stride, logits.shape[-1] * stride), mode="bilinear",
                       align_corners=False)  # fmt: skip
    rh, rw = int(pmask[0].any(1).sum()), int(pmask[0].any(0).sum())
    want = (
        F.interpolate(up[..., :rh, :rw], size=(45, 70), mode="bilinear", align_corners=False)[:, 0].sigmoid()
        > 0.5
    )
    for d, m in zip(dets, want):
        assert np.array_equal(coco_mask.decode(d["mask"]).astype(bool), m.numpy())
    assert 0 < want.float().mean() < 1


def test_eval_det_scores_segm_as_pycocotools_and_resumes_with_the_masks_stored(tmp_path, monkeypatch, capsys):
    from interleaf.processing.masks import json_rle

    rows = _with_masks(squares(tmp_path, 3, seed=12, size=64))
    _write(tmp_path / "d.jsonl", rows)
    init = _seg_folder(tmp_path / "init")
    # the random detector's own detections, and near-misses of each object (its square shifted by 2
    # pixels, some of the wrong category) for scores between 0 and 1
    from interleaf.eval import detection

    real, asked = detection.detect_categories, []
    of_image = {np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")).tobytes(): r for r in rows}

    def detect_and_near_misses(model, tokenizer, image, categories, topk=100, route="det"):
        asked.append(1)
        found = real(model, tokenizer, image, categories, topk, route)
        h, w = image.height, image.width
        for j, o in enumerate(of_image[np.asarray(image).tobytes()]["objects"]):
            x1, y1, x2, y2 = o["box"]
            m = np.zeros((h, w), np.uint8)
            m[y1 + 2 : y2 + 2, x1 + 2 : x2 + 2] = 1
            k = categories.index(o["phrase"])
            found.append({"category": k if j else 1 - k, "score": 0.99 - 0.1 * j,
                          "box": [x1 + 2, y1 + 2, x2 + 2, y2 + 2], "mask": json_rle(m)})  # fmt: skip
        return found

    monkeypatch.setattr(detection, "detect_categories", detect_and_near_misses)
    args = [
        "visionllm",
        "eval-det",
        str(init),
        str(tmp_path / "d.jsonl"),
        "-o",
        str(tmp_path / "ev"),
        "--device",
        "cpu",
    ]
    assert main([*args, "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["asked"] == 2
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["asked"] == 1 and summary["images"] == 3 and set(summary["segm_scores"]) == set(STAT_NAMES)
    assert "segm_not_scored" not in summary
    out = tmp_path / "ev"
    stored = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    # the reference: pycocotools alone, on the records' own polygons and the stored detections' RLEs
    # categories: the data's phrases in order of first appearance (rows[0] has both)
    cats = {o["phrase"]: k + 1 for k, o in enumerate(rows[0]["objects"])}
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in cats.items()]}
    dt_segm, dt_bbox = [], []
    for i, (row, found) in enumerate(zip(rows, stored)):
        w, h = Image.open(tmp_path / row["image"]).size
        gt["images"].append({"id": i, "width": w, "height": h})
        for o in row["objects"]:
            x1, y1, x2, y2 = o["box"]
            area = float(coco_mask.area(coco_mask.merge(coco_mask.frPyObjects(o["mask"], h, w))))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": cats[o["phrase"]],
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0,
                                      "segmentation": o["mask"]})  # fmt: skip
        # (query, category) pairs of the tiny detector's 20 queries, and the near-misses
        assert len(found["detections"]) == 2 * 20 + 2
        for d in found["detections"]:
            assert d["mask"]["size"] == [h, w] and coco_mask.decode(d["mask"]).shape == (h, w)
            dt_segm.append({"image_id": i, "category_id": d["category"] + 1, "score": d["score"],
                            "segmentation": d["mask"]})  # fmt: skip
            x1, y1, x2, y2 = d["box"]
            dt_bbox.append({"image_id": i, "category_id": d["category"] + 1, "score": d["score"],
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})  # fmt: skip
    ref = _pycocotools(json.loads(json.dumps(gt)), dt_segm, "segm")
    assert [summary["segm_scores"][k] for k in STAT_NAMES] == pytest.approx(ref, abs=1e-12)
    ref_box = _pycocotools(json.loads(json.dumps(gt)), dt_bbox, "bbox")
    assert [summary["scores"][k] for k in STAT_NAMES] == pytest.approx(ref_box, abs=1e-12)
    assert (
        json.loads((out / "coco_results_segm.json").read_text())[0]["segmentation"]
        == stored[0]["detections"][0]["mask"]
    )
    assert "| metric | bbox | segm |" in (out / "report.md").read_text()
    # a rerun asks nothing and scores the same
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["asked"] == 0 and again["segm_scores"] == summary["segm_scores"] and len(asked) == 3
    assert 0 < summary["segm_scores"]["AP"] < 1 and 0 < summary["scores"]["AP"] < 1
    # records with masks but a box-only model: box AP, and why there is no mask AP
    plain = tmp_path / "plain"
    assert main(["visionllm", "init", "-o", str(plain), "--image-size", "112", "--max-tiles", "1",
                 "--detector-size", "64"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["visionllm", "eval-det", str(plain), str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "ev2"),
                 "--device", "cpu"]) == 0  # fmt: skip
    boxes_only = json.loads(capsys.readouterr().out)
    assert (
        "segm_scores" not in boxes_only
        and boxes_only["segm_not_scored"] == "the model's detector has no mask head"
    )
    assert (
        "segm not scored: the model's detector has no mask head"
        in (tmp_path / "ev2" / "report.md").read_text()
    )


def test_dn_number_trains_the_detector_with_denoising_queries(tmp_path, capsys):
    """visionllm init --dn-number: the detector's config keeps it through save and load, and a
    training forward adds the denoising terms (an eval one does not)."""
    assert main(["visionllm", "init", "-o", str(tmp_path / "vl"), "--image-size", "112", "--max-tiles", "1",
                 "--detector-size", "64", "--dn-number", "6"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "vl" / "config.json").read_text())["visionllmv2"]["gdino"]["dn_number"] == 6
    model, tok = load_visionllm(tmp_path / "vl")
    assert model.gdino.denoising_setting("dn_number") == 6
    _write(tmp_path / "b.jsonl", squares(tmp_path, 2, seed=5, size=64))
    records, _ = read_records(tmp_path / "b.jsonl")
    batch = collate_detection([encode_detection(model, tok, r) for r in records], 0, 64)
    model.train()
    with torch.no_grad():
        out = model(**batch)
    dn = out.det.detection.denoising
    assert dn is not None and dn.queries.groups == 6 // max(len(r.class_labels) for r in records)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"} <= set(out.det.loss_dict)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.det.detection.denoising is None and not any("_dn" in k for k in out.det.loss_dict)
    assert main(["visionllm", "init", "-o", str(tmp_path / "plain")]) == 0
    assert (
        "dn_number"
        not in json.loads((tmp_path / "plain" / "config.json").read_text())["visionllmv2"]["gdino"]
    )
    capsys.readouterr()
    assert main(["visionllm", "init", "-o", str(tmp_path / "neg"), "--dn-number", "-1"]) == 1
    assert "--dn-number must be >= 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="detector=False builds none"):
        init_visionllm("tiny", detector=False, dn_number=8)
