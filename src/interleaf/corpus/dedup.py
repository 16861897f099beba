"""Corpus-level deduplication: MinHash LSH near-duplicates, exact URLs, over-frequent image URLs.

All three are *global* decisions computed from small per-document keys, so that the expensive
part (shingling and MinHash signatures) runs in parallel per shard, on local worker processes or
Ray tasks, and only compact arrays are merged:

1. per shard: ``MinHasher.signatures(texts)`` -> ``uint32 [n_docs, num_perm]`` and
   ``band_keys(sigs)`` -> ``uint64 [n_docs, num_bands]`` (one key per LSH band);
2. per band (any worker): ``band_edges(keys_of_all_shards[:, band], sigs)`` -> candidate pairs
   of documents that share that band's bucket (verified against the estimated Jaccard);
3. driver: ``UnionFind`` over the edges of all bands -> clusters; in each cluster the document
   with the latest crawl date is kept (ties: the earliest in input order, so results never depend
   on scheduling).

MinHash. Documents are normalised (lower case, web separators as spaces; words = runs of ASCII
letters/digits/_ and non-ASCII characters), shingled into word 5-grams (OmniCorpus/datatrove use
5-grams) and each shingle hashed to 64 bits -- tokenising and hashing run on the UTF-8 bytes of
hundreds of documents at once with numpy (polynomial prefix hashes per word, odd-multiplier
combination per shingle). ``num_perm`` permutations are simulated with
multiply-shift hashing ``h_p(x) = ((a_p * x + b_p) mod 2^64) >> 32`` -- numpy-vectorised over all
shingles of a batch of documents at once (``np.minimum.reduceat`` per document).

LSH S-curve. With ``b`` bands of ``r`` rows, two documents of Jaccard similarity ``s`` share at
least one bucket with probability ``P(s) = 1 - (1 - s^r)^b``. The defaults ``b=16, r=7``
(112 permutations, like datatrove's 14x8) put the curve's midpoint at ``(1/b)^(1/r) = 0.67``,
below the 0.8 target, so recall at the threshold is high, and every candidate pair is then
*verified* (estimated Jaccard = fraction of equal signature entries >= ``threshold``), which
removes the false positives the low midpoint lets in::

    s      0.5    0.6    0.7    0.8    0.9    0.95
    P(s)   0.118  0.364  0.738  0.977  0.99998 ~1

Bands and rows left unset are chosen for the threshold (``lsh_layout``): of the ways to split the
112 hashes into ``b x r``, the one with the fewest expected false positives + false negatives
(areas under / above the S-curve on each side of the threshold, datasketch's criterion) among
those that catch a pair *at* the threshold with probability >= 0.95 -- verification removes
false positives, nothing brings missed pairs back. At 0.8 that is 16 x 7; at 0.5, 56 x 2.

Exact URL dedup keeps, per URL, the document with the latest crawl date (OBELICS keeps the most
recent crawl). Image URL frequency: OBELICS/OmniCorpus remove images whose URL occurs more than
10 times across the corpus (logos, banners, tracking pixels); every occurrence in a kept
document counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1
# odd 64-bit constants combining the hashes of the n words of a shingle (one per position)
_SHINGLE_MULT = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0x27D4EB2F165667C5,
        0x94D049BB133111EB,
        0xBF58476D1CE4E5B9,
        0x85EBCA77C2B2AE63,
    ],
    dtype=np.uint64,
)


DEFAULT_NUM_PERM = 112  # hashes per signature: 16 bands x 7 rows, the layout chosen for 0.8
LSH_MIN_RECALL = 0.95  # a chosen layout catches a pair at the threshold at least this often


@dataclass
class MinHashConfig:
    """MinHash LSH parameters (defaults: word 5-grams, Jaccard 0.8, 16 bands x 7 rows).

    ``num_bands`` and ``rows_per_band`` both None (the default): ``lsh_layout(threshold)``; one of
    them None: that one takes its default (16 bands, 7 rows).
    """

    n_grams: int = 5
    num_bands: int | None = None
    rows_per_band: int | None = None
    threshold: float = 0.8
    seed: int = 1
    verify: bool = True  # check candidates' estimated Jaccard >= threshold before merging

    def __post_init__(self) -> None:
        if self.num_bands is None and self.rows_per_band is None:
            self.num_bands, self.rows_per_band = lsh_layout(self.threshold)
        if self.num_bands is None:
            self.num_bands = 16
        if self.rows_per_band is None:
            self.rows_per_band = 7

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band

    @property
    def recall_at_threshold(self) -> float:
        """Probability that a pair of Jaccard exactly ``threshold`` becomes a candidate."""
        return float(s_curve(self.threshold, self.num_bands, self.rows_per_band))


def s_curve(s: float | np.ndarray, num_bands: int, rows_per_band: int) -> float | np.ndarray:
    """Probability that two documents of Jaccard ``s`` become LSH candidates."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows_per_band) ** num_bands


