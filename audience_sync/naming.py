"""Turn an audience name into the trait key Crisp receives (e.g. ``order_completed_last_30days``).

The rule is segmentio/go-snakecase's, the function Segment documents for snake_casing names, so
keys match what Segment Engage would produce. Pure: no I/O, no logging.
"""

from __future__ import annotations

import re

__all__ = ["TRAIT_KEY_PATTERN", "dropped_non_ascii", "trait_key"]

# A valid key: lower-case ASCII words joined by single underscores, none leading or trailing.
# Anchored with \A and \Z, not ^ and $: `$` also matches before a trailing newline, so
# `TRAIT_KEY_PATTERN.match("vip\n")` would accept an explicit key that is not valid.
TRAIT_KEY_PATTERN = re.compile(r"\A[a-z0-9]+(?:_[a-z0-9]+)*\Z")

# One word: a run of upper-case letters and digits, then a run of lower-case letters and digits
# (each run as long as possible), or just the latter when the word starts lower-case. Hence an
# upper-case letter after a lower-case one starts a new word (`sampleText`), while an upper-case
# run keeps the lower-case letters that follow it (`CStringRef` -> `cstring`, `ref`) and digits
# stay with the letters they touch (`Top10Users` -> `top10`, `users`). Everything else, including
# `_` and every non-ASCII character, matches no word and so separates words. The classes are
# spelled out rather than `\w`/`\d`, which would also match non-ASCII letters and digits.
_WORD = re.compile(r"[A-Z0-9]+[a-z0-9]*|[a-z0-9]+")


def trait_key(name: str) -> str:
    """Return the snake_case trait key for the audience ``name``.

    Raises ``ValueError`` when ``name`` has no ASCII letter or digit, since no key can be derived
    from it and the operator has to choose one.
    """
    words = _WORD.findall(name)
    if not words:
        raise ValueError(
            f"audience name {name!r} has no ASCII letters or digits; set an explicit `key` for it"
        )
    return "_".join(words).lower()


def dropped_non_ascii(name: str) -> bool:
    """Tell whether ``name`` has non-ASCII characters, which :func:`trait_key` drops.

    Accents are dropped, not folded (``Café`` -> ``caf``), so the caller warns once and the
    operator can set an explicit key instead.
    """
    return not name.isascii()
