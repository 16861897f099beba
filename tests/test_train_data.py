"""Training data: per-template loss masks, the InternVL meta/JSONL format, bad-sample accounting."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from interleaf.processing.templates import get_template
from interleaf.train.data import (
    IGNORE_INDEX,
    ConversationDataset,
    CorpusDataset,
    DataArgs,
    SkipLog,
    tokenize_conversation,
)

CONV = [
    {"from": "human", "value": "<image>\nWhat digit is this?"},
    {"from": "gpt", "value": "It is 7."},
    {"from": "human", "value": "Sure?"},
    {"from": "gpt", "value": " yes "},
]


@pytest.fixture(scope="module")
def tok():
    from interleaf.model.tokenizer import build_offline_tokenizer

    return build_offline_tokenizer()


@pytest.fixture(scope="module")
def tok_bos():
    from interleaf.model.tokenizer import build_offline_tokenizer

    return build_offline_tokenizer(bos=True)


def trained_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


# Hand-derived from spec 7: loss on each reply plus its end token; only internlm2-chat strips values
# (upstream preprocess_internlm; preprocess_internvl2_5 does not); internvl2_5's "\n" after <|im_end|>
# is not learned.
EXPECTED = {
    "Hermes-2": "It is 7.<|im_end|> yes <|im_end|>",
    "internlm2-chat": "It is 7.<|im_end|>yes<|im_end|>",
    "phi3-chat": "It is 7.<|end|> yes <|end|>",
    "internvl2_5": "It is 7.<|im_end|> yes <|im_end|>",
}


@pytest.mark.parametrize("template", list(EXPECTED))
@pytest.mark.parametrize("bos", [False, True])
def test_mask_per_template(template, bos, tok, tok_bos):
    tokenizer = tok_bos if bos else tok
    ids, labels = tokenize_conversation(tokenizer, template, CONV, [5])
    assert ids.shape == labels.shape
    assert trained_text(tokenizer, labels) == EXPECTED[template]
    # trained positions carry their own token id; image tokens never trained
    sel = labels != IGNORE_INDEX
    assert torch.equal(labels[sel], ids[sel])
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((ids == ctx).sum()) == 5 and not bool(sel[ids == ctx].any())
    # the input is exactly the runtime's rendering of the conversation, image expanded
    strip = template == "internlm2-chat"
    msgs = [{"from": t["from"], "value": t["value"].strip() if strip else t["value"]} for t in CONV]
    text = get_template(template).render(msgs).replace("<image>", "<img>" + "<IMG_CONTEXT>" * 5 + "</img>")
    assert tokenizer.decode(ids.tolist()) == (("<s>" if bos else "") + text)
    if bos:
        assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
        assert int((ids == tokenizer.bos_token_id).sum()) == 1


def _upstream_mpt_labels(tokenizer, text, sep, assistant_role):
    """Spec 7 ``preprocess_mpt`` (Hermes-2), re-derived: split on sep, loss on reply + sep."""
    ids = tokenizer(text)["input_ids"]
    target = list(ids)
    turns = text.split(sep)
    re_turns = [sep.join(turns[:3])] + [sep.join(turns[i : i + 2]) for i in range(3, len(turns), 2)]
    cur = 0
    for turn in re_turns:
        if turn == "":
            break
        turn_len = len(tokenizer(turn)["input_ids"]) + 1
        parts = turn.split(sep + assistant_role)
        if len(parts) != 2:
            break
        instruction_len = len(tokenizer(parts[0] + sep + assistant_role)["input_ids"])
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += turn_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    return ids, target


def _upstream_internlm_labels(tokenizer, text, user_role, assistant_role):
    """Spec 7 ``preprocess_internlm``: BOS ignored, everything up to each assistant header ignored."""
    ids = tokenizer(text)["input_ids"]
    target = list(ids)
    n = lambda s: len(tokenizer(s)["input_ids"]) - 1  # noqa: E731 - minus the BOS
    cur = 1
    target[:1] = [IGNORE_INDEX]
    parts = text.split(assistant_role)
    k = n(parts[0] + assistant_role)
    target[cur : cur + k] = [IGNORE_INDEX] * k
    cur += k
    for part in parts[1:-1]:
        reply, rest = part.split(user_role)
        cur += n(reply)
        k = n(user_role + rest + assistant_role)
        target[cur : cur + k] = [IGNORE_INDEX] * k
        cur += k
    cur += n(parts[-1])
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    return ids, target


def test_hermes_and_internlm_masks_equal_upstream_algorithms(tok, tok_bos):
    conv = [dict(t) for t in CONV]
    conv[0]["value"] = "What digit is this?"  # text only: the upstream functions see the same string
    t = get_template("Hermes-2")
    ids, labels = tokenize_conversation(tok, "Hermes-2", conv, [])
    ref_ids, ref_labels = _upstream_mpt_labels(tok, t.render(conv), t.sep, t.roles[1])
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
    t = get_template("internlm2-chat")
    stripped = [{**m, "value": m["value"].strip()} for m in conv]
    ids, labels = tokenize_conversation(tok_bos, "internlm2-chat", conv, [])
    ref_ids, ref_labels = _upstream_internlm_labels(tok_bos, t.render(stripped), t.roles[0], t.roles[1])
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels


def _upstream_internvl2_5_labels(tokenizer, conversations, system):
    """Spec 7 ``preprocess_internvl2_5`` (no BOS): one block per turn, values as given (no strip);
    loss on a reply block minus its ``<|im_start|>assistant\\n`` header and trailing ``\\n``."""
    blocks = [("system", f"<|im_start|>system\n{system}<|im_end|>\n")]
    for m in conversations:
        role = "user" if m["from"] == "human" else "assistant"
        blocks.append((m["from"], f"<|im_start|>{role}\n{m['value']}<|im_end|>\n"))
    ignore_len = len(tokenizer("<|im_start|>assistant\n")["input_ids"])
    ids, target = [], []
    for who, text in blocks:
        block = tokenizer(text)["input_ids"]
        ids += block
        if who == "gpt":
            target += [IGNORE_INDEX] * ignore_len + block[ignore_len:-1] + [IGNORE_INDEX]
        else:
            target += [IGNORE_INDEX] * len(block)
    return ids, target


def test_internvl2_5_mask_equals_upstream_algorithm_without_stripping(tok):
    conv = [dict(t) for t in CONV]
    conv[0]["value"] = "  What digit is this?\n"  # upstream keeps the spaces and the newline
    ids, labels = tokenize_conversation(tok, "internvl2_5", conv, [])
    ref_ids, ref_labels = _upstream_internvl2_5_labels(tok, conv, get_template("internvl2_5").system_message)
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
    assert "user\n  What digit is this?\n<|im_end|>" in tok.decode(ids.tolist())


def test_system_turn_overrides_system_message(tok):
    conv = [{"from": "system", "value": "Be brief."}] + CONV[:2]
    ids, labels = tokenize_conversation(tok, "internvl2_5", conv, [1])
    text = tok.decode(ids.tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert trained_text(tok, labels) == "It is 7.<|im_end|>"


# ---------------------------------------------------------------------------------------------------
# meta JSON + JSONL datasets


def _img(path, size=(40, 40), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    _img(root / "a.png")
    _img(root / "b.png", (112, 56))
    frames = root / "clip"
    frames.mkdir()
    for i in range(6):
        _img(frames / f"{i:02d}.png", colour=(i * 40, 0, 0))
    long_text = " ".join(["word"] * 400)
    rows = [
        {
            "id": "ok1",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "prepend",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "multi",
            "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
        {
            "id": "video",
            "video": "clip",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat happens?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "count",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image><image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "noimg",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "empty", "conversations": []},
        {"id": "noreply", "conversations": [{"from": "human", "value": "Q"}]},
        {
            "id": "toolong",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": long_text + "<image>"},
                {"from": "gpt", "value": "A"},
            ],
        },
        {"id": "role", "conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"set": {"root": "imgs", "annotation": "train.jsonl", "repeat_time": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_dataset_builds_good_samples_and_accounts_for_bad_ones(data_dir, tok):
    log = SkipLog(data_dir / "skipped.jsonl")
    args = DataArgs(template="internvl2_5", num_image_token=4, image_size=56, max_seq_length=256, max_dynamic_patch=6,
                    min_num_frame=4, max_num_frame=4)  # fmt: skip
    ds = ConversationDataset(data_dir / "meta.json", tok, args, log)
    assert len(ds) == 13
    built = {}
    for i in range(len(ds)):
        s = ds.get(i)
        if s is not None:
            built[i] = s
    assert sorted(built) == [0, 1, 2, 3, 4]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    # single image, 1 tile (square image -> 1x1 grid, no thumbnail)
    assert built[0].num_tiles == [1] and int((built[0].input_ids == ctx).sum()) == 4
    # auto-prepended placeholder gives the same tokens as the explicit one
    assert torch.equal(built[0].input_ids, built[1].input_ids)
    # two images share max_dynamic_patch: 6 // 2 = 3 tiles each at most; 112x56 -> 2x1 grid + thumbnail
    assert built[2].num_tiles == [1, 3] and built[2].pixel_values.shape == (4, 3, 56, 56)
    assert "Image-1: <img>" in tok.decode(built[2].input_ids.tolist())
    assert built[3].pixel_values is None
    # video: <video> -> Frame-i: <image> lines, one tile per frame
    text = tok.decode(built[4].input_ids.tolist())
    assert built[4].num_tiles == [1, 1, 1, 1] and "Frame-1: <img>" in text and "Frame-4: <img>" in text
    assert "<video>" not in text
    expected = {
        "missing_image": 1,
        "image_count_mismatch": 2,
        "empty_conversation": 2,
        "too_long": 1,
        "bad_conversation": 1,
        "bad_json": 1,
    }
    assert dict(log.counts) == expected
    records = [json.loads(ln) for ln in (data_dir / "skipped.jsonl").read_text().splitlines()]
    assert len(records) == sum(expected.values())
    assert {r["id"] for r in records} >= {"missing", "count", "noimg", "empty", "noreply", "toolong", "role"}
    assert all(r["reason"] and r["detail"] for r in records)
    assert "8 samples skipped" in log.summary()


def test_a_record_with_image_and_video_uses_the_image_as_upstream(data_dir, tok):
    row = {"image": "a.png", "video": "clip",
           "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}  # fmt: skip
    (data_dir / "both.jsonl").write_text(json.dumps(row) + "\n")
    (data_dir / "both.json").write_text(json.dumps({"s": {"root": "imgs", "annotation": "both.jsonl"}}))
    args = DataArgs(
        template="internvl2_5", num_image_token=4, image_size=56, min_num_frame=4, max_num_frame=4
    )
    sample = ConversationDataset(data_dir / "both.json", tok, args).get(0)
    assert sample is not None and sample.num_tiles == [1]  # the 40x40 image, not 4 video frames


def test_truncation_keeps_images_whole(data_dir, tok):
    args = DataArgs(
        template="Hermes-2", num_image_token=4, image_size=56, max_seq_length=60, system_message="Hi"
    )
    row = {
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nQ"},
            {"from": "gpt", "value": " ".join(["x"] * 80)},
        ],
    }
    ds = ConversationDataset(data_dir / "meta.json", tok, args)
    s = ds.build(row, ds.specs[0], __import__("random").Random(0))
    assert s.num_tokens == 60 and s.num_supervised > 0
    assert int((s.input_ids == tok.convert_tokens_to_ids("</img>")).sum()) == 1


def test_repeat_time_fraction_and_multiple(data_dir, tok):
    meta = {"a": {"root": "imgs", "annotation": "train.jsonl", "repeat_time": 0.5},
            "b": {"root": "imgs", "annotation": "train.jsonl", "repeat_time": 2}}  # fmt: skip
    (data_dir / "meta2.json").write_text(json.dumps(meta))
    ds = ConversationDataset(data_dir / "meta2.json", tok, DataArgs(template="Hermes-2"))
    assert len(ds) == 6 + 26
    assert ds.describe(0) == ("a", 0) and ds.describe(6) == ("b", 0)


def _corpus_dataset(tmp_path, docs: list, tok) -> tuple[CorpusDataset, SkipLog]:
    """``docs`` written as one JSONL file, read back as a corpus dataset with its skip log."""
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    log = SkipLog()
    args = DataArgs(template="Hermes-2", num_image_token=4, image_size=56)
    return CorpusDataset([str(tmp_path / "docs.jsonl")], tok, args, log), log


def test_corpus_documents_and_pairs(tmp_path, tok):
    _img(tmp_path / "x.png")
    docs = [
        {"texts": ["A red square.", None, "The end."], "images": [None, "x.png", None],
         "metadata": [None, {"url": "x.png"}, None], "general_metadata": {"id": "d1"}},
        {"image": "x.png", "text": "a caption"},
        {"texts": ["only text", None], "images": [None, "https://example.com/missing.png"], "general_metadata": {"id": "d3"}},
    ]  # fmt: skip
    ds, log = _corpus_dataset(tmp_path, docs, tok)
    a, b, c = ds.get(0), ds.get(1), ds.get(2)
    assert c is None and dict(log.counts) == {"missing_image": 1} and log.records[0]["id"] == "d3"
    text = tok.decode(a.input_ids.tolist())
    assert text.index("A red square.") < text.index("<img>") < text.index("The end.")
    assert trained_text(tok, a.labels).replace("\n", " ").split() == [
        "A",
        "red",
        "square.",
        "The",
        "end.",
        "<|endoftext|>",
    ]
    assert a.num_tiles == [1] and b.num_tiles == [1]
    assert "a caption" in trained_text(tok, b.labels)


def test_data_augment_is_random_jpeg_but_reproducible(tmp_path, tok):
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(
        tmp_path / "n.png"
    )
    row = {
        "image": "n.png",
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"n": {"root": ".", "annotation": "d.jsonl"}}))
    kw = dict(template="Hermes-2", num_image_token=4, image_size=56)
    ds = ConversationDataset(tmp_path / "meta.json", tok, DataArgs(**kw, data_augment=True))
    plain = ConversationDataset(tmp_path / "meta.json", tok, DataArgs(**kw))
    a, b = ds.get(0, epoch=0), ds.get(0, epoch=0)
    assert torch.equal(a.pixel_values, b.pixel_values)  # same sample, same epoch: same bytes (exact resume)
    assert not torch.equal(a.pixel_values, plain.get(0).pixel_values)


# ---------------------------------------------------------------------------------------------------
# data keys of the training config


def test_frame_range_is_checked_with_the_config():
    from interleaf.errors import ConfigError
    from interleaf.train.config import build_config

    base = {"model_preset": "tiny", "meta_path": "m.json"}
    with pytest.raises(ConfigError, match="'max_num_frame': 4 is below min_num_frame 8") as exc:
        build_config({**base, "max_num_frame": 4})
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="'min_num_frame': must be positive"):
        build_config({**base, "min_num_frame": 0, "max_num_frame": 0})
    with pytest.raises(ConfigError, match="'max_dynamic_patch': must be positive"):
        build_config({**base, "max_dynamic_patch": 0})
    assert build_config({**base, "min_num_frame": 4, "max_num_frame": 4}).max_num_frame == 4


def test_corpus_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    from interleaf.train.config import load_config

    conf = tmp_path / "conf"
    (conf / "corp" / "data").mkdir(parents=True)
    (conf / "pairs.jsonl").write_text("")
    (conf / "train.yaml").write_text(
        "model_preset: tiny\ncorpus_paths: [corp/data, pairs.jsonl, /abs/elsewhere, not/here]\n"
    )
    monkeypatch.chdir(tmp_path)  # not the YAML's folder: relative paths must not depend on it
    cfg = load_config(conf / "train.yaml")
    assert cfg.corpus_paths == [
        str(conf / "corp/data"),
        str(conf / "pairs.jsonl"),
        "/abs/elsewhere",
        "not/here",
    ]
    assert cfg.output_dir == "runs/train"  # keys not in the file keep their defaults


def test_output_dir_resolves_against_the_yaml_folder_before_it_exists(tmp_path, monkeypatch):
    from interleaf.train.config import load_config

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "train.yaml").write_text("model_preset: tiny\nmeta_path: m.json\noutput_dir: runs/x\n")
    monkeypatch.chdir(tmp_path)
    # a first run must write where a later run (output_dir existing beside the YAML) resumes from
    assert load_config(conf / "train.yaml").output_dir == str(conf / "runs/x")
    assert load_config(conf / "train.yaml", ["output_dir=elsewhere"]).output_dir == "elsewhere"


# ---------------------------------------------------------------------------------------------------
# one bad record is skipped and recorded; a bad meta file is refused at load


def test_bad_field_types_skip_the_record_naming_the_field(data_dir, tok):
    q = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    rows = [
        {"id": "int_image", "image": 5, "conversations": q},
        {"id": "mixed_list", "image": ["a.png", 3], "conversations": q},
        {"id": "dict_image", "image": {"path": "a.png"}, "conversations": q},
        {"id": "list_video", "video": ["clip"], "conversations": q},
        {"id": "good", "image": "a.png", "conversations": q},
    ]
    (data_dir / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data_dir / "meta_bad.json").write_text(json.dumps({"b": {"root": "imgs", "annotation": "bad.jsonl"}}))
    log = SkipLog()
    args = DataArgs(
        template="internvl2_5", num_image_token=4, image_size=56, min_num_frame=2, max_num_frame=2
    )
    ds = ConversationDataset(data_dir / "meta_bad.json", tok, args, log)
    samples = [ds.get(i) for i in range(len(ds))]
    assert [s is not None for s in samples] == [False, False, False, False, True]
    assert dict(log.counts) == {"bad_image": 3, "bad_video": 1}
    by_id = {r["id"]: r["detail"] for r in log.records}
    assert "field 'image'" in by_id["int_image"] and "int" in by_id["int_image"]
    assert "field 'image'" in by_id["mixed_list"] and "dict" in by_id["dict_image"]
    assert "field 'video'" in by_id["list_video"] and "list" in by_id["list_video"]


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"max_dynamic_patch": "6"}, "max_dynamic_patch"),
        ({"max_dynamic_patch": 0}, "max_dynamic_patch"),
        ({"max_dynamic_patch": True}, "max_dynamic_patch"),
        ({"data_augment": "false"}, "data_augment"),
        ({"data_augment": 1}, "data_augment"),
        ({"root": 5}, "root"),
        ({"annotation": ["train.jsonl"]}, "annotation"),
        ({"repeat_time": "2"}, "repeat_time"),
        ({"repeat_time": True}, "repeat_time"),
    ],
)
def test_meta_value_types_refused_at_load(data_dir, tok, entry, key):
    from interleaf.errors import ConfigError

    meta = data_dir / "meta_types.json"
    meta.write_text(json.dumps({"set": {"root": "imgs", "annotation": "train.jsonl", **entry}}))
    with pytest.raises(ConfigError) as exc:
        ConversationDataset(meta, tok, DataArgs(template="Hermes-2"))
    msg = str(exc.value)
    assert str(meta) in msg and f"key '{key}'" in msg and "'set'" in msg and "\n" not in msg


def test_meta_tile_budget_and_augment_flag_are_used(data_dir, tok):
    meta = data_dir / "meta_ok.json"
    entry = {"root": "imgs", "annotation": "train.jsonl", "max_dynamic_patch": 1, "data_augment": False}
    meta.write_text(json.dumps({"set": entry}))
    args = DataArgs(template="internvl2_5", num_image_token=4, image_size=56, max_seq_length=256)
    ds = ConversationDataset(meta, tok, args)
    assert ds.specs[0].max_dynamic_patch == 1 and ds.specs[0].data_augment is False
    assert ds.get(2).num_tiles == [1, 1]  # the 112x56 image gets one tile, not 2 + thumbnail


# ---------------------------------------------------------------------------------------------------
# video samples decode only the frames they use


def test_video_sample_decodes_only_its_frames_and_the_right_ones(data_dir, tok, monkeypatch, gray_video):
    import random

    import numpy as np

    from interleaf.train.data import _rand_segments

    gray_video(data_dir / "imgs" / "clip.mkv", 30)
    args = DataArgs(
        template="internvl2_5", num_image_token=4, image_size=56, min_num_frame=4, max_num_frame=6
    )
    ds = ConversationDataset(data_dir / "meta.json", tok, args)
    converted = []
    convert = Image.Image.convert
    monkeypatch.setattr(
        Image.Image, "convert", lambda im, *a, **k: converted.append(1) or convert(im, *a, **k)
    )
    for seed in range(5):
        converted.clear()
        frames = ds._video_frames("clip.mkv", ds.specs[0].root, random.Random(seed))
        # the draw is the one the dataset always made: a frame count, then one frame per segment of
        # the clip's 30 frames; the images are those frames (frame k has gray level 8k)
        rng = random.Random(seed)
        picks = _rand_segments(30, rng.randint(4, 6), rng)
        assert [round(float(np.asarray(f).mean()) / 8) for f in frames] == picks
        assert len(converted) <= len(set(picks))  # not one image per frame of the clip


def test_palette_frames_with_transparency_load_without_a_pil_warning(data_dir, tok):
    import random
    import warnings

    frames = data_dir / "imgs" / "pclip"
    frames.mkdir()
    for i in range(4):
        img = Image.new("P", (8, 8), 1)
        img.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
        img.save(frames / f"{i}.png", transparency=bytes([0, 255, 128]))  # per-index alpha: bytes
    args = DataArgs(
        template="internvl2_5", num_image_token=4, image_size=56, min_num_frame=4, max_num_frame=4
    )
    ds = ConversationDataset(data_dir / "meta.json", tok, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency" UserWarning
        got = ds._video_frames("pclip", ds.specs[0].root, random.Random(0))
    assert [(f.mode, f.getpixel((0, 0))) for f in got] == [("RGB", (200, 10, 10))] * 4


# ---------------------------------------------------------------------------------------------------
# corpus rows: bad ones are skipped with the field named; tiling and augmentation as for conversations


def test_corpus_rows_with_bad_fields_are_skipped_naming_the_field(tmp_path, tok):
    _img(tmp_path / "x.png")
    docs = [
        {"texts": ["T", None], "images": [None, "x.png"], "metadata": "[null, {bad json"},
        {"texts": ["T", None, None], "images": [None, "x.png", "x.png"], "metadata": [None, {}]},
        {"texts": ["T", None], "images": [None, "x.png"], "metadata": {"bytes_path": "x.png"}},
        {"texts": "T", "images": [None]},
        {"texts": [5, None], "images": [None, "x.png"]},
        {"image": "x.png", "text": None},
        ["not", "an", "object"],
        {"texts": ["T", None], "images": [None, "x.png"], "metadata": "[null, {}]"},  # fine: a JSON string
    ]
    ds, log = _corpus_dataset(tmp_path, docs, tok)
    samples = [ds.get(i) for i in range(len(ds))]
    assert [s is not None for s in samples] == [False] * 7 + [True]
    assert dict(log.counts) == {"bad_document": 6, "bad_json": 1}
    details = [r["detail"] for r in log.records]
    assert "field 'metadata'" in details[0] and "JSON" in details[0]
    assert "field 'metadata'" in details[1] and "2 entries for 3" in details[1]
    assert "field 'metadata'" in details[2]
    assert "'texts'" in details[3] and "'texts'" in details[4] and "'text'" in details[5]
    assert samples[7].num_tiles == [1]


def test_a_line_that_is_not_utf8_skips_that_line_alone(tmp_path, tok):
    from interleaf.errors import ConfigError
    from interleaf.train.config import load_config

    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    line = json.dumps(good).encode()
    (tmp_path / "train.jsonl").write_bytes(line + b"\n" + b'{"id": "\xff\xfe"}\n' + line + b"\n")
    (tmp_path / "meta.json").write_text(json.dumps({"ds": {"annotation": "train.jsonl"}}))
    log = SkipLog()
    ds = ConversationDataset(
        tmp_path / "meta.json", tok, DataArgs(template="Hermes-2"), log
    )  # UnicodeDecodeError before
    assert [ds.get(i) is not None for i in range(len(ds))] == [True, False, True]
    assert dict(log.counts) == {"bad_json": 1} and log.records[0]["detail"] == "line 2: not valid UTF-8"
    (tmp_path / "docs.jsonl").write_bytes(
        b"\xff\n" + json.dumps({"image": "x.png", "text": "t"}).encode() + b"\n"
    )
    corpus = CorpusDataset([str(tmp_path / "docs.jsonl")], tok, DataArgs(template="Hermes-2"), log)
    assert corpus.get(0) is None and log.records[-1]["detail"] == "not valid UTF-8"
    # a meta JSON or YAML config that is not UTF-8 is an error naming the file
    (tmp_path / "meta.json").write_bytes(b'{"ds": {"annotation": "\xff"}}')
    with pytest.raises(ConfigError, match="meta.json: not valid JSON"):
        ConversationDataset(tmp_path / "meta.json", tok, DataArgs(template="Hermes-2"))
    (tmp_path / "run.yaml").write_bytes(b"lr: \xff\n")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        load_config(tmp_path / "run.yaml")


def test_corpus_images_follow_the_tiling_and_augment_settings(tmp_path, tok):
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 112, 3), dtype=np.uint8)).save(
        tmp_path / "wide.png"
    )
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "wide.png", "text": "a wide picture"}) + "\n")

    def sample(epoch=0, **kw):
        args = DataArgs(template="Hermes-2", num_image_token=4, image_size=56, **kw)
        return CorpusDataset([str(tmp_path / "p.jsonl")], tok, args).get(0, epoch)

    assert sample().num_tiles == [3]  # 2x1 grid + thumbnail
    assert sample(dynamic_image_size=False).num_tiles == [1]
    assert sample(min_dynamic_patch=4, max_dynamic_patch=6).num_tiles == [7]  # 3x2 grid (>= 4) + thumbnail
    plain, aug = sample().pixel_values, sample(data_augment=True).pixel_values
    assert not torch.equal(plain, aug) and torch.equal(aug, sample(data_augment=True).pixel_values)
