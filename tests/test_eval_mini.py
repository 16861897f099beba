"""Mini suites and the MM-NIAH generator: official formats, needles where they are said to be."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from interleaf.corpus.document import Document
from interleaf.errors import InputError
from interleaf.eval import mmiu, mmniah
from interleaf.eval.mini import make_mini_mmiu
from interleaf.eval.mmniah_make import count_words, write_split


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Interleaved documents built with the corpus engine's Document (OmniCorpus row layout)."""
    root = tmp_path_factory.mktemp("docs")
    rows = []
    for d in range(3):
        doc = Document(general_metadata={"id": f"doc{d}"})
        for k in range(8):
            doc.add_text(" ".join(f"word{d}{k}{j}" for j in range(60)) + ".")
            if k % 3 == 0:
                path = root / f"img{d}_{k}.png"
                Image.new("RGB", (40, 30), (10 * k, 100, 50 * d)).save(path)
                doc.add_image(f"file://{path}", {"url": f"file://{path}", "bytes_path": str(path)})
        rows.append(doc.to_row())
    return rows


def _oracle(answer):
    if isinstance(answer, list):
        return json.dumps(answer)
    if isinstance(answer, int):
        return chr(ord("A") + answer)
    return answer


def test_generator_writes_official_format_with_needles_at_depth(documents, tmp_path):
    split = write_split(
        tmp_path / "mm_niah_val", documents, lengths=(1000, 2000), depths=(0.0, 0.5, 1.0), per_task=3
    )
    for task in mmniah.TASKS:
        lines = (split / "annotations" / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == 3
        samples, errors = mmniah.load_task(split / "annotations" / f"{task}.jsonl", split / "images", task)
        assert not errors and len(samples) == 3
        for line, s in zip(lines, samples):
            rec = json.loads(line)
            meta = rec["meta"]
            assert set(meta) >= {
                "placed_depth",
                "context_length",
                "num_images",
                "needles",
                "choices",
                "choices_image_path",
            }
            assert rec["context"].count("<image>") == len(rec["images_list"]) == meta["num_images"]
            assert (
                meta["context_length"]
                == count_words(rec["context"].replace("<image>", "")) + 256 * meta["num_images"]
            )
            assert meta["context_length"] >= 1000 and all(0 <= d <= 1 for d in meta["placed_depth"])
            for p in s.images:
                Image.open(p).verify()
            if task.endswith("-text"):  # the reported depths are where the needles are in the context
                ctx, got, start = rec["context"], [], 0
                for needle in meta["needles"]:
                    pos = ctx.index(needle, start)
                    before = ctx[:pos]
                    tokens = count_words(before.replace("<image>", "")) + 256 * before.count("<image>")
                    got.append(tokens / meta["context_length"])
                    start = pos + len(needle)
                assert got == pytest.approx(meta["placed_depth"], abs=1e-9)
            if task == "counting-text":
                assert rec["answer"] == [int(re.search(r"\d+", n).group()) for n in meta["needles"]]
            if task == "retrieval-image":
                assert len(meta["choices"]) == 4 and isinstance(rec["answer"], int)
            if task == "reasoning-image":
                assert len(meta["choices_image_path"]) == 4 and len(s.images) == len(rec["images_list"]) + 4
            # an oracle scores 1 under the official rules
            assert mmniah.is_correct(mmniah.task_answer(task, rec["answer"]), _oracle(rec["answer"])) == 1


def test_generator_depth_ordering_and_errors(documents, tmp_path):
    split = write_split(
        tmp_path / "s", documents, tasks=["retrieval-text"], lengths=(1500,), depths=(0.1, 0.9), per_task=2
    )
    recs = [json.loads(x) for x in (split / "annotations" / "retrieval-text.jsonl").read_text().splitlines()]
    d0, d1 = recs[0]["meta"]["placed_depth"][0], recs[1]["meta"]["placed_depth"][0]
    assert d0 == pytest.approx(0.1, abs=0.05) and d1 == pytest.approx(0.9, abs=0.05)
    with pytest.raises(InputError, match="no text"):
        write_split(tmp_path / "x", [{"texts": [None], "images": ["nothing.png"], "metadata": [None]}])


def test_mini_mmiu_is_official_format(tmp_path):
    path = make_mini_mmiu(tmp_path / "mmiu", per_task=2, seed=3)
    records = json.loads(path.read_text())
    assert len(records) == 12
    for r in records:
        assert set(mmiu.REQUIRED_FIELDS) <= set(r)
        assert r["options"] in r["context"] and r["output"] in "ABCD"
        assert 2 <= len(r["input_image_path"]) <= 5
    samples, errors = mmiu.load(path)
    assert not errors and not any(s.missing_images for s in samples)
    orders = {s.record["task"]: s.text.startswith(s.record["question"]) for s in samples}
    assert orders["handwritten_retrieval"] and not orders["visual_ordering"]  # both prompt orders occur
    # answers are right by construction: e.g. the brighter image of the exposure task
    for s in samples:
        if s.record["task"] == "visual_quality_assessment_ve_lol_l":
            a, b = (int(np.asarray(Image.open(p).convert("L"), dtype=np.int64).sum()) for p in s.images)
            assert (a > b) == (s.record["output"] == "A")
