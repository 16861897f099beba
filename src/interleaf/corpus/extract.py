"""Main-body extraction that keeps images where they stood in the page (OmniCorpus stage 1).

``extract(page) -> Document | Drop`` is a pure function of one ``RawPage`` (CORPUS engines run it
in worker processes under a per-document time limit). It follows what the OmniCorpus paper says
its trafilatura-derived extractor (magic-html) does, with a fast C parser (selectolax / lexbor)
and no fallback path:

1. guards: payload size cap (``too_large``), nesting-depth cap (``too_deeply_nested``, checked on
   the raw markup before parsing because HTML tree building is quadratic in depth), charset
   decoding (``undecodable_charset``);
2. noise removal by element: script, style, noscript, template, iframe, svg, canvas, form
   controls, dialog; nav, aside, footer, menus, forms and site-level headers unless they hold most
   of the page's words (ASP.NET wraps whole pages in one ``<form>``); HTML comments never reach
   text;
3. noise removal by structure and naming: elements whose class / id / role says navigation,
   menu, breadcrumbs, footer, sidebar, comments, share/social, ads, banners, cookie notices,
   newsletter, related posts, pagination, table of contents (token match, so ``entry-header``
   is kept but ``site-header`` is not; state and taxonomy classes such as ``has-sidebar`` or
   ``category-social`` are no evidence, and an element holding more than 60% of the page's words
   is never removed by its name); hidden elements (``hidden``, ``aria-hidden``,
   ``display:none``); link clusters (lists, tables, paragraphs, divs whose text is mostly link
   text, e.g. menus and link farms); images wrapped in links to other sites (ad banners and
   badges; links to image files are kept) or to an anchor in the page (back-to-top arrows);
4. main-content choice: the one ``<main>`` / ``role=main`` / ``<article>`` element when it holds
   most of the remaining text, else the body;
5. serialisation into the aligned-list layout: headings, paragraphs, list items, table rows,
   ``<pre>`` lines become text lines; blank lines separate blocks; consecutive blocks between two
   images form one text node (OBELICS merges them the same way); each ``<img>`` becomes an image
   node at its position, its URL resolved from ``src`` / ``data-src`` / lazy-load attributes /
   ``srcset`` against ``<base href>`` and the page URL; ``alt``, ``width``, ``height`` kept.

Documents without images are dropped (``no_images``) unless ``drop_no_images=False``, as
OmniCorpus does; documents without any text are dropped (``no_text``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser

from interleaf.corpus.base import Drop, RawPage, StepStats
from interleaf.corpus.document import Document
from interleaf.corpus.warc import UndecodableError, decode_html

# ---- element lists ---------------------------------------------------------------------------
# removed with everything inside them
JUNK_TAGS = [
    "script", "style", "noscript", "template", "iframe", "frame", "frameset", "object", "embed",
    "applet", "svg", "math", "canvas", "map", "button", "select", "textarea", "input", "label",
    "dialog", "audio", "video", "head",
]  # fmt: skip
# page regions removed unless they hold most of the page's words (some sites wrap everything in them)
REGION_TAGS = "nav, aside, footer, menu, header, form"  # ASP.NET wraps whole pages in one <form>
# elements that start and end a paragraph-level block
BLOCK_TAGS = (
    "p, h1, h2, h3, h4, h5, h6, ul, ol, dl, table, blockquote, pre, figure, figcaption, address, "
    "section, article, main, div, center, details, summary, caption, fieldset, header, hgroup"
)
IMG_TAGS = "img, amp-img"  # AMP pages use <amp-img src=...>
LINE_TAGS = "li, dt, dd, tr"  # each starts a new line inside its block
CELL_TAGS = "td, th"  # cells are separated by a space

_TOKEN_SPLIT = re.compile(r"[\s_\-:]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
# class/id tokens (after splitting on - _ : and camelCase) that mark boilerplate
BOILERPLATE_PARTS = frozenset(
    """nav navbar navigation menu menubar submenu breadcrumb breadcrumbs footer sidebar sidenav
    comment comments disqus respond share sharing sharebar social socials advert advertisement
    advertising ads adsense adsbygoogle sponsor sponsored promo promotion banner cookie cookies
    consent gdpr newsletter subscribe subscription popup modal overlay related recommended
    pagination pager paging skiplink toc masthead topbar toolbar tagcloud widget widgets
    signup login signin byline search searchform searchbox""".split()
)
# full tokens (class/id values as written) that mark boilerplate but whose parts alone do not
BOILERPLATE_TOKENS = frozenset(
    """site-header page-header global-header header-nav top-nav site-info site-footer copyright
    skip-link skip-to-content screen-reader-text sr-only visually-hidden hidden hide print-only
    ad ad-container ad-slot""".split()
)
# class tokens that describe a state or a taxonomy term of an element rather than what it is
_MODIFIER_PREFIXES = (
    "has-", "has_", "with-", "no-", "is-", "show-", "enable-", "category-", "tag-", "format-", "type-",
    "status-", "layout-", "template-", "single-", "archive-", "term-", "topic-", "section-",
)  # fmt: skip
BOILERPLATE_ROLES = frozenset(
    "navigation banner contentinfo complementary search menu menubar dialog alert toolbar tablist".split()
)
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".avif", ".tif", ".tiff", ".svg")
_LAZY_ATTRS = ("data-src", "data-original", "data-lazy-src", "data-lazy", "data-url", "data-hi-res-src")
_VOID = frozenset(
    "area base br col embed hr img input link meta param source track wbr p li td tr th dt dd option "
    "tbody thead tfoot colgroup".split()
)
_VOID |= frozenset(x.upper() for x in _VOID)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)")
_IMG_MARK = re.compile("\x02(\\d+)\x03")
PARA, LINE, IMG_OPEN, IMG_CLOSE, PRE = "\x01", "\x04", "\x02", "\x03", "\x05"
_MARKERS = (PARA, LINE, IMG_OPEN, IMG_CLOSE, PRE)
_MARKER_DELETE = dict.fromkeys(map(ord, _MARKERS))


@dataclass
class ExtractConfig:
    """Extraction options (defaults as in the module docstring)."""

    drop_no_images: bool = True  # OmniCorpus: HTML documents without images are dropped
    # larger payloads -> Drop("too_large"); the pipeline sets it to read.max_page_bytes and records
    # larger pages as errors before extraction, so one limit applies there
    max_bytes: int = 10_000_000
    max_depth: int = 512  # element nesting deeper than this -> Drop("too_deeply_nested")
    link_density: float = 0.5  # blocks whose text is more than this fraction link text are removed
    min_link_block_words: int = 0  # ... unless they hold at least this many words (0: no exception)
    drop_external_link_images: bool = True  # <a href=other site|#anchor><img></a>: ads, badges, arrows
    choose_main: bool = True  # restrict to <main>/<article> when it holds most of the text
    main_min_fraction: float = 0.5
    keep_data_uri_images: bool = False  # inline data: images are icons/placeholders on the web


def extract(page: RawPage | str | bytes, url: str | None = None, **options) -> Document | Drop:
    """Extract one page into an interleaved ``Document``, or a ``Drop`` with the reason.

    ``page`` is a ``RawPage`` (from a reader), or HTML text/bytes with ``url`` given. Options are
    the fields of ``ExtractConfig`` (``drop_without_images`` is accepted as an alias of
    ``drop_no_images``).
    """
    if "drop_without_images" in options:
        options["drop_no_images"] = options.pop("drop_without_images")
    cfg = ExtractConfig(**options)
    if not isinstance(page, RawPage):
        raw = page.encode("utf-8") if isinstance(page, str) else page
        page = RawPage(url=url or "", html=raw, charset="utf-8" if isinstance(page, str) else None)
    return _extract(page, cfg)


class Extractor:
    """``extract`` with fixed options and ``StepStats`` (pages in; documents out; drops by reason)."""

    name = "extract"

    def __init__(self, **options) -> None:
        if "drop_without_images" in options:
            options["drop_no_images"] = options.pop("drop_without_images")
        self.config = ExtractConfig(**options)
        self.stats = StepStats(name=self.name)

    def __call__(self, page: RawPage) -> Document | Drop:
        st = self.stats
        drops: Counter = Counter()
        out = st.run(lambda p: _extract(p, self.config, drops), page, self.name)
        seen = drops.pop(_SEEN, 0)  # <img> elements in the page; images_in counts them
        if isinstance(out, Drop):
            st.images_in += seen
            st.images_in_dropped_docs += seen
            return out
        kept = out.n_images
        other = seen - kept - sum(drops.values())
        if other > 0:
            drops["image_other"] += other
        st.images_in += max(seen, kept + sum(drops.values()))
        st.images_out += kept
        st.images_removed_by_reason.update(drops)
        return out


# ---------------------------------------------------------------------------------------------
_SEEN = "_images_seen"


def _extract(page: RawPage, cfg: ExtractConfig, drops: Counter | None = None) -> Document | Drop:
    """The extraction; ``drops`` (optional) receives the page's image count under ``_SEEN`` and the
    images left out, by reason."""
    raw = page.html
    if len(raw) > cfg.max_bytes:
        return Drop("too_large", f"{len(raw)} bytes > {cfg.max_bytes}")
    try:
        html, _encoding = decode_html(raw, page.charset)
    except UndecodableError as exc:
        return Drop("undecodable_charset", str(exc))
    if any(c in html for c in _MARKERS):  # our block/image markers must not come from the page
        html = html.translate(_MARKER_DELETE)
    if html.count("<") > cfg.max_depth:
        depth = nesting_depth(html, stop_at=cfg.max_depth + 1)
        if depth > cfg.max_depth:
            return Drop("too_deeply_nested", f"nesting depth > {cfg.max_depth}")
    tree = LexborHTMLParser(html)
    body = tree.body
    title_node = tree.css_first("title")
    title = " ".join(title_node.text().split()) if title_node is not None else ""
    base_url = page.url
    base = tree.css_first("base[href]")
    if base is not None:
        href = (base.attributes.get("href") or "").strip()
        if href:
            base_url = _resolve(page.url, href) or page.url
    if body is None:
        return Drop("empty_page", "no <body>")

    if drops is not None:
        drops[_SEEN] += len(body.css(IMG_TAGS))
    _remove_junk(tree, body)
    _remove_boilerplate(body)
    root = _choose_main(body, cfg) if cfg.choose_main else body
    _remove_link_clusters(root, cfg)
    if drops is not None:
        lost = drops[_SEEN] - len(root.css(IMG_TAGS))
        if lost:
            drops["image_in_boilerplate"] += lost
    images = _mark_images(root, base_url, page.url, cfg, drops)
    _mark_blocks(root)
    text = root.text(deep=True, separator="")
    doc = _assemble(text, images)
    gm = {
        "id": _doc_id(page),
        "url": page.url,
        "domain": _host(page.url),
        "crawl_date": page.crawl_date,
        "title": title,
        "filter_scores": {},
    }
    if page.warc_filename is not None:
        gm["warc_filename"] = page.warc_filename
        gm["warc_record_offset"] = page.warc_record_offset
        gm["warc_record_length"] = page.warc_record_length
    doc.general_metadata = gm
    if doc.n_texts == 0:
        return Drop("no_text", f"{doc.n_images} images, no text")
    if cfg.drop_no_images and doc.n_images == 0:
        return Drop("no_images")
    return doc


def nesting_depth(html: str, stop_at: int | None = None) -> int:
    """Element nesting depth of raw markup (void and auto-closing elements ignored).

    Approximate (no HTML5 tree-building rules), but cheap: one regex pass, no tree.
    """
    depth = best = 0
    for close, name in _TAG.findall(html):
        if name in _VOID:
            continue
        if close:
            if depth:
                depth -= 1
        else:
            depth += 1
            if depth > best:
                best = depth
                if stop_at is not None and best >= stop_at:
                    return best
    return best


def _doc_id(page: RawPage) -> str:
    if page.record_id:
        return page.record_id
    return hashlib.sha1(f"{page.url}\n{page.crawl_date or ''}".encode()).hexdigest()


# ---- noise removal ---------------------------------------------------------------------------
def _remove_junk(tree: LexborHTMLParser, body, max_share: float = 0.6) -> None:
    tree.strip_tags(JUNK_TAGS)
    regions = body.css(REGION_TAGS)
    if not regions:
        return
    total = len(body.text(deep=True, separator=" ").split())
    doomed = []
    for node in regions:
        # a <header> inside <article>/<main> usually holds the article title: keep those
        if node.tag == "header" and _has_ancestor(node, ("article", "main")):
            continue
        if total and len(node.text(deep=True, separator=" ").split()) >= max_share * total:
            continue
        doomed.append(node)
    for node in reversed(doomed):  # children before parents
        node.decompose()


def _has_ancestor(node, tags: tuple[str, ...]) -> bool:
    p = node.parent
    while p is not None:
        if p.tag in tags:
            return True
        p = p.parent
    return False


def _is_boilerplate(attrs: dict) -> bool:
    if "hidden" in attrs:
        return True
    if (attrs.get("aria-hidden") or "").strip().lower() == "true":
        return True
    style = attrs.get("style")
    if style and _HIDDEN_STYLE.search(style):
        return True
    role = attrs.get("role")
    if role and role.strip().lower() in BOILERPLATE_ROLES:
        return True
    for key in ("class", "id"):
        value = attrs.get(key)
        if value and _boilerplate_name(value):
            return True
    return False


@lru_cache(maxsize=1 << 16)
def _boilerplate_name(value: str) -> bool:
    """A class/id value naming boilerplate (cached: pages repeat their class names a lot)."""
    for token in value.split():
        low = token.lower()
        if low in BOILERPLATE_TOKENS:
            return True
        if low.startswith(_MODIFIER_PREFIXES):  # "has-sidebar", "category-ads": a state, not a region
            continue
        for part in _TOKEN_SPLIT.split(_CAMEL.sub("-", token).lower()):
            if part in BOILERPLATE_PARTS:
                return True
    return False


def _remove_boilerplate(body, max_share: float = 0.6) -> None:
    doomed = [
        n
        for n in body.css("[class], [id], [role], [hidden], [aria-hidden], [style]")
        if _is_boilerplate(n.attributes)
    ]
    if doomed:
        # a container that holds most of the page's text is the content, whatever its class says
        # (WordPress puts "category-social" or "has-sidebar" on the article or page wrapper)
        total = len(body.text(deep=True, separator=" ").split())
        if total:
            doomed = [n for n in doomed if len(n.text(deep=True, separator=" ").split()) < max_share * total]
    # children before parents (reverse document order): never touch a freed node
    for node in reversed(doomed):
        node.decompose()


def _choose_main(body, cfg: ExtractConfig):
    candidates = body.css("main, [role=main], article")
    if not candidates:
        return body
    if len(candidates) > 1:
        # nested main > article is fine (take the outermost); several sibling articles are a listing
        outer = [c for c in candidates if not _has_ancestor(c, ("main", "article"))]
        if len(outer) != 1:
            return body
        candidates = outer
    total = len(body.text(deep=True, separator=" ").split())
    main = candidates[0]
    if total and len(main.text(deep=True, separator=" ").split()) >= cfg.main_min_fraction * total:
        return main
    return body


def _remove_link_clusters(root, cfg: ExtractConfig) -> None:
    doomed = []
    for node in root.css("ul, ol, dl, table, p, div, td"):
        text = node.text(deep=True, separator=" ")
        n_chars = len(text.strip())
        if n_chars == 0:
            continue
        links = node.css("a")
        if not links:
            continue
        link_chars = sum(len(a.text(deep=True, separator=" ").strip()) for a in links)
        if link_chars > cfg.link_density * n_chars:
            if cfg.min_link_block_words and len(text.split()) >= cfg.min_link_block_words:
                continue
            if node.css_first(IMG_TAGS) is not None and not _only_linked_images(node):
                continue
            doomed.append(node)
    for node in reversed(doomed):
        node.decompose()


def _only_linked_images(node) -> bool:
    """True when every image inside sits inside a link (menus of icons), so removal loses no content."""
    return all(_has_ancestor(img, ("a",)) for img in node.css(IMG_TAGS))


# ---- images ---------------------------------------------------------------------------------
def _parse_dim(value: str | None) -> int | None:
    if not value:
        return None
    m = re.match(r"\s*(\d{1,6})(?:\.\d+)?\s*(px)?\s*$", value)
    return int(m.group(1)) if m else None


def _pick_src(attrs: dict) -> str:
    src = (attrs.get("src") or "").strip()
    lazy = ""
    for key in _LAZY_ATTRS:
        v = (attrs.get(key) or "").strip()
        if v:
            lazy = v
            break
    # lazy loaders put a placeholder (data: URI, 1x1 gif) in src and the real URL in data-src
    if lazy and (not src or src.startswith("data:") or "blank" in src or "placeholder" in src):
        return lazy
    if src:
        return src
    srcset = attrs.get("srcset") or attrs.get("data-srcset") or ""
    return _best_from_srcset(srcset)


def _best_from_srcset(srcset: str) -> str:
    """The largest candidate of a ``srcset`` (by width or density descriptor)."""
    best, best_score = "", -1.0
    for cand in srcset.split(","):
        parts = cand.strip().split()
        if not parts:
            continue
        score = 1.0
        if len(parts) > 1:
            d = parts[1]
            try:
                score = float(d[:-1]) if d[-1] in "wx" else 1.0
            except ValueError:
                score = 1.0
        if score > best_score:
            best, best_score = parts[0], score
    return best


_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"


def _host(url: str | None) -> str:
    try:
        return (urlsplit(url).hostname or "") if url else ""
    except ValueError:
        return ""


def _resolve(base: str, ref: str) -> str | None:
    """``ref`` resolved against ``base`` as a browser would (spaces and non-ASCII percent-encoded);
    None for a reference that cannot be a URL (e.g. a broken IPv6 host)."""
    try:
        url = urljoin(base, ref.strip())
        urlsplit(url).hostname  # noqa: B018 - raises ValueError on a malformed host
    except ValueError:
        return None
    if not url.isascii() or " " in url or "\t" in url:
        url = quote(url, safe=_URL_SAFE)
    return url


def _registered_domain(host: str) -> str:
    """Crude registrable domain (last two labels; three for short second-level ones like co.uk)."""
    labels = host.lower().strip(".").split(".")
    if len(labels) >= 3 and len(labels[-2]) <= 3 and len(labels[-1]) == 2:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _navigation_image(img, page_host: str) -> bool:
    """An image inside a link that leads to another site (ads, badges) or within the page ("top")."""
    p = img.parent
    for _ in range(4):  # the link is usually the direct parent, sometimes a few wrappers up
        if p is None:
            return False
        if p.tag == "a":
            href = (p.attributes.get("href") or "").strip()
            if href.startswith("#"):
                return True  # back-to-top arrows, in-page jump icons
            if not href.lower().startswith(("http://", "https://", "//")):
                return False
            try:
                parts = urlsplit(href if not href.startswith("//") else "http:" + href)
                host = parts.hostname or ""
            except ValueError:
                return False
            if parts.path.lower().endswith(IMAGE_EXTENSIONS):
                return False  # a link to the full-size image
            return (
                bool(host) and bool(page_host) and _registered_domain(host) != _registered_domain(page_host)
            )
        p = p.parent
    return False


def _mark_images(
    root, base_url: str, page_url: str, cfg: ExtractConfig, drops: Counter | None = None
) -> list[tuple[str, dict]]:
    """Replace each kept ``<img>`` with a marker ``\\x02i\\x03``; return ``[(url, metadata)]``."""
    page_host = _host(page_url)
    images: list[tuple[str, dict]] = []
    drops = Counter() if drops is None else drops
    for img in root.css(IMG_TAGS):
        attrs = img.attributes
        src = _pick_src(attrs)
        if not src:
            drops["image_without_src"] += 1
            img.decompose()
            continue
        if src.startswith("data:") and not cfg.keep_data_uri_images:
            drops["image_data_uri"] += 1
            img.decompose()
            continue
        url = src if src.startswith("data:") else _resolve(base_url, src)
        scheme = url.split(":", 1)[0].lower() if url else ""
        if scheme not in ("http", "https", "file", "data"):
            drops["image_bad_url"] += 1
            img.decompose()
            continue
        if cfg.drop_external_link_images and _navigation_image(img, page_host):
            drops["image_navigation_link"] += 1
            img.decompose()
            continue
        alt = attrs.get("alt")
        meta = {
            "url": url,
            "src": src,
            "alt_text": " ".join(alt.split()) if alt is not None else None,
            "width": _parse_dim(attrs.get("width")),
            "height": _parse_dim(attrs.get("height")),
        }
        img.replace_with(f"{IMG_OPEN}{len(images)}{IMG_CLOSE}")
        images.append((url, meta))
    return images


# ---- text blocks ----------------------------------------------------------------------------
def _mark_blocks(root) -> None:
    for br in root.css("br"):
        br.replace_with(LINE)
    for hr in root.css("hr"):
        hr.replace_with(PARA)
    for pre in root.css("pre"):
        # each line of preformatted text is marked so that its indentation survives
        code = pre.text(deep=True, separator="").strip("\n").replace("\r", "")
        pre.replace_with(PARA + PRE + code.replace("\n", LINE + PRE) + PARA)
    for node in root.css(BLOCK_TAGS):
        node.insert_before(PARA)
        node.insert_after(PARA)
    for node in root.css(LINE_TAGS):
        node.insert_before(LINE)
    for node in root.css(CELL_TAGS):
        node.insert_after(" ")


def _assemble(text: str, images: list[tuple[str, dict]]) -> Document:
    """Split the marked text into text nodes and image nodes in page order."""
    doc = Document()
    pieces = _IMG_MARK.split(text)
    # pieces: text, index, text, index, ..., text
    for k, piece in enumerate(pieces):
        if k % 2 == 1:
            url, meta = images[int(piece)]
            doc.add_image(url, meta)
            continue
        paragraphs = []
        for para in piece.split(PARA):
            lines = [
                line[1:].rstrip().expandtabs(4) if line.startswith(PRE) else " ".join(line.split())
                for line in para.split(LINE)
            ]
            lines = [ln for ln in lines if ln and not ln.isspace()]
            if lines:
                paragraphs.append("\n".join(lines))
        if paragraphs:
            doc.add_text("\n\n".join(paragraphs))
    return doc
