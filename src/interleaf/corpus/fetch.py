"""Optional image fetching and pixel-level filters (OmniCorpus stage 4).

``ImageFetcher`` downloads image URLs concurrently (threads), each with a time limit, a size cap,
a content-type check and retries on transient failures; the bytes are stored under
``sha256(url)`` with a record of how they were obtained (downloaded bytes are reused when the
fetcher's settings would download them the same way, which makes a re-run cheap and resumable;
offline sources and local files are read again) and every failure is returned with its reason. Addresses are checked after DNS resolution and the
connection is pinned to the checked address (no DNS-rebinding window): private, loopback,
link-local, multicast and reserved addresses are refused unless ``allow_private=True``. ``file://``
URLs and local paths work offline, but only under ``local_roots`` (or with ``allow_private``):
a crawled page must never make the fetcher read local files.

``fetch_corpus(OUT)`` runs on a built corpus: fetch every image of every shard, add
``real_width, real_height, sha256, p_hash, d_hash, bytes_path`` to the image metadata, then apply
the pixel filters with the published defaults: failed downloads removed; width or height < 150 px;
aspect ratio outside [0.5, 2] (MMC4, OmniCorpus); perceptual duplicates: a repeat of the same
pHash inside a document, and images whose pHash occurs in more than 10 documents of the corpus
(OmniCorpus: pHash + dHash). Documents left without images are excluded (OmniCorpus keeps only
documents with images). It computes from a kept copy of the pre-fetch shards, with per-shard
markers keyed by its settings: resumable, and a rerun with other settings redoes the work.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import json
import os
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

USER_AGENT = "interleaf-corpus/0.1 (+https://github.com/interleaf; image fetcher)"
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class FetchResult:
    """The outcome for one URL. ``ok`` False: ``reason`` says why (``timeout``, ``http_404``...)."""

    url: str
    ok: bool
    reason: str = ""
    detail: str = ""
    bytes_path: str | None = None
    content_type: str | None = None
    size: int = 0
    sha256: str | None = None
    real_width: int | None = None
    real_height: int | None = None
    p_hash: str | None = None
    d_hash: str | None = None
    attempts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = "", transient: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient = reason, detail, transient


# ---------------------------------------------------------------------------------------------
# perceptual hashes


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def _bits_to_hex(bits: np.ndarray) -> str:
    v = 0
    for b in bits.flatten().tolist():
        v = (v << 1) | int(b)
    return f"{v:016x}"


def p_hash(img) -> str:
    """64-bit DCT perceptual hash (hex): 32x32 grey, 2-D DCT, low 8x8 block vs its median."""
    from PIL import Image

    g = np.asarray(_grey(img).resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _DCT32 @ g @ _DCT32.T
    low = d[:8, :8]
    return _bits_to_hex(low > np.median(low))


def d_hash(img) -> str:
    """64-bit difference hash (hex): 9x8 grey, each pixel brighter than its right neighbour."""
    from PIL import Image

    g = np.asarray(_grey(img).resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int32)
    return _bits_to_hex(g[:, 1:] > g[:, :-1])


def _grey(img):
    """``img`` in L. A palette image with transparency goes through RGBA (same grey values), as
    ``processing.image.to_rgb`` does: PIL's direct conversion warns on stderr for each such image.
    (Not imported from there: that package pulls in torch, which the corpus never needs.)"""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("L")


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


# ---------------------------------------------------------------------------------------------
# the fetcher


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def address_allowed(ip: str) -> bool:
    """False for private, loopback, link-local, multicast, reserved and unspecified addresses."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def literal_ip(host: str) -> str | None:
    """The address ``host`` names when it is an address literal in any form the network stack
    takes (``127.1``, ``2130706433``, ``0x7f.1`` are 127.0.0.1, as ``inet_aton`` reads them);
    None for a host name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class ImageFetcher:
    """Concurrent, bounded, address-checked image downloader storing bytes by ``sha256(url)``."""

    store_dir: str | Path
    timeout_s: float = 10.0
    max_bytes: int = 20_000_000
    retries: int = 2
    concurrency: int = 16
    allow_private: bool = False
    local_roots: list[str] = field(default_factory=list)
    backoff_s: float = 0.2
    max_redirects: int = 5
    # offline {url: bytes} (e.g. a WARC's image records); when given, the network is not used: other
    # http(s) URLs fail as ``not_in_sources`` (local files are still read)
    sources: dict[str, bytes] | None = None

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._roots = [Path(r).resolve() for r in self.local_roots]

    # -- storage ---------------------------------------------------------------------------
    def path_for(self, url: str) -> Path:
        h = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.store_dir / h[:2] / h

    def _store(self, url: str, data: bytes, how: dict | None = None) -> Path:
        """Store ``data`` for ``url`` with ``how`` it was obtained (``_reusable`` reads it): the
        record, written first, names the bytes' sha256, so a kill between the two writes leaves
        a record that matches no bytes and nothing reusable."""
        p = self.path_for(url)
        p.parent.mkdir(parents=True, exist_ok=True)
        if how is not None:
            how = how | {"sha256": hashlib.sha256(data).hexdigest()}
            if self._how(p) != how:
                self._write(self._how_path(p), json.dumps(how, sort_keys=True).encode())
        if not (p.exists() and p.stat().st_size == len(data) and p.read_bytes() == data):
            self._write(p, data)
        return p

    def _write(self, p: Path, data: bytes) -> None:
        # temporaries live in one folder, named by process, so that clean_tmp finds a killed run's
        tmp_dir = self.store_dir / ".tmp"
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / f"{os.getpid()}-{threading.get_ident()}-{p.name}"
        tmp.write_bytes(data)
        os.replace(tmp, p)

    @staticmethod
    def _how_path(p: Path) -> Path:
        return p.with_name(p.name + ".json")

    def _how(self, p: Path) -> dict | None:
        try:
            return json.loads(self._how_path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def clean_tmp(self) -> None:
        """Remove the temporaries of fetchers that died (a live process may share the store)."""
        tmp_dir = self.store_dir / ".tmp"
        if not tmp_dir.is_dir():
            return
        for p in tmp_dir.iterdir():
            pid = p.name.split("-", 1)[0]
            if not pid.isdigit() or not _alive(int(pid)):
                p.unlink(missing_ok=True)

    # -- one URL ---------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """Fetch (or reuse) one URL; never raises."""
        res = FetchResult(url=url, ok=False)
        stored = self.path_for(url)
        try:
            reused = self._reusable(url, stored)
            if reused is not None:
                data, ctype, how = reused, (self._how(stored) or {}).get("content_type"), None
            else:
                data, ctype, how = self._download_with_retries(url, res)
            self._describe(res, data, ctype)
            if how is not None:
                self._store(url, data, how)
            res.bytes_path = str(stored)
            res.ok = True
        except FetchError as exc:
            res.reason, res.detail = exc.reason, exc.detail[:300]
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none is fatal
            res.reason, res.detail = f"error:{type(exc).__name__}", str(exc)[:300]
        return res

    def _reusable(self, url: str, stored: Path) -> bytes | None:
        """The stored bytes of ``url`` when this fetcher's first run would obtain the same, else
        None (obtain them again). Offline sources and local files are always read again (cheap, and
        they may have changed); downloaded bytes are reused when they were downloaded (the record
        written with them says so, for these very bytes) from addresses this fetcher may reach.
        Bytes stored without a record (older versions) are reused only with ``allow_private``."""
        if self.sources is not None:  # offline: nothing downloaded earlier counts
            return None
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not stored.exists():
            return None
        if not self.allow_private:  # an address literal, in any form the network stack takes
            host = parsed.hostname or ""
            ip = literal_ip(host)
            if ip is not None and not address_allowed(ip):
                raise FetchError("private_address", f"{host} -> {ip}")
        how = self._how(stored)
        if how is None and not self.allow_private:
            return None
        if how is not None and how.get("via") != "network":
            return None
        if stored.stat().st_size > self.max_bytes:
            raise FetchError("too_large", f"{stored.stat().st_size} bytes")
        data = stored.read_bytes()
        if how is not None:
            if how.get("sha256") != hashlib.sha256(data).hexdigest():
                return None  # a kill between the record and the bytes
            if how.get("private") and not self.allow_private:
                raise FetchError("private_address", how["private"])
        return data

    def _download_with_retries(self, url: str, res: FetchResult) -> tuple[bytes, str | None, dict]:
        last: FetchError | None = None
        for attempt in range(self.retries + 1):
            res.attempts = attempt + 1
            try:
                return self._download(url)
            except FetchError as exc:
                last = exc
                if not exc.transient or attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * (2**attempt))
        raise last  # pragma: no cover

    def _download(self, url: str) -> tuple[bytes, str | None, dict]:
        """The bytes, their content type, and how they were obtained (stored with them)."""
        if self.sources is not None and url in self.sources:
            return self.sources[url], None, {"via": "source"}
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme in ("", "file"):
            path = urllib.parse.unquote(parsed.path) if parsed.scheme else url
            return self._read_local(path), None, {"via": "local"}
        if parsed.scheme not in ("http", "https"):
            raise FetchError("unsupported_scheme", parsed.scheme)
        if self.sources is not None:
            raise FetchError("not_in_sources", "offline: the network is not used")
        private = None  # the first private address on the way (allow_private only)
        for _ in range(self.max_redirects + 1):
            status, headers, body, bad = self._http_get(url)
            private = private or bad
            if status in (301, 302, 303, 307, 308):
                loc = headers.get("location")
                if not loc:
                    raise FetchError(f"http_{status}", "redirect without Location")
                url = urllib.parse.urljoin(url, loc)
                if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                    raise FetchError("unsupported_scheme", "redirect to non-HTTP URL")
                continue
            if status != 200:
                raise FetchError(f"http_{status}", "", transient=status in _TRANSIENT)
            ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise FetchError("bad_content_type", ctype or "(none)")
            return body, ctype, {"via": "network", "private": private, "content_type": ctype}
        raise FetchError("too_many_redirects", url)

    def _local_path(self, path: str) -> Path:
        p = Path(path).resolve()
        if not self.allow_private and not any(p.is_relative_to(r) for r in self._roots):
            raise FetchError("local_file_refused", f"{p} is outside local_roots")
        return p

    def _read_local(self, path: str) -> bytes:
        p = self._local_path(path)
        if not p.is_file():
            raise FetchError("not_found", str(p))
        if p.stat().st_size > self.max_bytes:
            raise FetchError("too_large", f"{p.stat().st_size} bytes")
        return p.read_bytes()

    def _http_get(self, url: str) -> tuple[int, dict[str, str], bytes, str | None]:
        """Status, headers, body, and ``'HOST -> IP'`` when an address was private (else None)."""
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname
        if not host:
            raise FetchError("bad_url", url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        deadline = time.monotonic() + self.timeout_s
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchError("dns_error", str(exc), transient=False) from None
        ips = [i[4][0] for i in infos]
        bad = [ip for ip in ips if not address_allowed(ip)]
        private = f"{host} -> {bad[0]}" if bad else None
        if private and not self.allow_private:
            raise FetchError("private_address", private)
        cls = _PinnedHTTPS if parsed.scheme == "https" else _PinnedHTTP
        conn = cls(host, port, ips[0], self.timeout_s)
        path = parsed.path or "/"
        if parsed.query:
            path += "?" + parsed.query
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status != 200:
                return resp.status, headers, b"", private
            ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise FetchError("bad_content_type", ctype or "(none)")
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise FetchError("too_large", f"Content-Length {length}")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"body not complete within {self.timeout_s:g} s", True)
                chunk = resp.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_bytes:
                    raise FetchError("too_large", f"> {self.max_bytes} bytes")
                chunks.append(chunk)
            return resp.status, headers, b"".join(chunks), private
        except TimeoutError as exc:
            raise FetchError("timeout", str(exc) or f"{self.timeout_s:g} s", transient=True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise FetchError("connection_error", f"{type(exc).__name__}: {exc}", transient=True) from None
        finally:
            conn.close()

    @staticmethod
    def _describe(res: FetchResult, data: bytes, ctype: str | None) -> None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                res.real_width, res.real_height = img.size
                res.p_hash, res.d_hash = p_hash(img), d_hash(img)
                fmt = (img.format or "").lower()
        except Exception as exc:  # noqa: BLE001 - not an image
            raise FetchError("undecodable", f"{type(exc).__name__}: {exc}") from None
        res.content_type = ctype or (f"image/{fmt}" if fmt else None)
        res.size = len(data)
        res.sha256 = hashlib.sha256(data).hexdigest()

    # -- many URLs -------------------------------------------------------------------------
    def fetch_many(self, urls: Iterable[str], progress: bool = False) -> dict[str, FetchResult]:
        """Fetch distinct ``urls`` concurrently; returns ``{url: FetchResult}``."""
        uniq = list(dict.fromkeys(urls))
        out: dict[str, FetchResult] = {}
        if not uniq:
            return out
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            bar = tqdm(total=len(uniq), desc="fetch", unit="img", disable=not progress, leave=False)
            for res in pool.map(self.fetch, uniq):
                out[res.url] = res
                bar.update(1)
            bar.close()
        return out


# ---------------------------------------------------------------------------------------------
# pixel filters over a corpus


def pixel_verdict(res: FetchResult, cfg: dict) -> str | None:
    """Why an image node is removed after fetching (None: kept)."""
    if not res.ok:
        return f"fetch:{res.reason}" if cfg.get("drop_failed", True) else None
    w, h = res.real_width or 0, res.real_height or 0
    if min(w, h) < int(cfg.get("min_side", 150)):
        return "too_small"
    aspect = w / h if h else 0.0
    if aspect < float(cfg.get("min_aspect", 0.5)) or aspect > float(cfg.get("max_aspect", 2.0)):
        return "aspect_ratio"
    return None


# fetch settings that do not change the stage's output: a rerun with other values reuses the work
_NO_OUTPUT_EFFECT = ("enabled", "concurrency")


def settings_key(fc: dict, sources: dict[str, bytes] | None = None) -> str:
    """Hash of what the fetch stage's output depends on: its settings (fetcher and pixel filters)
    and the offline sources' URLs and bytes."""
    relevant: dict[str, Any] = {k: v for k, v in fc.items() if k not in _NO_OUTPUT_EFFECT}
    if sources is not None:
        h = hashlib.sha256()
        for url in sorted(sources):
            h.update(url.encode("utf-8") + b"\0" + hashlib.sha256(sources[url]).digest())
        relevant["sources"] = h.hexdigest()
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fetch_corpus(
    out: str | Path,
    cfg: dict | None = None,
    progress: bool = True,
    sources: dict[str, bytes] | None = None,
) -> dict:
    """Fetch the images of a built corpus in ``OUT`` and apply the pixel filters (resumable).

    ``cfg``: the ``fetch`` section of the pipeline config (defaults from ``pipeline.DEFAULTS``).
    Returns the updated ``stats.json`` content.

    The stage never reads what it writes: the pre-fetch shards are kept (hard links) under
    ``_work/fetch/input`` before the first rewrite, and every pass computes from them. Its state
    (per-shard fetch results, pHash counts, done markers) lives in ``_work/fetch/run-KEY``, KEY a
    hash of the settings (``settings_key``): a rerun with the same settings resumes, one with
    other settings starts over from the kept input, and both end as a first run would.
    """
    from interleaf.corpus import engine as E
    from interleaf.corpus import pipeline as P
    from interleaf.errors import InputError

    out = Path(out)
    stats = E.load_stats(out)
    fc = P.fetch_config(cfg)  # types checked (a string local_roots is no list of roots), paths absolute
    fmt = stats.get("format", "parquet")
    shards = int(stats["shards"])
    root = out / E.WORK / "fetch"
    parts = E.data_shards(out, stats)  # a lost shard is an error, not 0 documents
    if (root / "phash_common.json").exists():
        raise InputError(
            f"{out}: images were fetched by an older interleaf, which rewrote the shards in place; "
            "build the corpus again to fetch its images"
        )
    inputs, work = root / "input", root / f"run-{settings_key(fc, sources)}"
    for d in (root, inputs, out / "data", out / "excluded"):
        d.mkdir(parents=True, exist_ok=True)
        E.clean_tmp(d)
    for name in parts:  # before anything is rewritten
        _preserve(out / "data" / name, inputs / name)
    for old in root.iterdir():  # the state of other settings describes shards no longer there
        if old.is_dir() and old.name.startswith("run-") and old != work:
            stale = old.with_name(f"{old.name}.tmp-stale")
            os.replace(old, stale)
            shutil.rmtree(stale, ignore_errors=True)
    for legacy in root.glob("s-*.results.jsonl"):  # an older version's pass 1: shards untouched
        legacy.unlink()
    work.mkdir(exist_ok=True)
    E.clean_tmp(work)
    if not (work / "settings.json").exists():  # for people: what this state was computed with
        E.atomic_write(work / "settings.json", json.dumps(fc, indent=1, sort_keys=True, default=str))
    fetcher = ImageFetcher(
        store_dir=fc.get("images_dir") or out / "images",
        timeout_s=float(fc["timeout_s"]),
        max_bytes=int(fc["max_bytes"]),
        retries=int(fc["retries"]),
        concurrency=int(fc["concurrency"]),
        allow_private=bool(fc["allow_private"]),
        local_roots=list(fc["local_roots"]),
        sources=sources,
    )
    fetcher.clean_tmp()
    # pass 1 (per shard, resumable): fetch and record each image's result
    for s, name in enumerate(parts):
        log = work / f"{E.shard_name(s)}.results.jsonl"
        if log.exists():
            continue
        docs = read_docs(inputs / name)
        results = fetcher.fetch_many((u for d in docs for u in d.image_urls), progress=progress)
        E.atomic_write(log, E.jsonl(r.to_dict() for r in results.values()))
    # pass 2 (global, computed once and kept so that a resumed run decides the same way):
    # in how many documents does each pHash occur (among images passing the per-image rules)
    common_path = work / "phash_common.json"
    if common_path.exists():
        too_common = set(json.loads(common_path.read_text(encoding="utf-8")))
    else:
        phash_docs: Counter = Counter()
        for s, name in enumerate(parts):
            res = _load_results(work, s)
            for d in read_docs(inputs / name):
                hs = {res[u].p_hash for u in d.image_urls if u in res and pixel_verdict(res[u], fc) is None}
                phash_docs.update(hs)
        too_common = {h for h, c in phash_docs.items() if c > int(fc["max_phash_occurrences"])}
        E.atomic_write(common_path, json.dumps(sorted(too_common)))
    # pass 3 (per shard, resumable): rewrite the shard with metadata and the filters applied;
    # each file is renamed into place, the done marker last, so a kill anywhere redoes the shard
    book = E.StatsBook()
    for s, name in enumerate(parts):
        done = work / f"{E.shard_name(s)}.done.json"
        if done.exists():
            book.merge(E.StatsBook.from_list(json.loads(done.read_text())["stats"]))
            continue
        docs = read_docs(inputs / name)
        st, kept_docs, excluded = _filter_shard(out, s, docs, _load_results(work, s), too_common, fc)
        E.write_documents(out / "data" / name, kept_docs, fmt, stats.get("layout", "obelics"))
        E.atomic_write(out / "excluded" / f"fetch-{s:05d}.jsonl", E.jsonl(excluded))
        shard_book = E.StatsBook()
        shard_book.add(st)
        E.atomic_write(done, json.dumps({"stats": shard_book.to_list(), "excluded": len(excluded)}))
        book.merge(shard_book)
    return _update_stats(out, stats, book, work, shards)


