"""Image fetching over a real HTTP server on loopback, local files, perceptual hashes."""

from __future__ import annotations

import io
import time
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image, ImageDraw

from interleaf.corpus import fetch as F


def _png(w: int, h: int, seed: int = 0) -> bytes:
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for i in range(6):
        x = (seed * 37 + i * 53) % max(1, w - 20)
        y = (seed * 17 + i * 29) % max(1, h - 20)
        d.rectangle([x, y, x + w // 4, y + h // 5], fill=((seed * 80 + i * 40) % 256, i * 40, 200 - i * 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


PNG = _png(300, 200, 1)
COUNTS: dict[str, int] = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, ctype: str, body: bytes, length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up (timeout test)
            pass

    def do_GET(self):  # noqa: N802 - http.server API
        COUNTS[self.path] = COUNTS.get(self.path, 0) + 1
        if self.path == "/ok.png":
            self._send(200, "image/png", PNG)
        elif self.path == "/html":
            self._send(200, "text/html", b"<html></html>")
        elif self.path == "/garbage.png":
            self._send(200, "image/png", b"not an image at all")
        elif self.path == "/big.png":
            self._send(200, "image/png", b"x" * 10, length=50_000_000)
        elif self.path == "/slow.png":
            time.sleep(1.5)
            self._send(200, "image/png", PNG)
        elif self.path == "/flaky.png":
            if COUNTS[self.path] == 1:
                self._send(503, "text/plain", b"busy")
            else:
                self._send(200, "image/png", PNG)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, "text/plain", b"nope")


@pytest.fixture(scope="module")
def server(loopback_http):
    with loopback_http(Handler) as base:
        yield base


def test_fetch_over_loopback_reasons(server, tmp_path):
    f = F.ImageFetcher(
        tmp_path / "img", timeout_s=0.5, max_bytes=1_000_000, retries=1, allow_private=True, backoff_s=0.01
    )
    urls = {k: f"{server}/{k}" for k in ("ok.png", "html", "garbage.png", "big.png", "missing.png", "moved")}
    res = f.fetch_many(urls.values())
    ok = res[urls["ok.png"]]
    assert ok.ok and (ok.real_width, ok.real_height) == (300, 200)
    assert ok.sha256 and len(ok.p_hash) == 16 and len(ok.d_hash) == 16
    stored = F.Path(ok.bytes_path)
    assert stored.read_bytes() == PNG and stored.name == F.hashlib.sha256(urls["ok.png"].encode()).hexdigest()
    assert res[urls["html"]].reason == "bad_content_type"
    assert res[urls["garbage.png"]].reason == "undecodable"
    assert res[urls["big.png"]].reason == "too_large"
    assert res[urls["missing.png"]].reason == "http_404" and res[urls["missing.png"]].attempts == 1
    assert res[urls["moved"]].ok and res[urls["moved"]].sha256 == ok.sha256


def test_timeout_retry_and_cache(server, tmp_path):
    f = F.ImageFetcher(tmp_path / "img", timeout_s=0.4, retries=0, allow_private=True)
    slow = f.fetch(f"{server}/slow.png")
    assert not slow.ok and slow.reason == "timeout"
    f2 = F.ImageFetcher(tmp_path / "img", retries=2, allow_private=True, backoff_s=0.01)
    flaky = f2.fetch(f"{server}/flaky.png")
    assert flaky.ok and flaky.attempts == 2
    n = COUNTS["/flaky.png"]
    again = f2.fetch(f"{server}/flaky.png")  # stored by sha256(url): no new request
    assert again.ok and COUNTS["/flaky.png"] == n and again.sha256 == flaky.sha256


def test_loopback_and_private_refused_by_default(server, tmp_path):
    f = F.ImageFetcher(tmp_path / "img", timeout_s=1)
    r = f.fetch(f"{server}/ok.png")
    assert not r.ok and r.reason == "private_address"
    for ip in ("10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "0.0.0.0", "::ffff:127.0.0.1"):
        assert not F.address_allowed(ip), ip
    assert F.address_allowed("93.184.216.34")
    assert f.fetch("ftp://example.org/x.png").reason == "unsupported_scheme"


def test_local_files_only_under_roots(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "a.png").write_bytes(_png(200, 160, 3))
    f = F.ImageFetcher(tmp_path / "img", local_roots=[str(root)])
    assert f.fetch((root / "a.png").as_uri()).ok
    assert f.fetch(str(root / "a.png")).ok
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(200, 160, 4))
    assert f.fetch(outside.as_uri()).reason == "local_file_refused"
    assert f.fetch((root / "missing.png").as_uri()).reason == "not_found"
    # bytes stored by a run with wider permissions are not taken by a run without them
    narrow = F.ImageFetcher(tmp_path / "img")
    assert narrow.fetch((root / "a.png").as_uri()).reason == "local_file_refused"
    narrow._store("http://127.0.0.1:9/x.png", _png(200, 160, 5))
    assert narrow.fetch("http://127.0.0.1:9/x.png").reason == "private_address"
    assert F.ImageFetcher(tmp_path / "img", allow_private=True).fetch("http://127.0.0.1:9/x.png").ok


def test_perceptual_hashes_near_duplicates():
    a = Image.open(io.BytesIO(_png(300, 200, 5)))
    a_small = a.resize((150, 100))
    b = Image.open(io.BytesIO(_png(300, 200, 9)))
    assert F.hamming(F.p_hash(a), F.p_hash(a_small)) <= 4
    assert F.hamming(F.d_hash(a), F.d_hash(a_small)) <= 6
    assert F.hamming(F.p_hash(a), F.p_hash(b)) > 10


def test_pixel_verdicts():
    cfg = {"min_side": 150, "min_aspect": 0.5, "max_aspect": 2.0}
    ok = F.FetchResult(url="u", ok=True, real_width=300, real_height=200)
    assert F.pixel_verdict(ok, cfg) is None
    assert (
        F.pixel_verdict(F.FetchResult(url="u", ok=True, real_width=100, real_height=200), cfg) == "too_small"
    )
    assert (
        F.pixel_verdict(F.FetchResult(url="u", ok=True, real_width=700, real_height=200), cfg)
        == "aspect_ratio"
    )
    assert F.pixel_verdict(F.FetchResult(url="u", ok=False, reason="timeout"), cfg) == "fetch:timeout"


SMALL, WIDE = _png(100, 100, 2), _png(700, 200, 3)


class CorpusHandler(Handler):
    def do_GET(self):  # noqa: N802
        if self.path == "/small.png":
            self._send(200, "image/png", SMALL)
        elif self.path == "/wide.png":
            self._send(200, "image/png", WIDE)
        elif self.path == "/copy.png":
            self._send(200, "image/png", PNG)
        else:
            super().do_GET()


def test_fetch_corpus_over_loopback(tmp_path, loopback_http):
    import json
    import shutil

    from interleaf.corpus import engine as E
    from interleaf.corpus import pipeline as P
    from interleaf.corpus.sample import write_warc

    with loopback_http(CorpusHandler) as base:
        text = " ".join(["The garden by the river had many old trees and a small bridge."] * 6)
        pages = []
        for i, imgs in enumerate(
            [["ok.png", "small.png"], ["wide.png", "missing.png"], ["ok.png", "copy.png", "html"]]
        ):
            tags = "".join(f'<p>{text}</p><img src="{base}/{x}" width="300" height="200">' for x in imgs)
            html = (
                f"<html><body><article><h1>Page {i}</h1>{tags}<p>{text} End {i}.</p></article></body></html>"
            )
            pages.append((f"http://pages.example/{i}", html.encode(), "text/html", "2024-01-01T00:00:00Z"))
        warc = tmp_path / "p.warc.gz"
        write_warc(warc, pages)
        cfg = P.load_config({"filters": [], "dedup": {"minhash": {"enabled": False}}})
        out = tmp_path / "out"
        E.build([warc], out, cfg, workers=1, progress=False)
        n_docs = json.loads((out / "stats.json").read_text())["docs_out"]
        assert n_docs == 3
        refused = tmp_path / "refused"
        shutil.copytree(out, refused)

        stats = F.fetch_corpus(out, {"allow_private": True, "retries": 0, "timeout_s": 2}, progress=False)
        fetch = next(s for s in stats["stages"] if s["name"] == "fetch")
        removed = fetch["images_removed_by_reason"]
        assert removed.get("too_small") == 1 and removed.get("fetch:bad_content_type") == 1
        assert removed.get("phash_duplicate_in_document") == 1  # copy.png is ok.png under another URL
        assert stats["balanced"] and fetch["excluded_by_reason"] == {"no_images_after_fetch": 1}
        # page 1 lost both images (aspect ratio, 404): excluded, with the image reasons recorded
        assert fetch["images_in_dropped_docs"] == 2
        (excl,) = [json.loads(x) for x in (out / "excluded" / "fetch-00000.jsonl").read_text().splitlines()]
        assert excl["url"] == "http://pages.example/1"
        assert "aspect_ratio=1" in excl["detail"] and "fetch:http_404=1" in excl["detail"]
        docs = list(E.iter_output_documents(out))
        assert len(docs) == 2
        meta = [m for d in docs for m in d.metadata if m is not None]
        assert all(m["real_width"] == 300 and m["real_height"] == 200 and m["sha256"] for m in meta)
        # resumable: running it again changes nothing
        again = F.fetch_corpus(out, {"allow_private": True}, progress=False)
        assert again["docs_out"] == stats["docs_out"]

        # by default the loopback address is refused for every image: no document keeps an image
        st2 = F.fetch_corpus(refused, {}, progress=False)
        f2 = next(s for s in st2["stages"] if s["name"] == "fetch")
        assert st2["docs_out"] == 0 and st2["balanced"]
        logs = [
            json.loads(x)
            for p in (refused / "_work" / "fetch").glob("run-*/*.results.jsonl")
            for x in p.read_text().splitlines()
        ]
        assert logs and all(r["reason"] == "private_address" for r in logs)
        assert f2["images_in_dropped_docs"] == f2["images_in"]

        # the same stage inside a build (fetch.enabled): same documents as the separate command
        cfg2 = P.load_config(
            {
                "filters": [],
                "dedup": {"minhash": {"enabled": False}},
                "fetch": {"enabled": True, "allow_private": True, "retries": 0, "timeout_s": 2},
            }
        )
        st3 = E.build([warc], tmp_path / "inline", cfg2, workers=1, progress=False)
        assert (tmp_path / "inline" / "_SUCCESS").exists() and st3["balanced"]
        assert [d.url for d in E.iter_output_documents(tmp_path / "inline")] == [d.url for d in docs]


# ---------------------------------------------------------------------------------------------
# the fetch stage over a built corpus: settings, preserved input, kill and resume

_TEXT = "The garden by the river had many old trees and a small bridge near the {} house."


def _page(i: int, srcs: list[str]) -> str:
    text = " ".join([_TEXT.format(f"number {i}")] * 6)
    tags = "".join(f'<p>{text}</p><img src="{x}" width="300" height="200" alt="photo {i}">' for x in srcs)
    return f"<html><head><title>P{i}</title></head><body><article><h1>Page {i}</h1>{tags}<p>{text}</p></article></body></html>"


def _local_site(root, n: int = 8):
    """HTML pages whose images are local files; page 1's images are missing (it is excluded)."""
    (root / "img").mkdir(parents=True)
    for i in range(n):
        srcs = [f"img/{i}-a.png", f"img/{i}-b.png"]
        for k, src in enumerate(srcs):
            if i != 1:
                (root / src).write_bytes(
                    _png(300 - 40 * k, 200, 10 * i + k) if i != 3 or k else _png(90, 90, i)
                )
        (root / f"p{i}.html").write_text(_page(i, srcs))


def _built(tmp_path, inputs, shard_size: int = 2):
    from interleaf.corpus import engine as E
    from interleaf.corpus import pipeline as P

    cfg = P.load_config(
        {"read": {"shard_size": shard_size}, "filters": [], "dedup": {"minhash": {"enabled": False}}}
    )
    out = tmp_path / "built"
    E.build(inputs, out, cfg, workers=1, progress=False)
    return out


def _state(out):
    from test_corpus_engine import _outputs, _stats_wo_time

    return _outputs(out), _stats_wo_time(out)


def test_fetch_images_config_flags_and_changed_settings(tmp_path, capsys):
    import json
    import shutil

    import yaml

    from interleaf.cli import main

    site = tmp_path / "site"
    _local_site(site)
    built = _built(tmp_path, [site])
    a, b, c = (tmp_path / x for x in "abc")
    for d in (a, b, c):
        shutil.copytree(built, d)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"fetch": {"local_roots": [str(site)]}}))
    # the config's local_roots are kept when no --local-root is given
    assert main(["corpus", "fetch-images", str(a), "--config", str(cfg), "--no-progress"]) == 0
    first = _state(a)
    stats = json.loads((a / "stats.json").read_text())
    fetch = next(s for s in stats["stages"] if s["name"] == "fetch")
    assert stats["docs_out"] == 7 and fetch["excluded_by_reason"] == {"no_images_after_fetch": 1}
    assert fetch["images_removed_by_reason"] == {"too_small": 1} and fetch["images_out"] == 13
    # other settings redo the work from the pre-fetch shards: as a first run with them
    assert main(["corpus", "fetch-images", str(a), "--no-progress"]) == 0
    assert main(["corpus", "fetch-images", str(b), "--no-progress"]) == 0
    assert _state(a) == _state(b)
    assert json.loads((a / "stats.json").read_text())["docs_out"] == 0  # every local file refused
    # and back: --local-root gives what the config gave
    assert main(["corpus", "fetch-images", str(a), "--local-root", str(site), "--no-progress"]) == 0
    assert main(["corpus", "fetch-images", str(c), "--config", str(cfg), "--no-progress"]) == 0
    assert _state(a) == _state(c) == first
    assert len(list((a / "_work" / "fetch").glob("run-*"))) == 1  # only the current settings' state


