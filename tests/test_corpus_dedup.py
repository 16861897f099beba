"""MinHash LSH dedup against brute-force exact Jaccard; URL dedup; image URL frequency."""

from __future__ import annotations

import itertools
import random

import numpy as np

from interleaf.corpus import dedup
from interleaf.corpus.dedup import MinHashConfig, MinHasher


def _synthetic_corpus(seed: int = 0):
    """Random base documents plus near-duplicates of known similarity, and unrelated documents."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    docs: list[str] = []
    for _ in range(60):
        base = [rng.choice(vocab) for _ in range(rng.randint(150, 300))]
        docs.append(" ".join(base))
        for _ in range(rng.randint(0, 3)):
            edited = list(base)
            # 0..2% of words substituted: well above 0.8 Jaccard; 8..12%: well below
            frac = rng.choice([0.0, 0.01, 0.02, 0.1, 0.12])
            for i in rng.sample(range(len(edited)), int(frac * len(edited))):
                edited[i] = rng.choice(vocab)
            docs.append(" ".join(edited))
    rng.shuffle(docs)
    return docs


def _brute_force_survivors(docs, threshold=0.8):
    sets = [dedup.shingle_set(d) for d in docs]
    uf = dedup.UnionFind(len(docs))
    for i, j in itertools.combinations(range(len(docs)), 2):
        if dedup.exact_jaccard(sets[i], sets[j]) >= threshold:
            uf.union(i, j)
    return dedup.pick_survivors(uf.labels(), [None] * len(docs))


def test_minhash_matches_brute_force_dedup_rate():
    docs = _synthetic_corpus()
    bf = _brute_force_survivors(docs)
    mh = MinHasher()
    sigs = mh.signatures(docs)
    keys = mh.band_keys(sigs)
    got = dedup.minhash_duplicates(keys, sigs, [None] * len(docs))
    bf_removed = {i for i in range(len(docs)) if bf[i] != i}
    mh_removed = {i for i in range(len(docs)) if got[i] != i}
    assert len(bf_removed) > 20  # the set has real near-duplicates
    rate_bf, rate_mh = len(bf_removed) / len(docs), len(mh_removed) / len(docs)
    assert abs(rate_bf - rate_mh) <= 0.02, (rate_bf, rate_mh)
    inter = len(bf_removed & mh_removed)
    assert inter / len(bf_removed) >= 0.95 and inter / len(mh_removed) >= 0.95


def test_signatures_batched_equal_single_and_estimate_jaccard():
    docs = _synthetic_corpus(1)[:20]
    mh = MinHasher(MinHashConfig(num_bands=20, rows_per_band=10))
    batch = mh.signatures(docs, chunk=500)
    for i, d in enumerate(docs[:5]):
        np.testing.assert_array_equal(batch[i], mh.signature(d))
    sets = [dedup.shingle_set(d) for d in docs]
    errs = [
        abs(dedup.estimated_jaccard(batch[i], batch[j]) - dedup.exact_jaccard(sets[i], sets[j]))
        for i, j in itertools.combinations(range(20), 2)
    ]
    assert np.mean(errs) < 0.03
    # an empty text has no shingles and never matches anything
    assert not dedup.has_shingles(mh.signatures(["", "  ..."])).any()


def test_edges_merged_across_shards_equal_single_pass():
    docs = _synthetic_corpus(2)
    mh = MinHasher()
    whole = mh.signatures(docs)
    # signatures computed per shard (as workers do) then concatenated in input order
    parts = [mh.signatures(docs[i : i + 37]) for i in range(0, len(docs), 37)]
    sigs = np.concatenate(parts)
    np.testing.assert_array_equal(sigs, whole)
    keys = mh.band_keys(sigs)
    dates = [f"2024-01-{(i % 28) + 1:02d}" for i in range(len(docs))]
    ref = dedup.minhash_duplicates(keys, sigs, dates)
    edges = [dedup.band_edges(keys[:, j], sigs, 0.8) for j in range(mh.config.num_bands)]
    got = dedup.minhash_duplicates(keys, sigs, dates, edges=edges[::-1])
    np.testing.assert_array_equal(ref, got)
    # the survivor of each cluster has the latest crawl date of its cluster
    for i, s in enumerate(ref.tolist()):
        assert dates[s] >= dates[i]


def test_url_dedup_keeps_latest_then_first():
    urls = ["http://a", "http://b", "http://a", "http://a", None, "http://b"]
    dates = ["2020", "2021", "2023", "2023", "2020", "2019"]
    got = dedup.url_duplicates(urls, dates).tolist()
    assert got == [2, 1, 2, 2, 4, 1]


def test_frequent_image_urls_threshold():
    lists = [["x", "y"]] * 10 + [["x"]]
    assert dedup.frequent_image_urls(lists, 10) == {"x"}
    assert dedup.frequent_image_urls(lists, 11) == set()


def test_s_curve_documented_values():
    assert abs(dedup.s_curve(0.8, 16, 7) - 0.977) < 0.001
    assert dedup.s_curve(0.5, 16, 7) < 0.12


def test_vectorised_tokeniser_matches_regex_reference():
    texts = [
        "",
        "...!!",
        "one",
        "Two words",
        "exactly five words are here",
        "Caf\u00e9 na\u00efve\u00a0espa\u00f1ol \u2014 \u201cquoted\u201d text_with_underscore 3.14 and more words",
        "The same five word shingle. The same five word shingle. The same five word shingle.",
        "\u4e2d\u6587\u3002\u65e5\u672c\u8a9e\uff0c\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442 here we go again",
    ] + _synthetic_corpus(3)[:30]
    batch = dedup.batch_shingle_hashes(texts)
    for t, h in zip(texts, batch):
        assert len(h) == len(dedup.shingle_set(t)), t[:40]
        np.testing.assert_array_equal(h, dedup.shingle_hashes(t))  # same alone as in a batch
    assert dedup.words("Caf\u00e9\u00a0au-lait \u2014 ok") == ["caf\u00e9", "au", "lait", "ok"]
    # equal shingles hash equally across texts; the order of words matters
    a, b = dedup.batch_shingle_hashes(["a b c d e f", "x a b c d e"])
    assert len(set(a.tolist()) & set(b.tolist())) == 1
    assert not set(dedup.shingle_hashes("e d c b a").tolist()) & set(a.tolist())


def _pairs_of_jaccard(n_pairs: int, seed: int = 3) -> tuple[list[str], list[float]]:
    """``n_pairs`` document pairs sharing a long middle run of words: 5-gram Jaccard ~0.64."""
    rng = random.Random(seed)
    docs, sims = [], []
    for k in range(n_pairs):
        fresh = (f"p{k}x{i}" for i in itertools.count())
        shared = [next(fresh) for _ in range(150)]
        a = [next(fresh) for _ in range(rng.randint(39, 43))] + shared
        b = shared + [next(fresh) for _ in range(rng.randint(39, 43))]
        docs += [" ".join(a), " ".join(b)]
        sims.append(dedup.exact_jaccard(dedup.shingle_set(docs[-2]), dedup.shingle_set(docs[-1])))
    return docs, sims


def test_lowered_threshold_gets_a_layout_that_finds_its_pairs():
    from interleaf.corpus import pipeline as P

    docs, sims = _pairs_of_jaccard(200)
    assert 0.6 < min(sims) and max(sims) < 0.7
    cfg = P.minhash_config(P.load_config({"dedup": {"minhash": {"threshold": 0.5}}}))
    assert cfg.num_perm == 112 and (cfg.num_bands, cfg.rows_per_band) != (16, 7)
    assert cfg.recall_at_threshold >= 0.95
    mh = MinHasher(cfg)
    sigs = mh.signatures(docs)
    got = dedup.minhash_duplicates(mh.band_keys(sigs), sigs, [None] * len(docs), cfg)
    merged = sum(got[2 * k + 1] == 2 * k for k in range(200))
    assert merged >= 198, merged  # 16 x 7 merged 94 of them
    assert MinHashConfig(threshold=0.5) == cfg  # the library default chooses the same way


def test_lsh_layout_keeps_the_hash_count_and_the_published_default():
    assert dedup.lsh_layout(0.8) == (16, 7)
    assert (MinHashConfig().num_bands, MinHashConfig().rows_per_band) == (16, 7)
    from interleaf.corpus import pipeline as P

    mh = P.load_config()["dedup"]["minhash"]
    assert (mh["num_bands"], mh["rows_per_band"]) == (16, 7)
    for t in (0.3, 0.5, 0.6, 0.7, 0.75, 0.85, 0.9, 0.95):
        b, r = dedup.lsh_layout(t)
        assert b * r == 112 and dedup.s_curve(t, b, r) >= 0.95, t
        # no other split of the 112 hashes with that recall lets in fewer false positives
        fewer = [(bb, 112 // bb) for bb in range(1, 113) if 112 % bb == 0 and 112 // bb > r]
        assert all(dedup.s_curve(t, bb, rr) < 0.95 for bb, rr in fewer), t
    # one of bands / rows given: the other keeps its default
    assert (MinHashConfig(num_bands=20).num_bands, MinHashConfig(num_bands=20).rows_per_band) == (20, 7)


def test_layout_set_by_hand_that_misses_pairs_is_warned_about(caplog):
    from interleaf.corpus import pipeline as P

    with caplog.at_level("WARNING", logger="interleaf.corpus.pipeline"):
        cfg = P.load_config({"dedup": {"minhash": {"threshold": 0.5, "num_bands": 16, "rows_per_band": 7}}})
    assert (cfg["dedup"]["minhash"]["num_bands"], cfg["dedup"]["minhash"]["rows_per_band"]) == (16, 7)
    [rec] = caplog.records
    assert "16 bands x 7 rows" in rec.getMessage() and "probability 0.12" in rec.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="interleaf.corpus.pipeline"):
        P.load_config({"dedup": {"minhash": {"threshold": 0.8, "num_bands": 16, "rows_per_band": 7}}})
        P.load_config({"dedup": {"minhash": {"threshold": 0.5}}})
    assert not caplog.records


def test_null_layout_means_unset():
    """num_bands / rows_per_band: null was a TypeError in int(None); it means 'choose'."""
    from interleaf.corpus import pipeline as P

    mh = P.load_config({"dedup": {"minhash": {"threshold": 0.5, "num_bands": None, "rows_per_band": None}}})
    assert (mh["dedup"]["minhash"]["num_bands"], mh["dedup"]["minhash"]["rows_per_band"]) == (56, 2)
    mh = P.load_config({"dedup": {"minhash": {"num_bands": 20, "rows_per_band": None}}})["dedup"]["minhash"]
    assert (mh["num_bands"], mh["rows_per_band"]) == (20, 7)  # as if rows_per_band were absent
    assert P.minhash_config(P.load_config({"dedup": {"minhash": {"num_bands": None}}})).num_bands == 16