def _preserve(src: Path, dst: Path) -> None:
    """Keep the pre-fetch shard ``src`` as ``dst``, once, atomically."""
    if dst.exists() or not src.exists():
        return
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # no copy needed: every writer replaces a shard by rename, never in place
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _filter_shard(
    out: Path, s: int, docs: list, res: dict[str, FetchResult], too_common: set[str], fc: dict
) -> tuple[Any, list, list[dict]]:
    """Shard ``s`` with the fetch metadata added and the pixel filters applied.

    Returns its ``StepStats``, the documents kept and the exclusion records."""
    from interleaf.corpus.base import StepStats

    st = StepStats(name="fetch")
    kept_docs, excluded = [], []
    for j, d in enumerate(docs):
        n_img = d.n_images
        st.docs_in += 1
        st.images_in += n_img
        d = d.copy()
        keep, seen, removed = [], set(), Counter()
        for x, m in zip(d.images, d.metadata):
            if x is None:
                keep.append(True)
                continue
            r = res.get(x) or FetchResult(url=x, ok=False, reason="not_fetched")
            why = pixel_verdict(r, fc)
            if why is None and r.p_hash in seen:
                why = "phash_duplicate_in_document"
            if why is None and r.p_hash in too_common:
                why = "phash_frequent"
            if r.ok:
                m.update(
                    real_width=r.real_width,
                    real_height=r.real_height,
                    sha256=r.sha256,
                    p_hash=r.p_hash,
                    d_hash=r.d_hash,
                    bytes_path=os.path.relpath(r.bytes_path, out),
                )
            if why is not None:
                removed[why] += 1
                keep.append(False)
            else:
                seen.add(r.p_hash)
                keep.append(True)
        d = d.select(keep)
        if fc["drop_documents_without_images"] and d.n_images == 0 and n_img > 0:
            # all its images failed: the document goes, its images count as in a dropped doc
            st.excluded_by_reason["no_images_after_fetch"] += 1
            st.images_in_dropped_docs += n_img
            excluded.append(
                {
                    "id": d.id,
                    "url": d.url,
                    "shard": s,
                    "index": j,
                    "stage": "fetch",
                    "reason": "no_images_after_fetch",
                    "detail": ", ".join(f"{k}={v}" for k, v in sorted(removed.items())),
                }
            )
            continue
        st.images_removed_by_reason.update(removed)
        st.docs_out += 1
        st.images_out += d.n_images
        kept_docs.append(d)
    return st, kept_docs, excluded


