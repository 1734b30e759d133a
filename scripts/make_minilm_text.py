"""Extract English sentences for MiniLM calibration and validation from the Python Language Reference.

The source is `pydoc_data.topics`, the plain-text rendering of the Language Reference that CPython ships
in its standard library for `help()` (PSF License Version 2, see calibration_data/minilm/SOURCE.md). It
is real, edited English prose, present on every Python install, so the data needs no download.

    python scripts/make_minilm_text.py            # writes calibration_data/minilm/{calibration,validation}.txt

The result depends only on the text of topics.py, which changes between Python releases: the committed
files were made with CPython 3.11.7 (sha256 below). Another version warns and gives different sentences.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
import tempfile
from pathlib import Path

N_CALIBRATION = 800
N_VALIDATION = 200
MIN_WORDS, MAX_WORDS = 6, 40
SEED = 0
SOURCE_SHA256 = "abaa56a64551d8eead1b19cbae3c6db443f99f0cab81df07bed3cb75c0db9346"  # CPython 3.11.7 topics.py

# A sentence ends at . ! or ? followed by space and a capital letter or opening quote. Lowercase after
# "e.g." or "i.e." therefore does not split, which is what we want.
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["(]?[A-Z])')
# Marks of code, grammar or markup rather than prose: brackets, operators, prompts, paths, calls, and
# ASCII single quotes or doubled double quotes (prose uses ’; those quote string literals).
_CODE_LIKE = re.compile(r"[{}'\[\]=<>|\\*#~^@`$]|__|\(\)|>>>|::|\.\.\.|://|\b\w+\.\w+\(|" + '""')
# A quoted name such as "len()", "__dict__" or "os.path" is how the reference names things in prose;
# it is masked before the code check, so only sentences with real code in them are dropped.
_QUOTED_NAME = re.compile(r'"[A-Za-z_][\w.]*(?:\(\))?"')
# Sphinx renders *emphasis* and **strong** with asterisks; they are markup, not text.
_EMPHASIS = re.compile(r"\*{1,2}([A-Za-z][^*]*?)\*{1,2}")
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")
# List bullets and footnote numbers at the start of a paragraph.
_ITEM_MARK = re.compile(r"^(?:[*\-] |\[\d+\] |\d+\. )")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs whose first line is not indented, joined into one line each.

    An indented first line starts a code example, grammar rule or quoted block; continuation lines of
    a list item are indented too, so only the first line decides. Tables and headings are dropped.
    """
    paragraphs: list[str] = []
    blocks = re.split(r"\n\s*\n", text)
    for block in blocks:
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if len(lines) >= 2 and _HEADING_RULE.match(lines[1].strip()):
            lines = lines[2:]  # a title and its ***** / ===== rule
        if not lines or lines[0].startswith((" ", "\t")) or lines[0].startswith(("+", "|")):
            continue
        joined = " ".join(ln.strip() for ln in lines)
        paragraphs.append(_ITEM_MARK.sub("", joined))
    return paragraphs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    masked = _QUOTED_NAME.sub("name", sentence)
    if _CODE_LIKE.search(masked):
        return False
    visible = [c for c in masked if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    # Mostly letters: a sentence dense in digits, quotes and punctuation is an example, not prose.
    return letters >= 0.85 * len(visible)


def extract(topics: dict[str, str]) -> list[str]:
    """Deduplicated prose sentences, in topic-name order then text order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in sorted(topics):
        for paragraph in _prose_paragraphs(topics[name]):
            paragraph = _EMPHASIS.sub(r"\1", re.sub(r"\s+", " ", paragraph).strip())
            for sentence in _SENTENCE_END.split(paragraph):
                key = sentence.casefold()
                if _is_prose(sentence) and key not in seen:
                    seen.add(key)
                    out.append(sentence)
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("calibration_data/minilm"))
    args = parser.parse_args(argv)

    import pydoc_data.topics as source

    digest = hashlib.sha256(Path(source.__file__).read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        print(
            f"warning: {source.__file__} (Python {sys.version.split()[0]}) is not the 3.11.7 text the "
            f"committed files came from (sha256 {digest[:12]}...); the sentences will differ",
            file=sys.stderr,
        )
    sentences = extract(source.topics)
    needed = N_CALIBRATION + N_VALIDATION
    if len(sentences) < needed:
        print(f"error: only {len(sentences)} sentences extracted, {needed} needed", file=sys.stderr)
        return 1
    random.Random(SEED).shuffle(sentences)
    _write_lines(args.out / "calibration.txt", sentences[:N_CALIBRATION])
    _write_lines(args.out / "validation.txt", sentences[N_CALIBRATION:needed])
    print(
        f"{len(sentences)} sentences from {source.__file__} (sha256 {digest}); wrote "
        f"{N_CALIBRATION} to {args.out / 'calibration.txt'} and {N_VALIDATION} to {args.out / 'validation.txt'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
