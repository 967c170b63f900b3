"""Wikipedia XML dumps (``pages-articles*.xml[.bz2]``) to plain-text articles for language modelling.

:func:`iter_articles` streams ``<page>`` elements with ``xml.etree.ElementTree.iterparse`` (memory stays
flat on a full dump), keeps main-namespace, non-redirect pages and cleans their wikitext with
:func:`strip_markup`. The cleaner is a pragmatic one in the spirit of WikiExtractor, not a MediaWiki
parser: templates and tables are dropped (infoboxes, citations, navboxes), links become their visible
text, files/categories/interlanguage links, references, comments and HTML tags go, and the
bibliography-style trailing sections (References, External links, See also, ...) are dropped.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

from nemo_minitron.data.compressed import open_binary

# Link namespaces whose whole link is dropped (the image caption goes with the image).
_DROP_LINK_NS = {"file", "image", "category", "media"}
# Pages outside the article namespace when the dump has no <ns> element (very old dumps).
_NON_ARTICLE_PREFIXES = (
    "media:", "special:", "talk:", "user:", "user talk:", "wikipedia:", "wikipedia talk:",
    "file:", "image:", "file talk:", "mediawiki:", "template:", "template talk:", "help:",
    "category:", "portal:", "book:", "draft:", "timedtext:", "module:", "gadget:", "topic:",
)
# Trailing sections that are lists of citations or links, not prose.
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
}

# Removed markup leaves this mark, so that a line holding nothing else is dropped instead of
# becoming a paragraph break; the marks are deleted line by line. (XML text cannot contain NUL.)
_GONE = "\x00"

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
# Elements whose content is not prose: drop them with their content.
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|graph|imagemap|chem|ce|hiero|"
    r"templatedata|mapframe|references)\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_SELF_CLOSING = re.compile(r"<(ref|references)\b[^>]*/>", re.I)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_BRACES = re.compile(r"\{\{+|\}\}+|^[ \t]*\{\||^[ \t]*\|\}", re.M)
_LINK_TOKENS = re.compile(r"\[\[|\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_PAREN_LEAD = re.compile(r"\(\s*(?:[,;:]\s*)+")  # "(;, Akhilleus,)" left by removed templates
_PAREN_TRAIL = re.compile(r"(?:\s*[,;:])+\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_PUNCT = re.compile(r" +([,.;:!?)])")
_ALNUM = re.compile(r"\w")


def _open_pieces(n: int) -> list:
    """Split a run of ``n`` ``{`` into templates ("t", 2 braces) and parameters ("p", 3 braces)."""
    pieces = []
    while n >= 2:
        take = 2 if n in (2, 4) else 3
        pieces.append(("t" if take == 2 else "p", take))
        n -= take
    return pieces


def _drop_nested(text: str) -> str:
    """Remove ``{{templates}}``, ``{{{parameters}}}`` and ``{| tables |}``, all nested in any way.

    One pass with a stack of openers. An opener that is never closed (truncated or broken markup)
    is removed on its own rather than swallowing the rest of the article.
    """
    spans = []  # (start, end) of removed text
    stack: list = []  # (kind, start, token length); kind "t" template, "p" parameter, "b" table
    for m in _BRACES.finditer(text):
        tok = m.group().strip(" \t")
        at = m.end() - len(tok)
        if tok == "{|":
            stack.append(("b", at, 2))
        elif tok.startswith("{"):
            for kind, width in _open_pieces(len(tok)):
                stack.append((kind, at, width))
                at += width
        elif tok == "|}":
            if stack and stack[-1][0] == "b":
                spans.append((stack.pop()[1], m.end()))
        else:  # a run of closing braces closes templates/parameters from the innermost out
            n = len(tok)
            while stack and stack[-1][0] != "b":
                need = 3 if stack[-1][0] == "p" else 2
                if n < need:
                    break
                at += need
                n -= need
                spans.append((stack.pop()[1], at))
    spans.extend((start, start + width) for _, start, width in stack)  # unclosed openers
    if not spans:
        return text
    out = []
    pos = 0
    for start, end in sorted(spans):
        if end <= pos:
            continue  # inside a span already removed
        if start >= pos:
            out.append(text[pos:start] + _GONE)
        pos = max(pos, end)
    out.append(text[pos:])
    return "".join(out)


def _link_text(inner: str) -> str:
    """Visible text of the inside of ``[[...]]`` (already free of nested links)."""
    target, _, label = inner.partition("|")
    t = target.strip()
    if ":" in t and not t.startswith(":"):
        ns = t.split(":", 1)[0].strip().lower()
        if ns in _DROP_LINK_NS:
            return _GONE
        if not label and re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)*", ns):
            return _GONE  # interlanguage link such as [[fr:Anarchisme]]
    if label:
        return label.rsplit("|", 1)[-1] if "|" in label else label
    t = t.lstrip(":")
    if t.startswith("#"):
        t = t[1:]
    return t.split("#", 1)[0] if "#" in t and not t.startswith("#") else t


def _replace_links(text: str) -> str:
    """``[[target|label]]`` → label, ``[[target]]`` → target; files/categories dropped (nested)."""
    out = []
    stack: list = []  # output buffers, one per open [[
    pos = 0
    for m in _LINK_TOKENS.finditer(text):
        piece = text[pos:m.start()]
        pos = m.end()
        (stack[-1] if stack else out).append(piece)
        if m.group() == "[[":
            stack.append([])
        elif stack:
            inner = "".join(stack.pop())
            (stack[-1] if stack else out).append(_link_text(inner))
        else:
            out.append("]]")  # stray closer: keep as text, removed below
    tail = text[pos:]
    while stack:  # unclosed [[: keep its text
        tail = "".join(stack.pop()) + tail
    out.append(tail)
    return "".join(out).replace("[[", "").replace("]]", "")


def strip_markup(wikitext: str) -> str:
    """Plain text of an article's wikitext, paragraphs separated by one blank line."""
    text = _COMMENT.sub(_GONE, wikitext.replace(_GONE, ""))
    text = _SELF_CLOSING.sub(_GONE, text)
    text = _DROP_ELEMENTS.sub(_GONE, text)
    text = _drop_nested(text)
    text = _replace_links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)

    items: list = []  # (heading level or 0 for a text line, text)
    skip_level = 0  # > 0 while inside a dropped section of that heading level
    for line in text.split("\n"):
        had_markup = _GONE in line
        line = line.replace(_GONE, "").strip()
        if had_markup and not line:
            continue  # the line held only removed markup
        h = _HEADING.match(line)
        if h:
            level, title = len(h.group(1)), h.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _DROP_SECTIONS else 0
            if not skip_level and title:
                items.append((level, title))
            continue
        if skip_level:
            continue
        if line.startswith("----"):
            line = ""
        if line.startswith("|") or line.startswith("!"):  # stray table rows
            continue
        line = line.lstrip("*#:;").strip()
        line = _EMPTY_PARENS.sub("", line)
        line = _PAREN_TRAIL.sub(")", _PAREN_LEAD.sub("(", line))
        line = _SPACES.sub(" ", line).strip()
        line = _SPACE_PUNCT.sub(r"\1", line)
        if line and not _ALNUM.search(line):
            continue
        items.append((0, line))

    # drop headings whose section turned out empty (next heading of the same or a higher level)
    paras: list = []
    for i, (level, line) in enumerate(items):
        if level:
            nxt = next((lv for lv, ln in items[i + 1:] if lv or ln), None)
            if nxt is None or (nxt and nxt <= level):
                continue
            paras.append("")
        paras.append(line)
    text = "\n".join(paras).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_articles(
    path: Union[str, Path], min_chars: int = 200
) -> Iterator[Tuple[str, str]]:
    """Yield ``(title, text)`` for every article of a MediaWiki XML dump (``.xml``, compressed or not).

    Skips redirects, pages outside the main namespace and articles whose cleaned text is shorter
    than ``min_chars`` characters (stubs, disambiguation pages, lists that were all templates).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Wikipedia dump {path} does not exist")
    with open_binary(path) as f:
        pages = 0
        for title, ns, redirect, wikitext in _pages(path, f):
            pages += 1
            if redirect or wikitext.lstrip()[:9].upper() == "#REDIRECT":
                continue
            if ns is not None and ns != "0":
                continue
            if ns is None and title.lower().startswith(_NON_ARTICLE_PREFIXES):
                continue
            text = strip_markup(wikitext)
            if len(text) >= min_chars:
                yield title, text
        if not pages:  # other XML: its text would be dropped in silence
            raise ValueError(f"{path} holds no <page> elements: not a MediaWiki XML dump "
                             "(give other text as .txt, .jsonl or .json)")


def _pages(path: Path, f) -> Iterator[Tuple[str, Optional[str], bool, str]]:
    """(title, namespace, redirect, wikitext) of every ``<page>`` of an open dump."""
    try:
        context = ET.iterparse(f, events=("start", "end"))
        root = None
        for event, elem in context:
            if root is None:
                root = elem
            if event != "end" or _local(elem.tag) != "page":
                continue
            title, ns, redirect, wikitext = "", None, False, ""
            for child in elem.iter():
                tag = _local(child.tag)
                if tag == "title":
                    title = child.text or ""
                elif tag == "ns":
                    ns = (child.text or "").strip()
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    wikitext = child.text or ""
            elem.clear()
            root.clear()  # drop the processed pages from the tree
            yield title, ns, redirect, wikitext
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a MediaWiki XML dump ({e}); a Wikipedia dump is "
                         "*.xml or *.xml.bz2, other compressed text is read by its inner suffix "
                         "(corpus.txt.bz2, corpus.jsonl.bz2)") from None
