"""Pipeline configuration: a YAML file -> the ordered stages of a corpus build.

Stages run in the order OmniCorpus found cheapest (App. C of the paper): everything that needs
only the page text runs before anything that needs bandwidth or pixels::

    read -> extract -> text filters -> dedup (URL, MinHash, image-URL frequency)
         -> [image fetch + pixel filters] -> write

Every key has the published default (the source is named next to it); an unknown key anywhere
raises ``ConfigError`` naming it (``dedup.minhash.treshold``), so a typo never silently falls
back to a default. Example::

    read: {shard_size: 500}
    extract: {timeout_s: 5, options: {drop_without_images: true}}
    filters:                        # ordered; each item a filter name or {name: {kwargs}}
      - gopher_quality
      - c4_quality: {min_sentences: 3}
    dedup:
      minhash: {threshold: 0.8}
      image_urls: {max_occurrences: 10}
    fetch: {enabled: false}
    write: {format: parquet}
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interleaf.errors import ConfigError

log = logging.getLogger(__name__)

# Published defaults. None for `filters` means "the default filter list of interleaf.corpus.filters".
DEFAULTS: dict[str, Any] = {
    "read": {
        "shard_size": 1000,  # input records per shard (unit of parallelism, resumption, output)
        # "records": shards are runs of shard_size consecutive records of all inputs (the driver
        # reads); "files": one shard per input file, read by whoever processes it (Ray tasks read
        # their own files: the way to scale out over many WARCs)
        "shard_by": "records",
        "max_page_bytes": 10_000_000,  # larger payloads are recorded as errors, not extracted
    },
    "extract": {
        "timeout_s": 10.0,  # per-document time limit (datatrove: 1 s for trafilatura alone)
        "impl": None,  # "module:callable" returning an extractor (default: interleaf.corpus.extract)
        "options": {},  # keyword options of the extractor (drop_without_images etc.)
    },
    "filters": None,
    "dedup": {
        "url": {"enabled": True},  # OBELICS: exact URL dedup, keep the most recent crawl
        "minhash": {  # OmniCorpus: MinHash, similarity 0.8, keep the latest version
            "enabled": True,
            "n_grams": 5,
            "threshold": 0.8,
            # left unset, bands x rows are chosen for the threshold from 112 hashes
            # (dedup.lsh_layout: 16 x 7 at 0.8); set, a layout that misses pairs at the threshold
            # is warned about
            "num_bands": 16,
            "rows_per_band": 7,
            "seed": 1,
            "verify": True,
        },
        "image_urls": {  # OBELICS/OmniCorpus: image URLs seen > 10 times across the corpus removed
            "enabled": True,
            "max_occurrences": 10,
            "drop_documents_without_images": True,  # OmniCorpus keeps only documents with images
        },
    },
    "fetch": {
        "enabled": False,  # image download is optional (and off by default: offline first)
        "allow_private": False,
        "timeout_s": 10.0,
        "max_bytes": 20_000_000,
        "retries": 2,
        "concurrency": 16,
        "min_side": 150,  # MMC4/OmniCorpus: width or height < 150 px dropped
        "min_aspect": 0.5,  # MMC4/OmniCorpus: aspect ratio outside [0.5, 2] dropped
        "max_aspect": 2.0,
        "max_phash_occurrences": 10,  # OmniCorpus: images appearing > 10 times (pHash+dHash) dropped
        "drop_failed": True,
        "drop_documents_without_images": True,
        "images_dir": None,  # default: OUT/images
        "local_roots": [],  # directories whose files (file:// URLs, paths) may be read
    },
    "write": {
        "format": "parquet",  # or jsonl
        # parquet columns: "obelics" (metadata as JSON strings: lossless, any keys) or
        # "omnicorpus" (struct columns as OpenGVLab/OmniCorpus-CC); both the aligned-list layout
        "layout": "obelics",
        # what the exclusion output holds per removed document: "ids" (id, url, WARC position,
        # stage, reason) or "full" (also the document as the removing stage saw it, datatrove-style)
        "exclusions": "ids",
    },
}


# keys whose null means "not set": the value is chosen from the others
_NULL_MEANS_UNSET = ("dedup.minhash.num_bands", "dedup.minhash.rows_per_band")
# keys whose default is null and whose value, when set, is a string
_STRING_OR_NULL = ("fetch.images_dir", "extract.impl")


def _merge(base: dict, override: dict, prefix: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"pipeline config: unknown key {path!r}")
        default = base[key]
        if isinstance(default, dict) and key != "options":
            if not isinstance(value, dict):
                raise ConfigError(f"pipeline config: {path!r} must be a mapping")
            out[key] = _merge(default, value, path + ".")
        elif key == "options":
            if not isinstance(value, dict):
                raise ConfigError(f"pipeline config: {path!r} must be a mapping")
            out[key] = dict(value)
        elif isinstance(default, list):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"pipeline config: {path!r} must be a list of strings")
            out[key] = list(value)
        elif path in _NULL_MEANS_UNSET and value is None:
            pass  # the default stays; _lsh_layout chooses the layout as if the key were absent
        elif path in _STRING_OR_NULL:
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"pipeline config: {path!r} must be a string or null")
            out[key] = value
        else:
            if default is not None and value is None:
                raise ConfigError(f"pipeline config: {path!r} must not be null")
            if default is not None:
                if isinstance(default, bool) and not isinstance(value, bool):
                    raise ConfigError(f"pipeline config: {path!r} must be true or false")
                if isinstance(default, (int, float)) and not isinstance(default, bool):
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise ConfigError(f"pipeline config: {path!r} must be a number")
                    if isinstance(default, int) and not float(value).is_integer():
                        raise ConfigError(f"pipeline config: {path!r} must be a whole number")
                if isinstance(default, str) and not isinstance(value, str):
                    raise ConfigError(f"pipeline config: {path!r} must be a string")
            out[key] = value
    return out


def _check(cfg: dict) -> None:
    if cfg["read"]["shard_by"] not in ("records", "files"):
        raise ConfigError("pipeline config: 'read.shard_by' must be 'records' or 'files'")
    if int(cfg["read"]["shard_size"]) < 1:
        raise ConfigError("pipeline config: 'read.shard_size' must be >= 1")
    if int(cfg["read"]["max_page_bytes"]) < 1:
        raise ConfigError("pipeline config: 'read.max_page_bytes' must be >= 1")
    # "not x > 0" rather than "x <= 0": a YAML .nan compares false either way and must not pass
    if not float(cfg["extract"]["timeout_s"]) > 0:
        raise ConfigError("pipeline config: 'extract.timeout_s' must be > 0")
    mh = cfg["dedup"]["minhash"]
    if not 0.0 < float(mh["threshold"]) <= 1.0:
        raise ConfigError("pipeline config: 'dedup.minhash.threshold' must be in (0, 1]")
    for k in ("n_grams", "num_bands", "rows_per_band"):
        if int(mh[k]) < 1:
            raise ConfigError(f"pipeline config: 'dedup.minhash.{k}' must be >= 1")
    if not int(cfg["dedup"]["image_urls"]["max_occurrences"]) >= 0:  # < 0 would remove every image
        raise ConfigError("pipeline config: 'dedup.image_urls.max_occurrences' must be >= 0")
    if cfg["write"]["format"] not in ("parquet", "jsonl"):
        raise ConfigError("pipeline config: 'write.format' must be 'parquet' or 'jsonl'")
    if cfg["write"]["exclusions"] not in ("ids", "full"):
        raise ConfigError("pipeline config: 'write.exclusions' must be 'ids' or 'full'")
    if cfg["write"]["layout"] not in ("obelics", "omnicorpus"):
        raise ConfigError("pipeline config: 'write.layout' must be 'obelics' or 'omnicorpus'")
    fc = cfg["fetch"]
    for k, low in (("timeout_s", 0), ("max_bytes", 0), ("concurrency", 0), ("max_aspect", 0)):
        if not float(fc[k]) > low:
            raise ConfigError(f"pipeline config: 'fetch.{k}' must be > {low}")
    for k in ("retries", "min_side", "max_phash_occurrences", "min_aspect"):
        if not float(fc[k]) >= 0:
            raise ConfigError(f"pipeline config: 'fetch.{k}' must be >= 0")
    if float(fc["min_aspect"]) > float(fc["max_aspect"]):  # an empty range would drop every image
        raise ConfigError(
            f"pipeline config: 'fetch.min_aspect' ({fc['min_aspect']}) must be <= 'fetch.max_aspect' "
            f"({fc['max_aspect']})"
        )
    flt = cfg["filters"]
    if flt is not None and not isinstance(flt, list):
        raise ConfigError("pipeline config: 'filters' must be a list of filter names or {name: {...}}")


def load_config(source: str | Path | dict | None = None, **overrides: Any) -> dict:
    """The full pipeline config: defaults, then a YAML file (or dict), then ``overrides``.

    ``overrides`` use dotted paths, e.g. ``load_config(path, **{"write.format": "jsonl"})``.
    """
    user: dict = {}
    where = "pipeline config"
    if isinstance(source, dict):
        user = copy.deepcopy(source)
    elif source is not None:
        import yaml

        where = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read pipeline config ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: cannot read pipeline config (not UTF-8: {exc.reason})") from None
        try:
            user = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{source}: pipeline config must be a mapping")
    for dotted, value in overrides.items():
        node = user
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    try:
        cfg = _merge(DEFAULTS, user, "")
        _check(cfg)
        cfg["fetch"] = _absolute_paths(cfg["fetch"])
        if cfg["fetch"]["enabled"]:  # the build fetches at its end: refuse a bad root before it starts
            _check_local_roots(cfg["fetch"])
    except ConfigError as exc:
        if where != "pipeline config":
            raise ConfigError(str(exc).replace("pipeline config", where, 1)) from None
        raise
    _lsh_layout(cfg["dedup"]["minhash"], user.get("dedup", {}).get("minhash", {}), where)
    return cfg


def _absolute_paths(fc: dict) -> dict:
    """``fc`` with its local roots and images folder as absolute paths: they enter the fetch
    stage's settings key, and a relative path means another folder in another working directory."""
    fc = dict(fc)
    fc["local_roots"] = [str(Path(r).resolve()) for r in fc["local_roots"]]
    if fc["images_dir"] is not None:
        fc["images_dir"] = str(Path(fc["images_dir"]).resolve())
    return fc