def lsh_layout(
    threshold: float, num_perm: int = DEFAULT_NUM_PERM, min_recall: float = LSH_MIN_RECALL
) -> tuple[int, int]:
    """``(num_bands, rows_per_band)`` with ``b * r == num_perm`` for a Jaccard ``threshold``.

    Among the layouts whose probability of catching a pair at the threshold is >= ``min_recall``,
    the one minimising the false-positive area (``P(s)`` for ``s < threshold``) plus the
    false-negative area (``1 - P(s)`` above it); when none reaches ``min_recall``, the one with
    the highest recall there.
    """
    t = float(threshold)
    lo = np.linspace(0.0, t, 201)
    hi = np.linspace(t, 1.0, 201)
    best: tuple[float, int, int] | None = None
    fallback: tuple[float, int, int] | None = None
    for b in range(1, num_perm + 1):
        if num_perm % b:
            continue
        r = num_perm // b
        recall = float(s_curve(t, b, r))
        if fallback is None or recall > fallback[0]:
            fallback = (recall, b, r)
        if recall < min_recall:
            continue
        # areas: the curve's mean on an even grid times the interval's length
        fp = float(np.mean(s_curve(lo, b, r))) * t
        fn = float(np.mean(1.0 - s_curve(hi, b, r))) * (1.0 - t)
        if best is None or fp + fn < best[0]:
            best = (fp + fn, b, r)
    chosen = best or fallback
    return chosen[1], chosen[2]


# Words are maximal runs of ASCII letters, digits, "_" and non-ASCII characters, after lower
# casing and after mapping the common non-ASCII spaces and punctuation of web text to spaces. This
# definition lets the tokenizer run on raw UTF-8 bytes with numpy (``batch_shingle_hashes``);
# ``words`` is the same definition as a regex, the reference for tests.
_SEPARATORS = dict.fromkeys(
    map(
        ord,
        "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
        "\u200b\u2028\u2029\u202f\u205f\u3000\ufeff\u2010\u2011\u2012\u2013\u2014\u2015"
        "\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2022\u2026\u00ab\u00bb\u00b7"
        "\u3001\u3002\uff0c\uff0e\uff01\uff1f\uff1a\uff1b",
    ),
    " ",
)
_WORD_RE = re.compile(r"[0-9a-z_\u0080-\U0010ffff]+")
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[list(b"0123456789abcdefghijklmnopqrstuvwxyz_")] = True
_WORD_BYTE[128:] = True  # UTF-8 bytes of non-ASCII characters
_POLY = 0x100000001B3  # odd: invertible modulo 2^64


def _inverse64(a: int) -> int:
    x = a
    for _ in range(6):  # Newton iteration doubles the correct low bits each step
        x = (x * (2 - a * x)) & _MASK64
    return x


