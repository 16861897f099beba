"""Local corpus engine: accounting, isolation (hanging/crashing pages), dedup, kill-and-resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interleaf.corpus import engine as E
from interleaf.corpus import pipeline as P
from interleaf.corpus.sample import iter_sample_pages, write_warc
from interleaf.errors import ConfigError, InputError

# the per-document parts (readers, extractor) come from interleaf.corpus.{warc,extract}

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# ---------------------------------------------------------------------------------------------
# a test-only extractor wrapper: the real extractor, plus pages that hang, crash or are slow


def marker_extractor(**opts):
    """``extract.impl`` for tests: markers in the HTML make the extractor hang, die or dawdle."""
    from interleaf.corpus.extract import extract

    def fn(page):
        if b"<!--TEST:HANG-->" in page.html:
            time.sleep(600)
        if b"<!--TEST:CRASH-->" in page.html:
            os._exit(7)
        if b"<!--TEST:SLOW-->" in page.html:
            time.sleep(0.03)
        return extract(page, **opts)

    return fn


_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which "
    "but all were when we there can more if will one about their has would been other some into "
    "river mountain garden library window morning question answer history science music market "
    "bridge winter summer animal forest ocean village teacher student journey picture language "
    "kitchen doctor engine number family country evening reason system method result letter"
).split()


def _article(rng: random.Random, title: str, n_par: int = 5, marker: str = "") -> str:
    pars = []
    for _ in range(n_par):
        sents = []
        for _ in range(rng.randint(3, 6)):
            ws = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
            sents.append(" ".join(ws).capitalize() + ".")
        pars.append("<p>" + " ".join(sents) + "</p>")
    img1 = f'<img src="/media/{title}-a.jpg" width="640" height="480" alt="A photo of {title}">'
    img2 = f'<img src="/media/{title}-b.png" width="400" height="300" alt="Diagram for {title}">'
    body = pars[:2] + [img1] + pars[2:4] + [img2] + pars[4:]
    return (
        f"<html><head><title>{title}</title></head><body>"
        '<nav><a href="/">Home</a> | <a href="/about">About</a></nav>'
        f"<article><h1>{title}</h1>{''.join(body)}</article>"
        "<footer>Copyright notice. All rights reserved.</footer>"
        f"{marker}</body></html>"
    )


def make_test_warc(path: Path, n: int = 40, seed: int = 0, hang: bool = True, crash: bool = True, slow=False):
    """A WARC of synthetic articles (+ exact URL and near duplicates, a hanging and a crashing page)."""
    rng = random.Random(seed)
    recs = []
    marker = "<!--TEST:SLOW-->" if slow else ""
    for i in range(n):
        html = _article(rng, f"topic{i}", marker=marker)
        recs.append(
            (
                f"http://site{i % 5}.example/post/{i}",
                html.encode(),
                "text/html; charset=utf-8",
                f"2023-0{1 + i % 9}-10T00:00:00Z",
            )
        )
    # an exact-URL re-crawl (later date) and a near-duplicate under another URL
    recs.append(
        (
            recs[3][0],
            recs[3][1].replace(b"</article>", b"<p>Updated.</p></article>"),
            recs[3][2],
            "2024-05-01T00:00:00Z",
        )
    )
    recs.append(("http://mirror.example/copy-of-7", recs[7][1], recs[7][2], "2022-01-01T00:00:00Z"))
    if hang:
        recs.append(
            (
                "http://bad.example/hang",
                _article(rng, "hang", marker="<!--TEST:HANG-->").encode(),
                "text/html",
                "2023-01-01T00:00:00Z",
            )
        )
    if crash:
        recs.append(
            (
                "http://bad.example/crash",
                _article(rng, "crash", marker="<!--TEST:CRASH-->").encode(),
                "text/html",
                "2023-01-01T00:00:00Z",
            )
        )
    # real pages no one on the project wrote
    recs += [r for r in iter_sample_pages() if r[2].startswith("text/html")][:6]
    rng.shuffle(recs)
    write_warc(path, recs)
    return recs


def _cfg(tmp_path: Path, **extra) -> Path:
    cfg = {
        "read": {"shard_size": 7},
        "extract": {"impl": "test_corpus_engine:marker_extractor", "timeout_s": 1.5},
        "filters": [],
    }
    for k, v in extra.items():
        cfg[k] = v
    p = tmp_path / "pipeline.yaml"
    import yaml

    p.write_text(yaml.safe_dump(cfg))
    return p


def _outputs(out: Path) -> dict[str, bytes]:
    files = {}
    for sub in ("data", "excluded", "errors"):
        for p in sorted((out / sub).glob("*")):
            files[f"{sub}/{p.name}"] = p.read_bytes()
    return files


def _stats_wo_time(out: Path) -> dict:
    st = json.loads((out / "stats.json").read_text())
    for s in st["stages"]:
        s.pop("time_s")
    return st


# ---------------------------------------------------------------------------------------------


def test_accounting_isolation_and_dedup(tmp_path):
    warc = tmp_path / "in.warc.gz"
    recs = make_test_warc(warc)
    cfg = P.load_config(_cfg(tmp_path, write={"exclusions": "full"}))
    t0 = time.monotonic()
    stats = E.build([warc], tmp_path / "out", cfg, workers=2, progress=False)
    assert time.monotonic() - t0 < 60
    out = tmp_path / "out"
    assert stats["balanced"] and stats["records_in"] >= len(recs)
    assert stats["records_in"] == stats["docs_out"] + stats["excluded"] + stats["errors"]
    for st in stats["stages"]:
        from interleaf.corpus.base import StepStats

        assert StepStats.from_dict(st).balanced(), st["name"]
    errors = [
        json.loads(line) for p in (out / "errors").glob("*.jsonl") for line in p.read_text().splitlines()
    ]
    by_url = {e["url"]: e for e in errors}
    assert by_url["http://bad.example/hang"]["reason"] == "timeout"
    assert by_url["http://bad.example/crash"]["reason"] == "crash"
    assert "code 7" in by_url["http://bad.example/crash"]["detail"]
    excluded = [
        json.loads(line) for p in (out / "excluded").glob("*.jsonl") for line in p.read_text().splitlines()
    ]
    assert len(excluded) == stats["excluded"] and len(errors) == stats["errors"]
    # write.exclusions: full -> each document removed after extraction is kept with its reason
    for e in excluded:
        if e["stage"] != "extract":
            assert e["document"]["texts"] and e["id"], e
    docs = list(E.iter_output_documents(out))
    assert len(docs) == stats["docs_out"]
    urls = [d.url for d in docs]
    # exact URL duplicate: only the later crawl survives; near duplicate under another URL removed
    assert urls.count("http://site3.example/post/3") == 1
    kept3 = next(d for d in docs if d.url == "http://site3.example/post/3")
    assert kept3.general_metadata["crawl_date"].startswith("2024-05-01")
    reasons = {(e["url"], e["reason"]) for e in excluded}
    assert ("http://site3.example/post/3", "duplicate_url") in reasons
    assert any(
        r == "near_duplicate" and u in ("http://mirror.example/copy-of-7", "http://site2.example/post/7")
        for u, r in reasons
    )
    # images stay in place: the synthetic articles have text, image, text, image, text
    art = next(d for d in docs if d.url.startswith("http://site1.example"))
    kinds = ["i" if x is not None else "t" for x in art.images]
    assert "i" in kinds and kinds[0] == "t"
    assert all(x.startswith("http://site1.example/media/") for x in art.image_urls)
    # a second call on a finished run does nothing and returns the same stats
    assert E.build([warc], out, cfg, workers=2, progress=False)["docs_out"] == stats["docs_out"]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dedup.minhash.treshold"):
        P.load_config({"dedup": {"minhash": {"treshold": 0.7}}})
    with pytest.raises(ConfigError, match="'colour'"):
        P.load_config({"colour": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("read: {shard_size: many}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*read.shard_size"):
        P.load_config(bad)
    with pytest.raises(ConfigError, match="extract.options.colour"):
        E.DocProcessor(P.load_config({"extract": {"options": {"colour": 1}}}))
    with pytest.raises(ConfigError, match="filters.nope"):
        E.DocProcessor(P.load_config({"filters": ["nope"]}))
    with pytest.raises(InputError, match="does not exist"):
        E.build([tmp_path / "nope.warc.gz"], tmp_path / "o", P.load_config())
    warc = tmp_path / "in.warc.gz"
    make_test_warc(warc, n=10, hang=False, crash=False)
    cfg = P.load_config(_cfg(tmp_path))
    E.build([warc], tmp_path / "o2", cfg, workers=1, progress=False)
    other = P.load_config(_cfg(tmp_path), **{"dedup.minhash.threshold": 0.9})
    with pytest.raises(ConfigError, match="another config"):
        E.build([warc], tmp_path / "o2", other, workers=1, progress=False)


def test_run_of_an_older_format_is_not_resumed(tmp_path):
    """A build started before today's output changes (C4 default, filter_scores, page size limit)
    has the same config fingerprint: the run format is what tells it apart."""
    warc = tmp_path / "in.warc.gz"
    make_test_warc(warc, n=10, hang=False, crash=False)
    cfg = P.load_config(_cfg(tmp_path))
    out = tmp_path / "o"
    E.build([warc], out, cfg, workers=1, progress=False)
    manifest = json.loads((out / E.WORK / "run.json").read_text())
    assert manifest["format"] == E.RUN_FORMAT >= 2
    # as an older interleaf left it, interrupted before the end
    (out / E.WORK / "run.json").write_text(json.dumps(manifest | {"format": 1}))
    (out / "_SUCCESS").unlink()
    before = _outputs(out)
    with pytest.raises(ConfigError) as info:
        E.build([warc], out, cfg, workers=1, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "run format 1" in msg and "build again in a new output directory" in msg
    assert _outputs(out) == before and not (out / "_SUCCESS").exists()
    # a finished older build is not taken for done either
    (out / "_SUCCESS").write_text("")
    with pytest.raises(ConfigError, match="build again"):
        E.build([warc], out, cfg, workers=1, progress=False)


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    # the corpus commands alone (interleaf.cli would also import the model parts: slower start)
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen(
        [sys.executable, "-m", "interleaf.corpus.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` as soon as ``cond()`` holds; False if it finished first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("kill condition never met")


def test_kill_and_resume_gives_identical_output(tmp_path):
    warc = tmp_path / "in.warc.gz"
    make_test_warc(warc, n=40, seed=3, hang=False, crash=True, slow=True)
    cfg = _cfg(tmp_path)
    ref = tmp_path / "ref"
    r = _run_cli(["corpus", "build", str(warc), "-o", str(ref), "--config", str(cfg), "--workers", "2"])
    _, err = r.communicate(timeout=120)
    assert r.returncode == 0, err.decode()
    expected, expected_stats = _outputs(ref), _stats_wo_time(ref)
    assert expected and expected_stats["balanced"]

    out = tmp_path / "out"
    stage1 = out / "_work" / "stage1"
    final = out / "_work" / "final"

    def n_committed(d: Path) -> int:
        return len([p for p in d.glob("*") if ".tmp" not in p.name]) if d.exists() else 0

    kill_points = [
        lambda: n_committed(stage1) >= 1,  # mid phase 1
        lambda: n_committed(stage1) >= 4,  # later in phase 1 (first shards already done)
        lambda: (out / "_work" / "dedup").exists() or n_committed(final) >= 1,  # dedup / finalize
        lambda: n_committed(final) >= 3,  # mid finalize
    ]
    killed = 0
    args = ["corpus", "build", str(warc), "-o", str(out), "--config", str(cfg), "--workers", "2"]
    for cond in kill_points:
        p = _run_cli(args)
        killed += _kill_when(p, cond)
        if (out / "_SUCCESS").exists():
            break
    assert killed >= 2
    p = _run_cli(args)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert _outputs(out) == expected
    assert _stats_wo_time(out) == expected_stats
    # no temporary file survives a finished run
    assert not [q for q in out.rglob("*") if ".tmp" in q.name]


def test_isolated_pool_restarts_and_keeps_order(tmp_path):
    from interleaf.corpus.base import RawPage

    cfg = P.load_config(_cfg(tmp_path))
    rng = random.Random(1)
    pages = []
    for i in range(12):
        marker = "<!--TEST:CRASH-->" if i in (2, 3, 9) else ""
        pages.append(
            RawPage(url=f"http://x.example/{i}", html=_article(rng, f"t{i}", marker=marker).encode())
        )
    pool = E.IsolatedPool(cfg, workers=2, batch_size=4)
    got = dict(pool.imap(enumerate(pages)))
    assert sorted(got) == list(range(12))
    assert sorted(i for i, o in got.items() if o["status"] == "error") == [2, 3, 9]
    assert all(got[i]["url"] == f"http://x.example/{i}" for i in range(12))
    assert pool.restarts == 3


def test_bad_inputs_are_counted_and_the_run_goes_on(tmp_path):
    warc = tmp_path / "in.warc.gz"
    make_test_warc(warc, n=12, seed=9, hang=False, crash=False)
    data = warc.read_bytes()
    cut = tmp_path / "truncated.warc.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])  # a crawl file cut off mid-record
    good = {
        "texts": ["Some text.", None],
        "images": [None, "http://x.example/a.jpg"],
        "general_metadata": {"id": "j1", "url": "http://x.example/1"},
    }
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"texts": ["a"], "images": []}) + "\n")
    huge = tmp_path / "huge.html"
    huge.write_bytes(
        b"<html><body>"
        + b"<div>" * 5000
        + b"<p>deep</p><img src='a.png'>"
        + b"</div>" * 5000
        + b"</body></html>"
    )
    cfg = P.load_config(_cfg(tmp_path))
    stats = E.build([cut, rows, huge], tmp_path / "out", cfg, workers=2, progress=False)
    assert stats["balanced"]
    errors = [
        json.loads(x)
        for p in (tmp_path / "out" / "errors").glob("*.jsonl")
        for x in p.read_text().splitlines()
    ]
    excluded = [
        json.loads(x)
        for p in (tmp_path / "out" / "excluded").glob("*.jsonl")
        for x in p.read_text().splitlines()
    ]
    reasons = {e["reason"] for e in errors + excluded}
    assert len(errors) + len(excluded) + stats["docs_out"] == stats["records_in"]
    assert any(e["stage"] == "read" for e in errors)  # truncated record / malformed rows
    assert len([e for e in errors if e["stage"] == "read"]) >= 3, reasons
    assert "j1" in {d.id for d in E.iter_output_documents(tmp_path / "out")}


def _site(root: Path, n: int = 3, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        (root / f"p{i}.html").write_text(_article(rng, f"page{i}"))
        names.append(f"p{i}.html")
    return names


def test_a_folder_yields_every_input_in_it(tmp_path):
    site = tmp_path / "site"
    _site(site)
    (site / "sub").mkdir()
    (site / "sub" / "p9.html").write_text(_article(random.Random(2), "nested"))
    (site / "searchindex.json").write_text('{"doc_urls": ["p0.html"]}\n')  # mdBook's, not a corpus
    good = {
        "texts": ["Some text.", None],
        "images": [None, "http://x.example/a.jpg"],
        "general_metadata": {"id": "j1", "url": "http://x.example/1"},
    }
    (site / "rows.jsonl").write_text(json.dumps(good) + "\n")
    (site / "notes.txt").write_text("not a page")
    for asset in ("style.css", "logo.png", "app.js"):  # a site's assets: not inputs, not counted
        (site / asset).write_text("x")
    (site / ".git").mkdir()
    (site / ".git" / "index.html").write_text(_article(random.Random(3), "hidden"))
    paths = E.expand_inputs([site])
    assert paths == [
        site.resolve(),
        *(site.resolve() / n for n in ("rows.jsonl", "notes.txt", "searchindex.json")),
    ]
    cfg = P.load_config(_cfg(tmp_path))
    stats = E.build([site], tmp_path / "out", cfg, workers=1, progress=False)
    assert stats["balanced"] and stats["records_in"] == 4 + 1 + 1 + 1
    urls = {d.url for d in E.iter_output_documents(tmp_path / "out")}
    assert {(site / f"p{i}.html").resolve().as_uri() for i in range(3)} <= urls
    assert (site / "sub" / "p9.html").resolve().as_uri() in urls and "http://x.example/1" in urls
    errors = [
        json.loads(x)
        for p in (tmp_path / "out" / "errors").glob("*.jsonl")
        for x in p.read_text().splitlines()
    ]
    assert {(Path(e["source"]).name, e["reason"]) for e in errors} == {
        ("searchindex.json", "unsupported_file"),  # one error, not one per line
        ("notes.txt", "unsupported_file"),
    }
    # a folder with nothing to read is an error naming it; an unknown file named explicitly too
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "logo.png").write_text("x")
    with pytest.raises(InputError, match="empty: folder holds no"):
        E.expand_inputs([tmp_path / "empty"])
    with pytest.raises(InputError, match="notes.txt: unknown input type"):
        E.expand_inputs([site / "notes.txt"])
    # .json: a pretty-printed document is not a corpus; JSON lines with a damaged first row or a BOM are
    row = json.dumps({"texts": ["T", None], "images": [None, "http://x.example/i.png"]})
    (tmp_path / "manifest.json").write_text(
        json.dumps({"name": "site", "icons": [{"src": "a.png"}]}, indent=2)
    )
    (tmp_path / "damaged.json").write_text('{"texts": ["cut\n' + row + "\n" + row + "\n")
    (tmp_path / "bom.json").write_text("\ufeff" + row + "\n", encoding="utf-8")
    assert not E._corpus_file(tmp_path / "manifest.json")
    assert E._corpus_file(tmp_path / "damaged.json") and E._corpus_file(tmp_path / "bom.json")
    stats = E.build([tmp_path / "damaged.json"], tmp_path / "out-damaged", cfg, workers=1, progress=False)
    assert (stats["records_in"], stats["errors"], stats["balanced"]) == (3, 1, True)


def test_single_gz_and_shtml_pages_are_inputs(tmp_path):
    import gzip

    _site(tmp_path / "site", n=2)
    page, other = tmp_path / "site" / "p0.html", tmp_path / "site" / "p1.html"
    gz = tmp_path / "manual.html.gz"
    gz.write_bytes(gzip.compress(page.read_bytes()))
    shtml = tmp_path / "index.shtml"
    shtml.write_bytes(other.read_bytes())
    assert E.expand_inputs([gz, shtml]) == [gz.resolve(), shtml.resolve()]
    cfg = P.load_config(_cfg(tmp_path))
    stats = E.build([gz, shtml], tmp_path / "out", cfg, workers=1, progress=False)
    assert stats["records_in"] == 2 and stats["errors"] == 0 and stats["docs_out"] == 2
    urls = [d.url for d in E.iter_output_documents(tmp_path / "out")]
    assert urls == [(tmp_path / "manual.html").resolve().as_uri(), shtml.resolve().as_uri()]


def test_site_json_file_is_one_unsupported_file_error(tmp_path):
    """A site's pretty-printed manifest.json was read as a corpus: one bad_json error per line."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(
        "<html><body><p>" + "A page of the site with enough words to keep. " * 20 + "</p></body></html>"
    )
    (site / "manifest.json").write_text(
        json.dumps({"name": "site", "icons": [{"src": "a.png"}] * 3}, indent=2)
    )
    assert len((site / "manifest.json").read_text().splitlines()) > 10
    row = {
        "texts": ["A document of a JSON-lines corpus named .json.", None],
        "images": [None, "http://e.org/a.png"],
    }
    (site / "rows.json").write_text("\n" + json.dumps(row) + "\n")
    (site / "rows.jsonl").write_text(json.dumps(row) + "\n")
    assert [p.name for p in E.expand_inputs([site])] == ["site", "rows.json", "rows.jsonl", "manifest.json"]
    out = tmp_path / "o"
    cfg = P.load_config({"filters": [], "dedup": {"minhash": {"enabled": False}, "url": {"enabled": False}}})
    E.build([site], out, cfg, workers=1, progress=False)
    errors = [r for p in sorted((out / "errors").glob("*.jsonl")) for r in E.read_jsonl(p)]
    assert [(Path(e["source"]).name, e["reason"]) for e in errors] == [("manifest.json", "unsupported_file")]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records_in"] == 4 and stats["errors"] == 1


