"""``interleaf corpus`` commands end to end on the embedded sample (real pages, real pipeline)."""

from __future__ import annotations

import json

import pytest

from interleaf.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "out"
    assert main(["corpus", "build", "-o", str(out), "--workers", "2", "--no-progress"]) == 0
    return out


def test_build_on_embedded_sample(built, capsys):
    stats = json.loads((built / "stats.json").read_text())
    assert stats["balanced"] and stats["records_in"] >= 90
    assert stats["docs_out"] > 0 and stats["images_out"] > 0
    from interleaf.corpus.engine import iter_output_documents

    docs = list(iter_output_documents(built))
    assert len(docs) == stats["docs_out"]
    for d in docs:
        d.validate()
        assert d.n_images > 0 and d.url.startswith(
            ("http://xmlsoft.org/", "https://httpd.apache.org/", "https://docs.python.org/")
        )
        assert all(u.startswith("http") for u in d.image_urls)  # resolved against the page URL
    assert main(["corpus", "stats", str(built)]) == 0
    text = capsys.readouterr().out
    assert "extract" in text and "accounting" in text and "ok" in text


def test_convert(built, tmp_path):
    for kind in ("text", "pairs", "mmc4"):
        dest = tmp_path / f"{kind}.jsonl"
        assert main(["corpus", "convert", str(built), "--to", kind, "-o", str(dest)]) == 0
        lines = dest.read_text().splitlines()
        assert lines, kind
        json.loads(lines[0])


