"""Override strings parsed once each, the plain ``key=value`` ones without the grammar.

A 1,000-trial sweep hands the launcher 1,000 lists of override strings: most strings repeat
in every list, and the one that varies is ``train.seed=17`` or ``optimizer.learning_rate=0.0003``.
Hydra's ANTLR grammar takes about 0.3 ms per string. :class:`OverrideCache` parses each
distinct string once, and a string that is a dotted key, ``=``, and one scalar token (an
integer, a float, a boolean, null or a bare word) is read by the regular expressions below,
written from Hydra's lexer (``hydra/grammar/OverrideLexer.g4``) and giving the same
:class:`~hydra.core.override_parser.types.Override` (a test compares them on many strings).
Anything else goes to Hydra's parser.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

# OverrideLexer.g4's fragments, for the single-token values handled here.
_DIGITS = r"[0-9](?:_?[0-9])*"
_INT_UNSIGNED = r"(?:0|[1-9](?:_?[0-9])*)"
_POINT_FLOAT = rf"(?:{_INT_UNSIGNED}?\.{_DIGITS}|{_INT_UNSIGNED}\.)"
_EXPONENT_FLOAT = rf"(?:(?:{_POINT_FLOAT}|{_INT_UNSIGNED})[eE][+-]?{_DIGITS})"
INT = re.compile(rf"[+-]?{_INT_UNSIGNED}")
FLOAT = re.compile(rf"[+-]?(?:{_EXPONENT_FLOAT}|{_POINT_FLOAT}|[Ii][Nn][Ff]|[Nn][Aa][Nn])")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
# A plain dotted key: no +/~ prefix, no @package, no config group path.
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# Words the lexer reads as other tokens than a string (its rules for them come before ID's).
_WORD_TOKENS = {"true": True, "false": False, "null": None}


def scalar(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` is one INT, FLOAT, BOOL, NULL or ID token, else ``(False, None)``."""
    if INT.fullmatch(text):
        return True, int(text)
    if FLOAT.fullmatch(text):
        return True, float(text)
    if WORD.fullmatch(text):
        lower = text.lower()
        return True, _WORD_TOKENS[lower] if lower in _WORD_TOKENS else text
    return False, None


def fast_parse(line: str) -> Optional[Any]:
    """The Override Hydra's parser gives for ``key=<one scalar token>``; None for any other string."""
    key, sep, text = line.partition("=")
    if not sep or not KEY.fullmatch(key):
        return None
    ok, value = scalar(text)
    if not ok:
        return None
    from hydra.core.override_parser.types import Override, OverrideType, ValueType

    return Override(type=OverrideType.CHANGE, key_or_group=key, value_type=ValueType.ELEMENT, _value=value,
                    package=None, input_line=line)


class OverrideCache:
    """Parsed overrides by their string: each distinct string parsed once, plain ones without the grammar."""

    def __init__(self) -> None:
        self._parsed: dict[str, Any] = {}
        self._parser: Any = None

    def parse(self, lines: Sequence[str]) -> list[Any]:
        """The Overrides of ``lines``, as Hydra's ``parse_overrides`` gives them (its errors included)."""
        out = []
        for line in lines:
            override = self._parsed.get(line)
            if override is None:
                override = fast_parse(line)
                if override is None:
                    if self._parser is None:
                        from hydra.core.override_parser.overrides_parser import OverridesParser

                        self._parser = OverridesParser.create()
                    [override] = self._parser.parse_overrides([line])
                self._parsed[line] = override
            out.append(override)
        return out
