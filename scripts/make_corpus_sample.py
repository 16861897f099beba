"""Rebuild the embedded corpus sample (src/interleaf/data/corpus/sample.warc.gz).

The pages are the libxslt/libexslt HTML manual as Debian ships it in ``libxslt1-dev``
(MIT licence; see src/interleaf/data/corpus/NOTICE). Usage::

    python scripts/make_corpus_sample.py [--source /usr/share/doc/libxslt1-dev/html]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from interleaf.corpus.sample import LIBXSLT_DOC, SAMPLE_NAME, data_dir, libxslt_records, write_warc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=LIBXSLT_DOC)
    ap.add_argument("-o", "--output", type=Path, default=data_dir() / SAMPLE_NAME)
    args = ap.parse_args()
    records = libxslt_records(args.source)
    n = write_warc(args.output, records)
    pages = sum(1 for r in records if r[2].startswith("text/html"))
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {n} records ({pages} HTML pages, {n - pages} images), {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