def test_fetch_images_offline_from_sample(built, tmp_path, capsys):
    import shutil

    out = tmp_path / "fetched"
    shutil.copytree(built, out)
    assert main(["corpus", "fetch-images", str(out), "--from-sample", "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    fetch = next(s for s in stats["stages"] if s["name"] == "fetch")
    assert stats["balanced"]
    assert (
        fetch["images_in"]
        == fetch["images_out"]
        + sum(fetch["images_removed_by_reason"].values())
        + fetch["images_in_dropped_docs"]
    )
    from interleaf.corpus.engine import iter_output_documents

    docs = list(iter_output_documents(out))
    metas = [m for d in docs for m in d.metadata if m is not None]
    for m in metas:  # every kept image was fetched, measured, hashed and passes the pixel rules
        assert m["real_width"] >= 150 and m["real_height"] >= 150 and len(m["p_hash"]) == 16
        assert (out / m["bytes_path"]).exists()
    # the page logos (< 150 px) and missing images were removed with a reason
    assert fetch["images_removed_by_reason"] or fetch["images_in_dropped_docs"]


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["corpus", "build", str(tmp_path / "missing.warc.gz"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.warc.gz" in err and "\n" not in err
    cfg = tmp_path / "p.yaml"
    cfg.write_text("dedup:\n  minhash:\n    bands: 3\n")
    assert main(["corpus", "build", "-o", str(tmp_path / "o2"), "--config", str(cfg)]) == 1
    assert "dedup.minhash.bands" in capsys.readouterr().err
    assert main(["corpus", "stats", str(tmp_path)]) == 1
    assert "no stats.json" in capsys.readouterr().err


def test_jsonl_output(tmp_path):
    from interleaf.corpus.sample import make_bench_warc

    warc = tmp_path / "small.warc.gz"
    make_bench_warc(warc, 20)
    out = tmp_path / "o"
    assert (
        main(
            [
                "corpus",
                "build",
                str(warc),
                "-o",
                str(out),
                "--format",
                "jsonl",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    parts = sorted((out / "data").glob("part-*.jsonl"))
    assert parts
    stats = json.loads((out / "stats.json").read_text())
    rows = [json.loads(x) for p in parts for x in p.read_text().splitlines()]
    assert len(rows) == stats["docs_out"]


def test_omnicorpus_struct_layout(tmp_path):
    import pyarrow.parquet as pq

    from interleaf.corpus.engine import iter_output_documents

    cfg = tmp_path / "p.yaml"
    cfg.write_text("filters: []\nwrite: {layout: omnicorpus}\n")
    out = tmp_path / "o"
    assert (
        main(["corpus", "build", "-o", str(out), "--config", str(cfg), "--workers", "1", "--no-progress"])
        == 0
    )
    docs = list(iter_output_documents(out))
    assert docs
    part = next(p for p in sorted((out / "data").glob("*.parquet")) if pq.read_metadata(p).num_rows)
    schema = pq.read_schema(part)
    assert str(schema.field("general_metadata").type).startswith("struct<")  # OmniCorpus-CC columns
    assert str(schema.field("metadata").type).startswith("list<element: struct<")
    assert all(d.general_metadata["url"] for d in docs)


def test_config_prints_a_config_that_loads_back(tmp_path, capsys):
    from interleaf.corpus import pipeline as P

    assert main(["corpus", "config"]) == 0
    text = capsys.readouterr().out
    p = tmp_path / "full.yaml"
    p.write_text(text)
    cfg = P.load_config(p)  # every printed key is a known key
    assert cfg["dedup"]["minhash"]["threshold"] == 0.8 and cfg["dedup"]["image_urls"]["max_occurrences"] == 10
    assert cfg["fetch"]["min_side"] == 150 and isinstance(cfg["filters"], list) and cfg["filters"]


def test_config_errors_name_the_file(tmp_path, capsys):
    # a config with invalid UTF-8 ended in a bare UnicodeDecodeError naming no file
    cfg = tmp_path / "p.yaml"
    cfg.write_bytes(b"read:\n  shard_size: 5\n\xff: 1\n")
    assert main(["corpus", "config", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {cfg}: cannot read pipeline config (not UTF-8") and "\n" not in err
    # read.max_page_bytes <= 0 was accepted and made every page an error
    cfg.write_text("read: {max_page_bytes: -1}\n")
    assert main(["corpus", "config", "--config", str(cfg)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {cfg}: 'read.max_page_bytes' must be >= 1"


def test_convert_never_overwrites_the_corpus(built, tmp_path, capsys):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(built, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # '-o OUT/stats.json' once replaced the corpus's stats with the converted text (exit 0)
    for dest in (out / "stats.json", out / "data" / "part-00000.parquet", out / "_work" / "x.jsonl"):
        assert main(["corpus", "convert", str(out), "--to", "text", "-o", str(dest)]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: {dest}: would overwrite part of the corpus {out}; write it elsewhere"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["corpus", "convert", str(out), "--to", "text", "-o", str(out / "text.jsonl")]) == 0
    # a destination that is a directory, or a corpus that is not there, left a .tmp file behind
    assert main(["corpus", "convert", str(out), "--to", "text", "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    dest = tmp_path / "d" / "t.jsonl"
    assert main(["corpus", "convert", str(tmp_path / "nothere"), "--to", "text", "-o", str(dest)]) == 1
    assert "no stats.json" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "d").glob("*"))


@pytest.mark.parametrize(
    "content,words",
    [(b"{", "cannot read (JSONDecodeError"), (b"\xff", "cannot read (UnicodeDecodeError"),
     (b"{}", "not the stats of a corpus build"), (b"[]", "not the stats of a corpus build")],
)  # fmt: skip
def test_stats_of_a_damaged_stats_json_name_it(tmp_path, capsys, content, words):
    # these ended in a bare JSONDecodeError / KeyError / TypeError naming no file
    (tmp_path / "stats.json").write_bytes(content)
    for cmd in (["stats", str(tmp_path)], ["fetch-images", str(tmp_path), "--no-progress"]):
        assert main(["corpus", *cmd]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path / 'stats.json'}: {words}") and "\n" not in err


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_build_refuses_workers_below_one(tmp_path, capsys, workers):
    # --workers -2 ran silently with one worker, --workers 0 with the CPU count
    out = tmp_path / "o"
    assert main(["corpus", "build", "-o", str(out), "--workers", workers, "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --workers must be >= 1, got {workers}"
    assert not out.exists()


def _config_refused(tmp_path, capsys, yaml_text: str, words: str):
    """``corpus config --config`` of ``yaml_text`` fails with one line holding ``words``; returns
    the config's path and that line."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text)
    assert main(["corpus", "config", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    return cfg, err


@pytest.mark.parametrize(
    "yaml_text,words",
    [
        ("filters: [nosuch]\n", "unknown filter 'filters.nosuch'"),
        ("filters: [{c4_quality: {nosuch: 3}}]\n", "filters.c4_quality: unknown option 'nosuch'"),
        ('extract: {impl: "nosuch:x"}\n', "cannot import 'extract.impl' 'nosuch:x'"),
        ("extract: {options: {nosuch: 1}}\n", "unknown key 'extract.options.nosuch'"),
        ("extract: {options: {max_bytes: 5}}\n", "'extract.options.max_bytes' is not an option"),
    ],
)
def test_config_refuses_what_build_refuses(tmp_path, capsys, yaml_text, words):
    # 'corpus config' printed these configs with rc 0; 'corpus build' refused them, and left an
    # OUT recording the bad config, so that the corrected config was refused as "another config"
    cfg, err = _config_refused(tmp_path, capsys, yaml_text, words)
    out = tmp_path / "out"
    assert main(["corpus", "build", "-o", str(out), "--config", str(cfg), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == err and not out.exists()


@pytest.mark.parametrize(
    "yaml_text,words",
    [
        ("dedup: {image_urls: {max_occurrences: -1}}\n", "'dedup.image_urls.max_occurrences' must be >= 0"),
        (
            "fetch: {min_aspect: 3, max_aspect: 1}\n",
            "'fetch.min_aspect' (3) must be <= 'fetch.max_aspect' (1)",
        ),
        ("fetch: {max_aspect: 0}\n", "'fetch.max_aspect' must be > 0"),
        ("fetch: {min_aspect: .nan}\n", "'fetch.min_aspect' must be >= 0"),
        ("extract: {timeout_s: .nan}\n", "'extract.timeout_s' must be > 0"),
        ("fetch: {timeout_s: .nan}\n", "'fetch.timeout_s' must be > 0"),
        (
            'extract: {options: {drop_without_images: "yes"}}\n',
            "'extract.options': option 'drop_without_images' must be true or false, got 'yes'",
        ),
        ("extract: {options: {link_density: [1]}}\n", "option 'link_density' must be a number"),
    ],
)
def test_config_values_out_of_range_are_refused(tmp_path, capsys, yaml_text, words):
    # these were accepted: -1 removed every image, an empty aspect range every fetched image,
    # NaN passed the "> 0" checks, and "yes" was a truthy string where a bool belongs
    _config_refused(tmp_path, capsys, yaml_text, words)


def test_config_accepts_valid_extract_options(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("extract: {options: {drop_without_images: false, link_density: 1}}\n"
                   "dedup: {image_urls: {max_occurrences: 0}}\nfetch: {min_aspect: 1, max_aspect: 1}\n")  # fmt: skip
    assert main(["corpus", "config", "--config", str(cfg)]) == 0


def test_a_build_missing_a_data_shard_is_an_error(built, tmp_path, capsys):
    # with OUT/data/*.parquet gone, convert wrote '0 text records from 0 documents' and
    # fetch-images reported success, while stats.json counts a shard holding documents
    import shutil

    out = tmp_path / "c"
    shutil.copytree(built, out)
    part = out / "data" / "part-00000.parquet"
    part.unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    dest = tmp_path / "t.jsonl"
    for cmd in (
        ["convert", str(out), "--to", "text", "-o", str(dest)],
        ["fetch-images", str(out), "--no-progress"],
    ):
        assert main(["corpus", *cmd]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: {part}: missing ({out / 'stats.json'} counts 1 data shards)"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and not dest.exists()
    # a damaged stats.json is named by convert too
    (out / "stats.json").write_text("{")
    assert main(["corpus", "convert", str(out), "--to", "text", "-o", str(dest)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {out / 'stats.json'}: cannot read (JSONDecodeError")