def test_warc_inputs_without_warc_data_are_counted_errors(tmp_path):
    # a 0-byte x.warc.gz gave '0 records -> 0 documents', no error: as if the file had been read
    import gzip

    sample = Path(E.__file__).parent.parent / "data" / "corpus" / "sample.warc.gz"
    files = {
        "empty.warc.gz": b"",
        "empty.warc": b"",
        "nothing.warc.gz": gzip.compress(b""),
        "cut.warc.gz": sample.read_bytes()[:12],  # a download cut inside its first gzip header
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    stats = E.build([tmp_path / n for n in files], tmp_path / "out", P.load_config(), progress=False)
    assert stats["records_in"] == stats["errors"] == 4 and stats["balanced"]
    read = next(s for s in stats["stages"] if s["name"] == "read")
    assert read["errors_by_reason"] == {"empty_file": 3, "corrupt_record": 1}
    errors = [r for p in sorted((tmp_path / "out" / "errors").glob("*.jsonl")) for r in E.read_jsonl(p)]
    assert sorted((Path(r["source"]).name, r["reason"]) for r in errors) == [
        ("cut.warc.gz", "corrupt_record"),
        ("empty.warc", "empty_file"),
        ("empty.warc.gz", "empty_file"),
        ("nothing.warc.gz", "empty_file"),
    ]