def _check_local_roots(fc: dict) -> None:
    # a root that is no folder (a typo) would refuse every local image without a word
    for root in fc["local_roots"]:
        if not Path(root).is_dir():
            raise ConfigError(
                f"pipeline config: local root {root} ('fetch.local_roots', --local-root) is not an existing folder"
            )


def fetch_config(fc: dict | None) -> dict:
    """The ``fetch`` section ``fc`` (a mapping, e.g. a config's or the API's) checked like a
    config's, over the defaults, with its paths absolute."""
    if fc is not None and not isinstance(fc, dict):
        raise ConfigError("pipeline config: 'fetch' must be a mapping")
    cfg = copy.deepcopy(DEFAULTS)
    cfg["fetch"] = _merge(DEFAULTS["fetch"], fc or {}, "fetch.")
    _check(cfg)
    fc = _absolute_paths(cfg["fetch"])
    _check_local_roots(fc)
    return fc


def _lsh_layout(mh: dict, given: dict, where: str) -> None:
    """Bands x rows for the threshold unless the user set them; a layout set that misses pairs at
    the threshold is warned about (the S-curve alone decides which pairs are ever compared)."""
    from interleaf.corpus.dedup import MinHashConfig, lsh_layout

    threshold = float(mh["threshold"])
    given = {k: v for k, v in given.items() if v is not None}  # null: not set
    if "num_bands" not in given and "rows_per_band" not in given:
        mh["num_bands"], mh["rows_per_band"] = lsh_layout(threshold)
        return
    b, r = int(mh["num_bands"]), int(mh["rows_per_band"])
    recall = MinHashConfig(num_bands=b, rows_per_band=r, threshold=threshold).recall_at_threshold
    if recall < 0.9:
        log.warning(
            "%s: dedup.minhash: %d bands x %d rows catch a pair of Jaccard %g with probability %.2f "
            "only (near-duplicates missed); leave num_bands and rows_per_band unset to have them chosen",
            where,
            b,
            r,
            threshold,
            recall,
        )