_POLY_INV = _inverse64(_POLY)
_POW = np.ones(1, dtype=np.uint64)
_IPOW = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``POLY^i`` and ``POLY^-i`` mod 2^64 for ``i < n`` (cached, grown by doubling)."""
    global _POW, _IPOW
    if len(_POW) < n:
        m = max(n, 2 * len(_POW))
        one = np.ones(1, dtype=np.uint64)
        with np.errstate(over="ignore"):  # uint64 products wrap: arithmetic modulo 2^64
            _POW = np.concatenate([one, np.cumprod(np.full(m - 1, _POLY, dtype=np.uint64), dtype=np.uint64)])
            _IPOW = np.concatenate(
                [one, np.cumprod(np.full(m - 1, _POLY_INV, dtype=np.uint64), dtype=np.uint64)]
            )
    return _POW[:n], _IPOW[:n]


def normalise(text: str) -> str:
    """Lower case, common web separators (no-break space, dashes, quotes...) as spaces."""
    return text.lower().translate(_SEPARATORS)


def words(text: str) -> list[str]:
    """Normalised words of ``text`` (the regex form of the tokenizer ``batch_shingle_hashes`` runs)."""
    return _WORD_RE.findall(normalise(text))


def _mix(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


def batch_shingle_hashes(texts: Sequence[str], n_grams: int = 5) -> list[np.ndarray]:
    """Distinct word-``n_grams`` shingle hashes (``uint64``) of each text, all texts at once.

    The texts are joined (with a separator) into one UTF-8 byte array; word boundaries come from a
    byte mask, each word's hash from prefix sums of a polynomial hash (so equal words hash equally
    wherever they are), shingles combine ``n_grams`` consecutive word hashes of the same text. A
    text with fewer words than ``n_grams`` is one shingle; a text without words has none.
    """
    if not texts:
        return []
    parts = [normalise(t).encode("utf-8") for t in texts]
    starts_b = np.zeros(len(parts), dtype=np.int64)
    np.cumsum([len(x) + 1 for x in parts[:-1]], out=starts_b[1:])
    buf = np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    empty = np.zeros(0, dtype=np.uint64)
    if len(buf) == 0:
        return [empty for _ in texts]
    mask = _WORD_BYTE[buf]
    edge = np.diff(mask.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    ws = np.flatnonzero(edge == 1)
    we = np.flatnonzero(edge == -1)
    if len(ws) == 0:
        return [empty for _ in texts]
    pw, ipw = _powers(len(buf) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(buf) + 1, dtype=np.uint64)
        np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * pw[: len(buf)], out=prefix[1:])
        wh = (prefix[we] - prefix[ws]) * ipw[ws]  # hash of the word's bytes, position-free
        wh += (we - ws).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    wh = _mix(wh)
    doc = np.searchsorted(starts_b, ws, side="right") - 1  # text index of each word
    n_words = np.bincount(doc, minlength=len(texts))
    first_word = np.concatenate([[0], np.cumsum(n_words)[:-1]])
    out: list[np.ndarray] = [empty] * len(texts)
    # texts with >= n_grams words: shingles that do not cross a text boundary
    m = len(wh) - n_grams + 1
    if m > 0:
        acc = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n_grams):
                acc ^= wh[k : k + m] * _SHINGLE_MULT[k % len(_SHINGLE_MULT)]
                acc = (acc << np.uint64(13)) | (acc >> np.uint64(51))
        acc = _mix(acc)
        ok = doc[:m] == doc[n_grams - 1 :]
        sd, sh = doc[:m][ok], acc[ok]
        order = np.lexsort((sh, sd))
        sd, sh = sd[order], sh[order]
        keep = np.ones(len(sh), dtype=bool)
        keep[1:] = (sh[1:] != sh[:-1]) | (sd[1:] != sd[:-1])
        sd, sh = sd[keep], sh[keep]
        bounds = np.searchsorted(sd, np.arange(len(texts) + 1))
        for i in np.flatnonzero(n_words >= n_grams).tolist():
            out[i] = sh[bounds[i] : bounds[i + 1]]
    # short texts: one shingle of all their words
    for i in np.flatnonzero((n_words > 0) & (n_words < n_grams)).tolist():
        w = wh[first_word[i] : first_word[i] + n_words[i]]
        acc = np.zeros(1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(len(w)):
                acc ^= w[k : k + 1] * _SHINGLE_MULT[k % len(_SHINGLE_MULT)]
                acc = (acc << np.uint64(13)) | (acc >> np.uint64(51))
        out[i] = _mix(acc)
    return out


def shingle_hashes(text: str, n_grams: int = 5) -> np.ndarray:
    """64-bit hashes of the distinct word ``n_grams``-shingles of one text (``uint64 [m]``)."""
    return batch_shingle_hashes([text], n_grams)[0]


class MinHasher:
    """Vectorised MinHash signatures and LSH band keys for one ``MinHashConfig``."""

    EMPTY = np.uint32(0xFFFFFFFF)

    def __init__(self, config: MinHashConfig | None = None):
        self.config = config or MinHashConfig()
        rng = np.random.default_rng(self.config.seed)
        p = self.config.num_perm
        self._a = rng.integers(1, 2**63, size=p, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=p, dtype=np.uint64)
        self._band_mult = rng.integers(1, 2**63, size=self.config.rows_per_band, dtype=np.uint64) * np.uint64(
            2
        ) + np.uint64(1)

    def signature(self, text: str) -> np.ndarray:
        """``uint32 [num_perm]`` signature of one text (all ``0xFFFFFFFF`` if it has no words)."""
        return self.signatures([text])[0]

    def signatures(self, texts: Sequence[str], chunk: int = 4096) -> np.ndarray:
        """``uint32 [len(texts), num_perm]`` signatures.

        Documents are grouped so that one group's shingles (``<= chunk``) fit a preallocated
        ``[num_perm, chunk]`` buffer that stays in cache; the permutations run in place on it and
        ``np.minimum.reduceat`` takes each document's minimum (a single huge document is cut
        into ``chunk``-column blocks with a running minimum). Keeping the working set small is
        what makes this ~50x faster than one big broadcast.
        """
        shingles: list[np.ndarray] = []
        for i in range(0, len(texts), 512):  # tokenise a few hundred texts per vectorised pass
            shingles += batch_shingle_hashes(texts[i : i + 512], self.config.n_grams)
        return self.signatures_of_shingles(shingles, chunk)

    def signatures_of_shingles(self, shingles: Sequence[np.ndarray], chunk: int = 4096) -> np.ndarray:
        """Signatures of precomputed ``shingle_hashes`` arrays (see ``signatures``)."""
        p = self.config.num_perm
        out = np.full((len(shingles), p), self.EMPTY, dtype=np.uint32)
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[1] != chunk:
            buf = self._buf = np.empty((p, chunk), dtype=np.uint64)  # reused across calls
        a, b, shift = self._a[:, None], self._b[:, None], np.uint64(32)

        def permute(x: np.ndarray) -> np.ndarray:
            v = buf[:, : len(x)]
            with np.errstate(over="ignore"):
                np.multiply(a, x[None, :], out=v)
                np.add(v, b, out=v)
            np.right_shift(v, shift, out=v)
            return v

        group: list[int] = []
        size = 0

        def flush() -> None:
            nonlocal group, size
            if group:
                xs = [shingles[i] for i in group]
                starts = np.concatenate([[0], np.cumsum([len(x) for x in xs])[:-1]])
                v = permute(np.concatenate(xs))
                out[group] = np.minimum.reduceat(v, starts, axis=1).T
            group, size = [], 0

        for i, x in enumerate(shingles):
            n = len(x)
            if n == 0:
                continue
            if n > chunk:
                best = np.full(p, np.iinfo(np.uint64).max, dtype=np.uint64)
                for k in range(0, n, chunk):
                    np.minimum(best, permute(x[k : k + chunk]).min(axis=1), out=best)
                out[i] = best
                continue
            if size + n > chunk:
                flush()
            group.append(i)
            size += n
        flush()
        return out

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """``uint64 [n, num_bands]`` bucket key of each band of each signature."""
        n = sigs.shape[0]
        b, r = self.config.num_bands, self.config.rows_per_band
        s = sigs.reshape(n, b, r).astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (s * self._band_mult[None, None, :]).sum(axis=2, dtype=np.uint64)
            keys ^= keys >> np.uint64(31)
            keys *= np.uint64(0x94D049BB133111EB)
            keys ^= keys >> np.uint64(29)
        return keys


def has_shingles(sigs: np.ndarray) -> np.ndarray:
    """``bool [n]``: signatures of texts that had at least one word (others never match)."""
    return ~np.all(sigs == MinHasher.EMPTY, axis=1)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature entries (rows of ``sig_a`` vs ``sig_b``)."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)


def band_edges(
    keys: np.ndarray, sigs: np.ndarray | None = None, threshold: float = 0.8, valid: np.ndarray | None = None
) -> np.ndarray:
    """Candidate duplicate pairs from one band: ``int64 [k, 2]`` (global indices, first < second).

    ``keys``: ``uint64 [n]`` this band's bucket key of every document of the corpus (all shards
    concatenated in input order). Each bucket becomes a star from its first member; with ``sigs``
    an edge is kept only when the estimated Jaccard reaches ``threshold``.
    """
    n = len(keys)
    idx = np.arange(n, dtype=np.int64)
    if valid is not None:
        idx = idx[valid]
    if len(idx) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    k = keys[idx]
    order = np.lexsort((idx, k))  # by key, then input order
    k, idx = k[order], idx[order]
    same = k[1:] == k[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    # the first member of each run of equal keys
    run_start = np.concatenate([[True], ~same])
    head = idx[np.maximum.accumulate(np.where(run_start, np.arange(len(idx)), 0))]
    member = ~run_start
    a, b = head[member], idx[member]
    if sigs is not None:
        ok = estimated_jaccard(sigs[a], sigs[b]) >= threshold
        a, b = a[ok], b[ok]
    return np.stack([a, b], axis=1)


class UnionFind:
    """Disjoint sets over ``0..n-1`` (path halving, union by smaller root index)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def labels(self) -> np.ndarray:
        """Root of every element (``int64 [n]``)."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _keep_key(date: str | None, index: int) -> tuple[str, int]:
    # latest crawl date wins; ties go to the earliest document in input order
    return (date or "", -index)


def pick_survivors(labels: np.ndarray, crawl_dates: Sequence[str | None]) -> np.ndarray:
    """For each element, the global index of its cluster's survivor (``int64 [n]``)."""
    best: dict[int, int] = {}
    for i, root in enumerate(labels.tolist()):
        cur = best.get(root)
        if cur is None or _keep_key(crawl_dates[i], i) > _keep_key(crawl_dates[cur], cur):
            best[root] = i
    return np.array([best[r] for r in labels.tolist()], dtype=np.int64)


