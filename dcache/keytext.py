"""How a key is shown to a person: keys are arbitrary bytes, a terminal or a metric label wants safe text.

``printable_key`` is one-to-one (two different keys never show the same
text, unless ``limit`` cut them): UTF-8 text stays as it is, a backslash is
doubled, a byte that is not UTF-8 becomes ``\\xNN`` and a character that is
not printable (a newline, an escape sequence, a zero-width space) its
Python escape (``\\n``, ``\\x1b``, ``\\u200b``). So a key can neither move a
terminal's cursor nor pass for another key.
"""

from __future__ import annotations

__all__ = ["printable_key"]


def printable_key(key: bytes, limit: int = 0) -> str:
    """``key`` as printable text (see the module note); with ``limit`` > 0, at most ``limit`` characters, ending in ``...`` if cut."""
    text = key.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if 0 < limit < len(text):
        text = text[: max(limit - 3, 0)] + "..."
    return text
