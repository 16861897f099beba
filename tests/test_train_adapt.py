"""Domain adaptation: converters to the conversation format, and adapt fine-tuning with mixed data."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from interleaf.cli import main
from interleaf.train.adapt import VIEW_H, VIEW_W, convert_coco, norm_box, stitch_views


def test_norm_box_integers_in_0_1000():
    assert norm_box([20, 10, 50, 40], 200, 100) == [100, 100, 350, 500]
    assert norm_box([-5, 0, 400, 300], 200, 100) == [0, 0, 1000, 1000]  # clamped
    assert norm_box([10, 10, 30, 30], 200, 100, xywh=False) == [50, 100, 150, 300]


def test_coco_detection_and_grounding(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}, {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [20, 10, 50, 40]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 100]},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [100, 50, 100, 50]},
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert (
        main(
            [
                "adapt",
                "convert",
                "coco-det",
                str(tmp_path / "ann.json"),
                "--images",
                str(tmp_path),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(ln) for ln in (out / "coco_det.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # 1 detection + 2 grounding (image 2 has no annotations)
    det = rows[0]["conversations"][1]["value"]
    assert (
        det
        == "<ref>car</ref><box>[[100, 100, 350, 500], [0, 0, 500, 1000]]</box><ref>person</ref><box>[[500, 500, 1000, 1000]]</box>"
    )
    ground = rows[2]["conversations"]
    assert (
        "<ref>person</ref>" in ground[0]["value"]
        and ground[1]["value"] == "<ref>person</ref><box>[[500, 500, 1000, 1000]]</box>"
    )
    meta = json.loads((out / "meta.json").read_text())
    assert (out / meta["coco_det"]["root"] / "a.jpg").resolve() == (tmp_path / "a.jpg").resolve()


def test_bad_coco_input_is_one_line_and_bad_annotations_are_counted(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    good = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}, {"id": 2, "file_name": "b.jpg", "width": "50", "height": 50}],
        "annotations": [{"image_id": 1, "category_id": 3, "bbox": [20, 10, 50, 40]}, {"image_id": 1, "category_id": 3, "bbox": [1, 2]},
                        {"image_id": 1, "category_id": 3}, {"image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 3, "name": "car"}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(good))

    def convert(ann, images="imgs", out="out"):
        argv = ["adapt", "convert", "coco-det", str(tmp_path / ann), "--images", str(tmp_path / images)]
        return main([*argv, "-o", str(tmp_path / out)])

    assert convert("ann.json") == 0  # before: KeyError 'bbox', ValueError (short bbox), TypeError (str width)
    out = capsys.readouterr().out
    assert "'bad_size': 1" in out and "'bad_bbox': 2" in out
    rows = (tmp_path / "out" / "coco_det.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "[[100, 100, 350, 500]]" in rows[0]
    bad = {
        "list.json": [1],
        "catint.json": {**good, "categories": [5]},
        "noname.json": {**good, "categories": [{"id": 3}]},
        "annint.json": {**good, "annotations": [5]},
    }
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    cases = [("list.json", "imgs", "expected a COCO object"), ("catint.json", "imgs", "'categories' must be an object"),
             ("noname.json", "imgs", "string 'name'"), ("annint.json", "imgs", "'annotations' must be an object"),
             ("bin.json", "imgs", "bin.json: cannot read COCO JSON"), ("ann.json", "nowhere", "nowhere: not a folder")]  # fmt: skip
    for ann, images, message in cases:
        assert convert(ann, images, out=f"out-{ann}") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (ann, err)
        assert not (tmp_path / f"out-{ann}").exists()
    assert convert("ann.json", out="ann.json") == 1  # -o a file: FileExistsError before
    assert "exists and is not a folder" in capsys.readouterr().err


def test_coco_nan_or_infinite_numbers_are_counted_not_a_crash(tmp_path):
    """json writes and reads NaN/Infinity; a NaN box was a ValueError, an infinite size all-zero boxes."""
    (tmp_path / "imgs").mkdir()
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                   {"id": 2, "file_name": "b.jpg", "width": float("inf"), "height": 100}],
        "annotations": [{"image_id": 1, "category_id": 3, "bbox": [20, 10, 50, 40]},
                        {"image_id": 1, "category_id": 3, "bbox": [float("nan"), 10, 50, 40]},
                        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 3, "name": "car"}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    counts = convert_coco(
        str(tmp_path / "ann.json"), str(tmp_path / "imgs"), str(tmp_path / "out"), log=print
    )
    assert counts["bad_bbox"] == 1 and counts["bad_size"] == 1
    rows = (tmp_path / "out" / "coco_det.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "[[100, 100, 350, 500]]" in rows[0]


def test_bad_records_and_adapt_configs_are_one_line(tmp_path, capsys):
    (tmp_path / "recs.jsonl").write_text(
        '{"id": 1, "video": "v.mp4", "question": "q", "answer": "a"}\n{bad\n'
    )
    (tmp_path / "list.jsonl").write_text("[1]\n")
    (tmp_path / "meta.json").write_text("[1]")
    (tmp_path / "bad.yaml").write_text("{bad: [")
    (tmp_path / "listmeta.yaml").write_text("domain_meta: meta.json\nmodel_path: x\n")
    cases = [
        (["adapt", "convert", "video", str(tmp_path / "recs.jsonl"), "-o", str(tmp_path / "o")], "recs.jsonl: line 2"),
        (["adapt", "convert", "multiview", str(tmp_path / "list.jsonl"), "-o", str(tmp_path / "o")], "record 1 is not an object"),
        (["adapt", str(tmp_path / "bad.yaml")], "bad.yaml: not valid YAML"),
        (["adapt", str(tmp_path / "listmeta.yaml")], "meta.json: expected an object of datasets"),
    ]  # fmt: skip
    for (
        argv,
        message,
    ) in cases:  # before: JSONDecodeError, AttributeError, a multi-line YAML error, AttributeError
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_classification_multiple_choice(tmp_path):
    for label in ("cat", "dog", "owl"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "src" / label / f"{i}.png")
    out = tmp_path / "out"
    assert main(["adapt", "convert", "classification", str(tmp_path / "src"), "-o", str(out)]) == 0
    rows = [json.loads(ln) for ln in (out / "classification.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        truth = r["image"].split("/")[0]
        options = dict(line.split(". ", 1) for line in q.splitlines() if len(line) > 2 and line[1:3] == ". ")
        assert len(options) == 3 and options[a] == truth
        assert q.startswith("<image>\n")


def test_multiview_stitching(tmp_path):
    colours = {}
    views = {}
    for i, cam in enumerate(
        ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
    ):
        colours[cam] = (40 * i, 200 - 30 * i, 100)
        Image.new("RGB", (160, 90), colours[cam]).save(tmp_path / f"{cam}.jpg", quality=100)
        views[cam] = f"{cam}.jpg"
    img = stitch_views({k: str(tmp_path / v) for k, v in views.items()})
    assert img.size == (3 * VIEW_W, 2 * VIEW_H) == (2688, 896)
    arr = np.asarray(img).astype(int)
    for i, cam in enumerate(views):
        x, y = (i % 3) * VIEW_W + VIEW_W // 2, (i // 3) * VIEW_H + VIEW_H // 2
        assert np.abs(arr[y, x] - np.array(colours[cam])).max() <= 3, cam
        label = arr[
            (i // 3) * VIEW_H + 5 : (i // 3) * VIEW_H + 60, (i % 3) * VIEW_W + 5 : (i % 3) * VIEW_W + 300
        ]
        assert (label == 255).all(axis=-1).sum() > 50  # the camera name is drawn in white
    (tmp_path / "recs.jsonl").write_text(
        json.dumps({"id": "s1", "images": views, "question": "Is it safe to turn left?", "answer": "No."}) + "\n"
        + json.dumps({"id": "s2", "images": {"CAM_FRONT": views["CAM_FRONT"]}, "question": "q", "answer": "a"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    assert main(["adapt", "convert", "multiview", str(tmp_path / "recs.jsonl"), "-o", str(out)]) == 0
    rows = [json.loads(ln) for ln in (out / "multiview.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["conversations"][0]["value"].startswith("<image>\n")
    assert Image.open(out / rows[0]["image"]).size == (2688, 896)


def test_video_to_frames(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 12, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "v.jsonl").write_text(
        json.dumps({"id": "v1", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat changes?"}, {"from": "gpt", "value": "It gets brighter."}]}) + "\n"
        + json.dumps({"id": "v2", "video": "gone.mp4", "question": "q", "answer": "a"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    assert (
        main(["adapt", "convert", "video", str(tmp_path / "v.jsonl"), "--frames", "4", "-o", str(out)]) == 0
    )
    rows = [json.loads(ln) for ln in (out / "video.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["image"]) == 4
    q = rows[0]["conversations"][0]["value"]
    assert q.startswith(
        "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\nWhat changes?"
    )
    brightness = [np.asarray(Image.open(out / p)).mean() for p in rows[0]["image"]]
    assert brightness == sorted(brightness) and brightness[0] < brightness[-1]


def test_adapt_finetunes_with_general_data_mixed_in(tmp_path):
    from interleaf.train.demo import init_demo_model

    init_demo_model(tmp_path / "model", image_size=56, vit=(32, 1), llm=(64, 2))
    for name in ("domain", "general"):
        d = tmp_path / name
        d.mkdir()
        Image.new("RGB", (30, 30), (9, 9, 9)).save(d / "x.png")
        row = {
            "image": "x.png",
            "conversations": [{"from": "human", "value": f"{name}?"}, {"from": "gpt", "value": name}],
        }
        (d / "d.jsonl").write_text(json.dumps(row) + "\n")
        (d / "meta.json").write_text(
            json.dumps({name: {"root": ".", "annotation": "d.jsonl", "repeat_time": 1}})
        )
    (tmp_path / "adapt.yaml").write_text(
        "model_path: model\ndomain_meta: domain/meta.json\ngeneral_meta: general/meta.json\ngeneral_repeat: 2\n"
        "output_dir: run\nmax_steps: 2\nmax_packed_tokens: 256\nmax_seq_length: 256\nmax_dynamic_patch: 1\n"
    )
    assert main(["adapt", str(tmp_path / "adapt.yaml"), "--set", "lr=1e-4"]) == 0
    mixed = json.loads((tmp_path / "run" / "mixed_meta.json").read_text())
    assert set(mixed) == {"domain", "general/general"} and mixed["general/general"]["repeat_time"] == 2.0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["stage"] == "adapt" and cfg["loss_reduction"] == "square" and cfg["lr"] == 1e-4
    assert (tmp_path / "run" / "checkpoint-2" / "config.json").exists()


def test_classification_csv_with_a_bom_keeps_its_header_out(tmp_path):
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n0.png,cat\n1.png,dog\n2.png,cat\n3.png,dog\n", encoding="utf-8-sig")
    out = tmp_path / "out"
    assert main(["adapt", "convert", "classification", str(csv_path), "-o", str(out)]) == 0
    rows = [json.loads(ln) for ln in (out / "classification.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == ["0.png", "1.png", "2.png", "3.png"]
