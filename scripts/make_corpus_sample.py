"""Rebuild the embedded corpus sample (src/interleaf/data/corpus/sample.warc.gz).

The pages are HTML manuals as Debian ships them: libxslt/libexslt (``libxslt1-dev``, MIT),
Apache httpd (``apache2-doc``, Apache-2.0) and Python 3.11 (``python3.11-doc``, PSF licence);
see src/interleaf/data/corpus/NOTICE. Usage (after ``apt-get install libxslt1-dev apache2-doc
python3.11-doc``)::

    python scripts/make_corpus_sample.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from interleaf.corpus.sample import SAMPLE_NAME, data_dir, sample_records, write_warc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=data_dir() / SAMPLE_NAME)
    args = ap.parse_args()
    records = sample_records()
    n = write_warc(args.output, records)
    pages = sum(1 for r in records if r[2].startswith("text/html"))
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {n} records ({pages} HTML pages, {n - pages} images), {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