def minhash_duplicates(
    band_keys: np.ndarray,
    sigs: np.ndarray,
    crawl_dates: Sequence[str | None],
    config: MinHashConfig | None = None,
    candidates: np.ndarray | None = None,
    edges: Iterable[np.ndarray] | None = None,
) -> np.ndarray:
    """Near-duplicate decision over the whole corpus: ``int64 [n]`` survivor index (itself if kept).

    ``candidates``: ``bool [n]`` documents taking part (e.g. not already removed as URL duplicates).
    ``edges``: precomputed ``band_edges`` outputs (from other workers); computed here otherwise.
    """
    cfg = config or MinHashConfig()
    n = sigs.shape[0]
    valid = has_shingles(sigs)
    if candidates is not None:
        valid &= candidates
    if edges is None:
        edges = [
            band_edges(band_keys[:, j], sigs if cfg.verify else None, cfg.threshold, valid)
            for j in range(cfg.num_bands)
        ]
    uf = UnionFind(n)
    for e in edges:
        for a, b in e.tolist():
            uf.union(a, b)
    return pick_survivors(uf.labels(), crawl_dates)


def url_duplicates(
    urls: Sequence[str | None], crawl_dates: Sequence[str | None], candidates: np.ndarray | None = None
) -> np.ndarray:
    """Exact URL dedup: ``int64 [n]`` survivor index per document (itself if kept or URL-less)."""
    best: dict[str, int] = {}
    for i, url in enumerate(urls):
        if not url or (candidates is not None and not candidates[i]):
            continue
        cur = best.get(url)
        if cur is None or _keep_key(crawl_dates[i], i) > _keep_key(crawl_dates[cur], cur):
            best[url] = i
    return np.array(
        [best.get(u, i) if u and (candidates is None or candidates[i]) else i for i, u in enumerate(urls)],
        dtype=np.int64,
    )


def frequent_image_urls(image_url_lists: Iterable[Iterable[str]], max_occurrences: int = 10) -> set[str]:
    """Image URLs occurring more than ``max_occurrences`` times over all given documents."""
    counts: Counter = Counter()
    for urls in image_url_lists:
        counts.update(urls)
    return {u for u, c in counts.items() if c > max_occurrences}


def exact_jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets (for tests and small-scale checks)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def shingle_set(text: str, n_grams: int = 5) -> set[tuple[str, ...]]:
    """The exact set of word shingles (the brute-force reference of ``shingle_hashes``)."""
    ws = words(text)
    if not ws:
        return set()
    n = min(n_grams, len(ws))
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}