def test_fetch_resume_after_every_interleaving(tmp_path):
    import os
    import shutil

    site = tmp_path / "site"
    _local_site(site)
    built = _built(tmp_path, [site])
    fc = {"local_roots": [str(site)]}
    ref = tmp_path / "ref"
    shutil.copytree(built, ref)
    F.fetch_corpus(ref, fc, progress=False)
    expected = _state(ref)
    assert expected[1]["excluded"] == 1 and expected[1]["shards"] == 4

    out = tmp_path / "out"
    shutil.copytree(built, out)
    F.fetch_corpus(out, fc, progress=False)
    work = out / "_work" / "fetch"

    def markers():
        return sorted(work.rglob("s-*.done.json"))

    n = len(markers())
    assert n == 4
    # a kill between the shard's rewrite and its marker (data and exclusions written, or only
    # the data), in pass 2, and in pass 1: each rerun ends as the uninterrupted run
    for s in range(n):
        markers()[s].unlink()
        F.fetch_corpus(out, fc, progress=False)
        assert _state(out) == expected, s
        markers()[s].unlink()
        (out / "excluded" / f"fetch-{s:05d}.jsonl").unlink()
        F.fetch_corpus(out, fc, progress=False)
        assert _state(out) == expected, s
    for m in markers():
        m.unlink()
    next(work.rglob("phash_common.json")).unlink()
    for log in sorted(work.rglob("*.results.jsonl"))[2:]:
        log.unlink()
    # temporaries of a killed run (data, work, image store) are cleaned
    (out / "data" / f".part-00000.parquet.tmp-{os.getpid() + 999999}").write_bytes(b"x")
    (next(work.glob("run-*")) / ".s-00001.done.json.tmp-1").write_bytes(b"x")
    (out / "images" / ".tmp").mkdir(exist_ok=True)
    (out / "images" / ".tmp" / "999999999-1-abc").write_bytes(b"x")
    F.fetch_corpus(out, fc, progress=False)
    assert _state(out) == expected
    assert not [q for q in out.rglob("*") if ".tmp" in q.name and q.is_file()]


