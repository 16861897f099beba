"""Training on the corpus engine's own output: build the embedded sample, fetch its images offline,
then read the build (folder, data/ folder, shard) and its image-text pairs as training data."""

from __future__ import annotations

import json

import pytest

from interleaf.cli import main
from interleaf.train.data import CorpusDataset, DataArgs, SkipLog

ARGS = DataArgs(template="Hermes-2", num_image_token=4, image_size=56, max_seq_length=100_000)


@pytest.fixture(scope="module")
def tok():
    from interleaf.model.tokenizer import build_offline_tokenizer

    return build_offline_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_corpus")
    out = tmp / "corp"
    # no quality filters: the default ones keep one or two documents of the small sample (fewer as
    # the defaults follow the published settings), too few to show every image arriving
    (tmp / "pipeline.yaml").write_text("filters: []\n")
    build = ["corpus", "build", "-o", str(out), "--config", str(tmp / "pipeline.yaml"), "--workers", "1"]
    assert main([*build, "--no-progress"]) == 0
    assert main(["corpus", "fetch-images", str(out), "--from-sample", "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["docs_out"] > 0 and stats["images_out"] > 0
    # the build also holds JSONL that is not training data
    assert list((out / "errors").glob("*.jsonl")) and list((out / "excluded").glob("*.jsonl"))
    return out, stats


def _all(ds: CorpusDataset) -> list:
    return [ds.get(i) for i in range(len(ds))]


@pytest.mark.parametrize("which", ["build", "data", "shard"])
def test_fetched_corpus_trains_with_its_images(corpus, tok, which):
    out, stats = corpus
    path = {"build": out, "data": out / "data", "shard": sorted((out / "data").glob("part-*"))[0]}[which]
    log = SkipLog()
    samples = _all(CorpusDataset([str(path)], tok, ARGS, log))
    assert log.total == 0, log.records[:3]
    # only the documents of data/ (not errors/, excluded/ or _work/), each with all its images
    assert len(samples) == stats["docs_out"]
    assert sum(len(s.num_tiles) for s in samples) == stats["images_out"]
    assert all(s.pixel_values is not None and s.num_supervised > 0 for s in samples)


def test_pairs_of_a_fetched_corpus_train_with_their_images(corpus, tok, tmp_path):
    out, stats = corpus
    pairs = out / "pairs.jsonl"  # inside the build folder: bytes_path resolves against it
    assert main(["corpus", "convert", str(out), "--to", "pairs", "-o", str(pairs)]) == 0
    rows = [json.loads(ln) for ln in pairs.read_text().splitlines()]
    assert rows and all(r["metadata"].get("bytes_path") for r in rows)
    log = SkipLog()
    samples = _all(CorpusDataset([str(pairs)], tok, ARGS, log))
    assert log.total == 0, log.records[:3]
    assert len(samples) == stats["images_out"] and all(s.num_tiles for s in samples)
    # the same file outside any build folder cannot find its images: skipped, and the record says why
    moved = tmp_path / "pairs.jsonl"
    moved.write_text(pairs.read_text())
    log = SkipLog()
    assert _all(CorpusDataset([str(moved)], tok, ARGS, log)) == [None] * len(rows)
    assert dict(log.counts) == {"missing_image": len(rows)}
    assert "corpus build folder" in log.records[0]["detail"]


def test_lcl_pretrains_on_the_fetched_corpus_and_its_pairs(corpus, tmp_path):
    """LCL reads the build as interleaf train does: every document with every image in place, and
    the build's image-text pairs; a short run trains on both without skipping anything."""
    from interleaf.model.lcl import LCL_PRESETS, LCLConfig
    from interleaf.train.lcl import LCLDataset, load_lcl_tokenizer

    out, stats = corpus
    pairs = out / "pairs-lcl.jsonl"
    assert main(["corpus", "convert", str(out), "--to", "pairs", "-o", str(pairs)]) == 0
    tok = load_lcl_tokenizer("offline")
    cfg = LCLConfig(**{**LCL_PRESETS["tiny"], "context_length": 100_000, "vocab_size": len(tok),
                       "special_token_ids": dict(tok.ids)})  # fmt: skip
    log = SkipLog()
    docs = LCLDataset([str(out)], tok, cfg, max_images=1000, skip_log=log)
    samples = [docs.get(i) for i in range(len(docs))]
    assert log.total == 0 and len(samples) == stats["docs_out"]
    soi = tok.ids["<start_of_img>"]
    assert sum(s.pixels.shape[0] for s in samples) == stats["images_out"]
    assert all(s.ids.count(soi) == s.pixels.shape[0] for s in samples)
    # the same build converted to MMC4 (images without a similarity are kept, stored files found)
    mmc4 = out / "mmc4-lcl.jsonl"
    assert main(["corpus", "convert", str(out), "--to", "mmc4", "-o", str(mmc4)]) == 0
    rows = LCLDataset([str(mmc4)], tok, cfg, max_images=1000, skip_log=log)
    with_images = [s for s in (rows.get(i) for i in range(len(rows))) if s is not None]
    assert log.total == sum(1 for s in samples if s.pixels.shape[0] == 0)  # rows without an image: no_image
    assert sum(s.pixels.shape[0] for s in with_images) <= stats["images_out"] and with_images
    run = tmp_path / "lcl"
    argv = ["lcl", "pretrain", str(out), str(pairs), "-o", str(run), "--steps", "3", "--batch-size", "4"]
    assert main(argv) == 0
    skipped = run / "skipped.jsonl"
    assert (run / "model" / "model.safetensors").exists()
    assert not skipped.exists() or not skipped.read_text().strip()


def test_lcl_reads_mmc4_rows_written_outside_the_build(corpus, tmp_path):
    """``corpus convert --to mmc4`` with -o outside the build: the rows' stored images (bytes_path,
    relative to the build folder) are found under --mmc4-image-root (the build folder), and without it
    the skip record names the image not found and what to pass."""
    from interleaf.model.lcl import LCL_PRESETS, LCLConfig
    from interleaf.train.lcl import LCLDataset, load_lcl_tokenizer

    out, stats = corpus
    tok = load_lcl_tokenizer("offline")
    cfg = LCLConfig(**{**LCL_PRESETS["tiny"], "context_length": 100_000, "vocab_size": len(tok),
                       "special_token_ids": dict(tok.ids)})  # fmt: skip
    inside, outside = out / "mmc4-inside.jsonl", tmp_path / "elsewhere" / "mmc4.jsonl"
    for dest in (inside, outside):
        assert main(["corpus", "convert", str(out), "--to", "mmc4", "-o", str(dest)]) == 0

    def images(path, **kw) -> tuple[list[int], SkipLog]:
        log = SkipLog()
        ds = LCLDataset([str(path)], tok, cfg, max_images=1000, skip_log=log, **kw)
        return [0 if s is None else s.pixels.shape[0] for s in (ds.get(i) for i in range(len(ds)))], log

    expected, _ = images(inside)
    assert sum(expected) > 0
    got, log = images(outside, mmc4_image_root=str(out))
    assert got == expected and log.total == sum(1 for n in expected if n == 0)
    got, log = images(outside)
    assert got == [0] * len(expected) and dict(log.counts) == {"no_image": len(expected)}
    first = next(r for r, n in zip(log.records, expected) if n)["detail"]
    assert f"stored image {outside.parent / 'images'}" in first and "--mmc4-image-root" in first
