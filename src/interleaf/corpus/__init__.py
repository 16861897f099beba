"""interleaf.corpus: web pages to an image-text interleaved corpus (the OmniCorpus data engine).

Per-document parts (this package's core): ``Document`` (aligned-list layout), readers and writers
(``formats``, ``warc``), main-body extraction keeping images in place (``extract``), rule filters
(``filters``) and conversions (``convert``). The engines that run them over many shards live in
``engine`` / ``ray_engine``.
"""

from interleaf.corpus.base import Drop, RawPage, ReadError, Step, StepStats, run_steps
from interleaf.corpus.document import Document

__all__ = ["Document", "Drop", "RawPage", "ReadError", "Step", "StepStats", "run_steps"]