def config_fingerprint(cfg: dict) -> str:
    """Hash of everything that changes the output (a resumed run must use the same config)."""
    relevant = {k: v for k, v in cfg.items() if k != "fetch"} | {
        "fetch": {k: v for k, v in cfg["fetch"].items() if k not in ("concurrency",)}
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


STAGE_ORDER = (
    "read",
    "extract",
    "filters",
    "dedup_url",
    "dedup_minhash",
    "dedup_image_urls",
    "fetch",
    "write",
)


def _import(spec: str, what: str) -> Callable:
    mod, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"pipeline config: {what} must be 'module:callable', got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"pipeline config: cannot import {what} {spec!r} ({exc})") from None


class Extraction:
    """The extraction stage: ``RawPage -> Document | Drop``, with its ``StepStats``."""

    name = "extract"

    def __init__(self, cfg: dict):
        from interleaf.corpus.base import StepStats

        self.stats = StepStats(name=self.name)
        # one size limit, read.max_page_bytes: a larger page is an error, never extracted
        self.max_bytes = int(cfg["read"]["max_page_bytes"])
        opts = dict(cfg["extract"]["options"])
        if "max_bytes" in opts:
            raise ConfigError(
                "pipeline config: 'extract.options.max_bytes' is not an option; use 'read.max_page_bytes'"
            )
        impl = cfg["extract"]["impl"]
        if impl:
            self._fn = _import(impl, "'extract.impl'")(**opts)
        else:
            from interleaf.corpus import extract as X
            from interleaf.corpus.filters import check_options

            opts["max_bytes"] = self.max_bytes  # the extractor's own guard must not cut in first
            aliases = {"drop_without_images": "drop_no_images"}
            try:  # check the options once, here, rather than fail on every page
                X.ExtractConfig(**{aliases.get(k, k): v for k, v in opts.items()})
            except TypeError as exc:
                bad = str(exc).rsplit(" ", 1)[-1]
                raise ConfigError(
                    f"pipeline config: unknown key 'extract.options.{bad.strip(chr(39))}'"
                ) from None
            # and their types, as the filters' ("yes" for a bool would be truthy on every page)
            check_options(
                "extract", X.ExtractConfig, opts, where="pipeline config: 'extract.options'", aliases=aliases
            )
            self._fn = lambda page: X.extract(page, **dict(opts))

    def _guarded(self, page):
        from interleaf.corpus.base import Drop

        size = len(getattr(page, "html", b""))
        if size > self.max_bytes:
            detail = f"{size} bytes > read.max_page_bytes={self.max_bytes}"
            return Drop("page_too_large", detail, error=True)
        return self._fn(page)

    def __call__(self, page):
        from interleaf.corpus.base import Drop

        out = self.stats.run(self._guarded, page, "extract")
        if not isinstance(out, Drop):  # images are born here: count them in and out, balanced
            self.stats.images_in += out.n_images
            self.stats.images_out += out.n_images
        return out


def build_filters(cfg: dict) -> list:
    """The text-filter steps of ``cfg['filters']`` (None: the published default list)."""
    spec = cfg["filters"]
    if spec is not None and len(spec) == 0:
        return []
    from interleaf.corpus import filters as F

    if spec is None:
        spec = list(getattr(F, "DEFAULT_FILTERS", []))
    for item in spec:
        name = item if isinstance(item, str) else (next(iter(item)) if isinstance(item, dict) else None)
        if not isinstance(name, str) or (isinstance(item, dict) and len(item) != 1):
            raise ConfigError(f"pipeline config: bad filter entry {item!r} (a name or {{name: {{...}}}})")
        if name not in F.FILTERS:
            raise ConfigError(
                f"pipeline config: unknown filter 'filters.{name}' (known: {', '.join(sorted(F.FILTERS))})"
            )
    try:
        return F.build_filters(spec)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"pipeline config: bad filter options ({exc})") from None


def minhash_config(cfg: dict):
    from interleaf.corpus.dedup import MinHashConfig

    mh = cfg["dedup"]["minhash"]
    return MinHashConfig(
        n_grams=int(mh["n_grams"]),
        num_bands=int(mh["num_bands"]),
        rows_per_band=int(mh["rows_per_band"]),
        threshold=float(mh["threshold"]),
        seed=int(mh["seed"]),
        verify=bool(mh["verify"]),
    )


def dump_config(cfg: dict) -> str:
    """The effective config as YAML (written next to the output for reproducibility)."""
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)