def read_docs(path: Path) -> list:
    """The documents of one shard file (JSONL or Parquet) in order; none when it does not exist."""
    from interleaf.corpus.document import Document

    if not path.exists():
        return []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [Document.from_row(json.loads(line)) for line in f if line.strip()]
    from interleaf.corpus.formats import read_parquet_documents

    return list(read_parquet_documents(str(path)))


def _load_results(work: Path, s: int) -> dict[str, FetchResult]:
    from interleaf.corpus import engine as E

    out = {}
    for d in E.read_jsonl(work / f"{E.shard_name(s)}.results.jsonl"):
        out[d["url"]] = FetchResult(**d)
    return out


def _update_stats(out: Path, stats: dict, book, work: Path, shards: int) -> dict:
    from interleaf.corpus import engine as E

    fetch = book.get("fetch").to_dict()
    stats["stages"] = [s for s in stats["stages"] if s["name"] != "fetch"] + [fetch]
    excluded_fetch = sum(
        json.loads((work / f"{E.shard_name(s)}.done.json").read_text())["excluded"] for s in range(shards)
    )
    base_excluded = stats.get("excluded_before_fetch", stats["excluded"])
    base_out = stats.get("docs_out_before_fetch", stats["docs_out"])
    stats["excluded_before_fetch"], stats["docs_out_before_fetch"] = base_excluded, base_out
    stats["excluded"] = base_excluded + excluded_fetch
    stats["docs_out"] = base_out - excluded_fetch
    stats["images_out"] = fetch["images_out"]
    stats["balanced"] = stats["records_in"] == stats["docs_out"] + stats["excluded"] + stats["errors"]
    E.atomic_write(out / "stats.json", json.dumps(stats, indent=1))
    return stats