class SlowImages(BaseHTTPRequestHandler):
    """Distinct 300x200 PNGs at /img/N.png, each after 40 ms; 404 elsewhere."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        time.sleep(0.04)
        if self.path.startswith("/img/"):
            body = _png(300, 200, int(self.path[5:].split(".")[0]))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
        else:
            body = b"nope"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_fetch_images_killed_anywhere_resumes_to_identical_output(tmp_path, loopback_http):
    import shutil

    import yaml

    from interleaf.corpus.sample import write_warc
    from test_corpus_engine import _kill_when, _run_cli

    with loopback_http(SlowImages) as base:
        pages = []
        for i in range(12):
            srcs = (
                [f"{base}/gone/{i}.png"] * 2
                if i == 4
                else [f"{base}/img/{2 * i}.png", f"{base}/img/{2 * i + 1}.png"]
            )
            pages.append(
                (f"http://pages.example/{i}", _page(i, srcs).encode(), "text/html", "2024-01-01T00:00:00Z")
            )
        warc = tmp_path / "p.warc.gz"
        write_warc(warc, pages)
        built = _built(tmp_path, [warc])
        cfg = tmp_path / "p.yaml"
        cfg.write_text(yaml.safe_dump({"fetch": {"allow_private": True, "concurrency": 1, "retries": 0}}))
        ref, out = tmp_path / "ref", tmp_path / "out"
        shutil.copytree(built, ref)
        shutil.copytree(built, out)
        args = ["corpus", "fetch-images", str(ref), "--config", str(cfg), "--no-progress"]
        r = _run_cli(args)
        _, err = r.communicate(timeout=120)
        assert r.returncode == 0, err.decode()
        expected = _state(ref)
        assert expected[1]["shards"] == 6 and expected[1]["excluded"] == 1 and expected[1]["docs_out"] == 11

        work = out / "_work" / "fetch"

        def count(pattern: str) -> int:
            return len([p for p in work.rglob(pattern) if ".tmp" not in p.name])

        kill_points = [
            lambda: count("input/part-*") >= 1,  # before any fetch
            lambda: count("*.results.jsonl") >= 2,  # mid pass 1
            lambda: count("*.results.jsonl") >= 5,
            lambda: count("phash_common.json") + count("*.done.json") >= 1,  # pass 2 / 3
            lambda: count("*.done.json") >= 3,  # mid pass 3
        ]
        args[2] = str(out)
        killed = 0
        for cond in kill_points:
            p = _run_cli(args)
            killed += _kill_when(p, cond)
        assert killed >= 3, killed
        p = _run_cli(args)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert _state(out) == expected
        assert not [q for q in out.rglob("*") if ".tmp" in q.name and q.is_file()]


def test_fetch_section_types_are_checked(tmp_path):
    """A string local_roots was one root per character ('/' among them: any file readable)."""
    from interleaf.corpus import pipeline as P
    from interleaf.errors import ConfigError

    cfg = tmp_path / "p.yaml"
    cfg.write_text("fetch: {local_roots: /tmp/x}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: 'fetch\.local_roots' must be a list of strings"):
        P.load_config(cfg)
    site = tmp_path / "site"
    _local_site(site, n=2)
    built = _built(tmp_path, [site])
    before = _state(built)
    with pytest.raises(ConfigError, match=r"'fetch\.local_roots' must be a list of strings"):
        F.fetch_corpus(built, {"local_roots": "/tmp/x"}, progress=False)
    assert _state(built) == before
    for fc, msg in (
        ({"local_roots": [1]}, "'fetch.local_roots' must be a list of strings"),
        ({"timeout_s": None}, "'fetch.timeout_s' must not be null"),
        ({"timeout_s": "5"}, "'fetch.timeout_s' must be a number"),
        ({"retries": 1.5}, "'fetch.retries' must be a whole number"),
        ({"concurrency": 0}, "'fetch.concurrency' must be > 0"),
        ({"allow_private": "yes"}, "'fetch.allow_private' must be true or false"),
        ({"images_dir": 3}, "'fetch.images_dir' must be a string or null"),
    ):
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            P.load_config({"fetch": fc})
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            F.fetch_corpus(built, fc, progress=False)
    # the library refuses a string too
    with pytest.raises(ConfigError, match="local_roots"):
        P.fetch_config({"local_roots": "/"})


def test_relative_local_roots_are_absolute_in_the_settings_key(tmp_path, monkeypatch):
    from interleaf.corpus import pipeline as P

    for d in ("a/site", "b/site"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    in_a = P.load_config({"fetch": {"local_roots": ["site"], "images_dir": "img"}})["fetch"]
    assert in_a["local_roots"] == [str(tmp_path / "a" / "site")]
    assert in_a["images_dir"] == str(tmp_path / "a" / "img")
    monkeypatch.chdir(tmp_path / "b")
    in_b = P.fetch_config({"local_roots": ["site"], "images_dir": "img"})
    assert in_b["local_roots"] == [str(tmp_path / "b" / "site")]
    assert F.settings_key(in_a) != F.settings_key(in_b)
    assert F.settings_key(P.fetch_config(in_b)) == F.settings_key(in_b)


def _outcome(r):
    return (r.ok, r.reason, r.detail, r.real_width, r.sha256, r.content_type)


def test_stored_bytes_of_private_addresses_are_not_reused_without_allow_private(server, tmp_path):
    """Bytes an allow_private run stored for http://127.1/... or a host name were taken by a
    non-private run, whose first run gives private_address."""
    assert [F.literal_ip(h) for h in ("127.1", "2130706433", "0x7f.1", "::1", "example.org")] == [
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.1",
        "::1",
        None,
    ]
    port = server.rsplit(":", 1)[1]
    urls = [f"http://{h}:{port}/ok.png" for h in ("127.1", "2130706433", "0x7f.1", "localhost")]
    wide = F.ImageFetcher(tmp_path / "img", allow_private=True)
    assert all(wide.fetch(u).ok for u in urls)
    for u in urls:
        again = F.ImageFetcher(tmp_path / "img").fetch(u)
        first = F.ImageFetcher(tmp_path / f"fresh-{len(u)}").fetch(u)
        assert again.reason == "private_address" and _outcome(again) == _outcome(first), u
    # and an allow_private rerun still reuses them (no new request), exactly as it fetched them
    n = COUNTS["/ok.png"]
    assert _outcome(wide.fetch(urls[0])) == _outcome(
        F.ImageFetcher(tmp_path / "fresh", allow_private=True).fetch(urls[0])
    )
    assert COUNTS["/ok.png"] == n + 1  # the fresh store's request only


def test_stored_bytes_follow_the_offline_sources(server, tmp_path):
    """Changed offline sources gave the old stored bytes (width 300 where a first run gives 100)."""
    url = f"{server}/ok.png"
    small = _png(100, 100, 7)
    for sources in ({url: PNG}, {url: small}, None, {url: small}, {url: PNG}):
        got = F.ImageFetcher(tmp_path / "img", allow_private=True, sources=sources).fetch(url)
        first = F.ImageFetcher(tmp_path / "fresh", allow_private=True, sources=sources).fetch(url)
        F.shutil.rmtree(tmp_path / "fresh")
        assert _outcome(got) == _outcome(first)
        assert got.real_width == (100 if sources and sources[url] == small else 300)
        assert F.Path(got.bytes_path).read_bytes() == (sources or {url: PNG})[url]
    # bytes stored from sources are not taken for downloaded ones by a run without the sources
    F.ImageFetcher(tmp_path / "img2", sources={url: small}).fetch(url)
    assert F.ImageFetcher(tmp_path / "img2").fetch(url).reason == "private_address"
    # a kill between the record and the bytes leaves nothing reusable
    f = F.ImageFetcher(tmp_path / "img3", allow_private=True)
    assert f.fetch(url).real_width == 300
    f.path_for(url).write_bytes(small)  # bytes that the record does not describe
    assert f.fetch(url).real_width == 300


def test_offline_sources_never_reach_the_network(server, tmp_path):
    """With offline sources (``fetch-images --from-sample``) a URL they lack is not downloaded: it
    fails as not_in_sources, and bytes an earlier online run stored for it are not reused."""
    served, missing = f"{server}/ok.png", f"{server}/moved"
    online = F.ImageFetcher(tmp_path / "img", allow_private=True)
    assert online.fetch(missing).ok  # stored from the network
    before = dict(COUNTS)
    offline = F.ImageFetcher(tmp_path / "img", allow_private=True, sources={served: PNG})
    got = offline.fetch_many([served, missing])
    assert got[served].ok and got[served].real_width == 300
    assert not got[missing].ok and got[missing].reason == "not_in_sources" and got[missing].attempts == 1
    assert COUNTS == before  # no request reached the server


def test_a_local_root_that_is_no_folder_is_refused(tmp_path, capsys):
    # '--local-root nonexist' succeeded, every local image refused without a word (a typo)
    from interleaf.cli import main
    from interleaf.corpus import pipeline as P
    from interleaf.errors import ConfigError

    site = tmp_path / "site"
    _local_site(site, n=2)
    built = _built(tmp_path, [site])
    before = _state(built)
    missing, a_file = tmp_path / "nonexist", site / "p0.html"
    for root in (missing, a_file):
        assert main(["corpus", "fetch-images", str(built), "--local-root", str(root), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: pipeline config: local root {root} ('fetch.local_roots', --local-root) "
            "is not an existing folder"
        )
        assert _state(built) == before  # nothing rewritten
    # a config's roots are checked where they are used: by fetch-images, or a build that fetches
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"fetch: {{enabled: true, local_roots: ['{missing}']}}\n")
    with pytest.raises(ConfigError, match=rf"p\.yaml: local root {missing} "):
        P.load_config(cfg)
    assert P.load_config({"fetch": {"local_roots": [str(missing)]}})  # not fetching: not used
    assert main(["corpus", "fetch-images", str(built), "--local-root", str(site), "--no-progress"]) == 0


def test_local_root_flag_replaces_a_fetching_configs_missing_roots(tmp_path, capsys):
    # --local-root replaces the config's fetch.local_roots: a config that fetches (the build's)
    # naming a root of another machine was refused although the flag gave the root to use
    from interleaf.cli import main

    site = tmp_path / "site"
    _local_site(site, n=2)
    built = _built(tmp_path, [site])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"fetch: {{enabled: true, local_roots: ['{tmp_path / 'elsewhere'}']}}\n")
    args = ["corpus", "fetch-images", str(built), "--config", str(cfg), "--no-progress"]
    assert main([*args, "--local-root", str(site)]) == 0, capsys.readouterr().err
    assert main(args) == 1  # without the flag the config's root is used, and refused
    err = capsys.readouterr().err
    assert "elsewhere ('fetch.local_roots', --local-root) is not an existing folder" in err


def test_hashes_of_a_palette_image_with_transparency_are_quiet_and_unchanged():
    import warnings

    a = Image.open(io.BytesIO(_png(120, 80, 3))).quantize(16)
    buf = io.BytesIO()
    a.save(buf, "PNG", transparency=bytes([0, 128, 255]))  # per-entry alpha: PIL warns on P -> L
    p = Image.open(io.BytesIO(buf.getvalue()))
    p.load()
    assert p.mode == "P" and isinstance(p.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's 'Palette images with Transparency' UserWarning
        hashes = F.p_hash(p), F.d_hash(p)
    rgba = p.convert("RGBA")  # the same grey values as PIL's direct P -> L conversion
    assert hashes == (F.p_hash(rgba), F.d_hash(rgba))
