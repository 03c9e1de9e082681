"""HuJSON: JSON with ``//`` and ``/* */`` comments and trailing commas, as Tailscale's policy files use it.

:func:`parse` reads the text into plain Python values (dict, list, str, int, float, bool, None) and records
where each value starts, so that a checker can point at ``line, column`` of any element: positions are
keyed by the path of the value (``("acls", 2, "src", 0)``; ``()`` is the whole document), and an object
key's own position is kept under the path followed by :data:`KEY`. Lines and columns are 1-based, columns
count characters. Any malformed input raises :class:`HuJSONError` (a subclass of ``ValueError``) with the
position: the only exception :func:`parse` raises.

Grammar: RFC 8259 JSON, plus comments wherever whitespace may appear and one optional comma after the last
element of an array or object (the "JWCC" form of github.com/tailscale/hujson). Duplicate object keys are
refused (Tailscale refuses them too); nesting deeper than :data:`MAX_DEPTH` is refused.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

MAX_DEPTH = 128
KEY = "\x00key"
"""Path element under which an object key's own position is recorded (``path + (KEY, name)``)."""

Path = tuple[Any, ...]

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')


class HuJSONError(ValueError):
    """Malformed HuJSON: ``line`` and ``column`` (1-based) where the problem is, ``message`` what it is."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column


class Document:
    """A parsed HuJSON text: ``value`` and the position of every element (:meth:`position`)."""

    def __init__(self, text: str, value: Any, offsets: dict[Path, int]) -> None:
        self.text = text
        self.value = value
        self._offsets = offsets
        self._lines = [0] + [m.end() for m in re.finditer("\n", text)]

    def locate(self, offset: int) -> tuple[int, int]:
        """(line, column), 1-based, of character ``offset``."""
        i = bisect.bisect_right(self._lines, offset) - 1
        return i + 1, offset - self._lines[i] + 1

    def position(self, path: Path) -> tuple[int, int] | None:
        """Where the value at ``path`` starts (the nearest enclosing value when ``path`` is not recorded);
        None only for an empty document."""
        p = tuple(path)
        while p not in self._offsets and p:
            p = p[:-1]
        off = self._offsets.get(p)
        return None if off is None else self.locate(off)


BOM = "\ufeff"


def decode(data: bytes) -> str:
    """``data`` as UTF-8 text. Raises HuJSONError with the line and column (of the characters decoded so
    far, so as an editor shows them) of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        raise HuJSONError(f"invalid UTF-8 (byte 0x{data[e.start]:02x})", line, column) from None


def parse(text: str) -> Document:
    """Parse ``text``. A leading byte order mark (U+FEFF, as some editors write) is skipped; positions
    count from the character after it. Raises HuJSONError (with line and column) for anything
    malformed."""
    text = text.removeprefix(BOM)
    p = _Parser(text)
    p.skip()
    value = p.value((), 0)
    p.skip()
    if p.i != len(text):
        p.fail("unexpected text after the end of the document")
    return Document(text, value, p.offsets)


class _Parser:
    def __init__(self, text: str) -> None:
        self.t = text
        self.i = 0
        self.offsets: dict[Path, int] = {}
        self._lines: list[int] | None = None

    def fail(self, message: str, at: int | None = None) -> None:
        off = self.i if at is None else at
        lines = [0] + [m.end() for m in re.finditer("\n", self.t[:off])]
        raise HuJSONError(message, len(lines), off - lines[-1] + 1)

    def skip(self) -> None:
        t, n = self.t, len(self.t)
        while self.i < n:
            c = t[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif t.startswith("//", self.i):
                j = t.find("\n", self.i)
                self.i = n if j < 0 else j + 1
            elif t.startswith("/*", self.i):
                j = t.find("*/", self.i + 2)
                if j < 0:
                    self.fail("unterminated /* comment")
                self.i = j + 2
            else:
                return

    def value(self, path: Path, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH} levels")
        t = self.t
        if self.i >= len(t):
            self.fail("unexpected end of input: a value is missing")
        self.offsets[path] = self.i
        c = t[self.i]
        if c == "{":
            return self.obj(path, depth)
        if c == "[":
            return self.arr(path, depth)
        if c == '"':
            return self.string()
        for word, v in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, self.i):
                self.i += len(word)
                return v
        m = _NUMBER.match(t, self.i)
        if m is None or m.end() == self.i:
            self.fail(f"unexpected character {c!r}: expected a value")
        assert m is not None
        self.i = m.end()
        s = m.group()
        if "." in s or "e" in s or "E" in s:
            f = float(s)
            if f != f or f in (float("inf"), float("-inf")):
                self.fail(f"number {s} is out of range", m.start())
            return f
        if len(s) > 400:
            self.fail("number is too long", m.start())
        return int(s)

    def obj(self, path: Path, depth: int) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        while True:
            self.skip()
            if self.i >= len(self.t):
                self.fail("unexpected end of input inside an object: '}' is missing")
            if self.t[self.i] == "}":
                self.i += 1
                return out
            if self.t[self.i] != '"':
                self.fail("expected a quoted object key or '}'")
            at = self.i
            key = self.string()
            if key in out:
                self.fail(f"duplicate key {key!r}", at)
            self.offsets[(*path, KEY, key)] = at
            self.skip()
            if self.i >= len(self.t) or self.t[self.i] != ":":
                self.fail(f"expected ':' after key {key!r}")
            self.i += 1
            self.skip()
            out[key] = self.value((*path, key), depth + 1)
            self.skip()
            if self.i < len(self.t) and self.t[self.i] == ",":
                self.i += 1
            elif self.i < len(self.t) and self.t[self.i] == "}":
                continue
            else:
                self.fail("expected ',' or '}' in an object")

    def arr(self, path: Path, depth: int) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        while True:
            self.skip()
            if self.i >= len(self.t):
                self.fail("unexpected end of input inside an array: ']' is missing")
            if self.t[self.i] == "]":
                self.i += 1
                return out
            out.append(self.value((*path, len(out)), depth + 1))
            self.skip()
            if self.i < len(self.t) and self.t[self.i] == ",":
                self.i += 1
            elif self.i < len(self.t) and self.t[self.i] == "]":
                continue
            else:
                self.fail("expected ',' or ']' in an array")

    def string(self) -> str:
        t = self.t
        start = self.i
        self.i += 1
        parts: list[str] = []
        while True:
            m = _PLAIN.match(t, self.i)
            assert m is not None
            parts.append(m.group())
            self.i = m.end()
            if self.i >= len(t):
                self.fail("unterminated string", start)
            c = t[self.i]
            if c == '"':
                self.i += 1
                return "".join(parts)
            if c != "\\":
                self.fail("control character in a string: escape it")
            esc = t[self.i + 1 : self.i + 2]
            if esc in _ESCAPES:
                parts.append(_ESCAPES[esc])
                self.i += 2
            elif esc == "u":
                hexdigits = t[self.i + 2 : self.i + 6]
                if len(hexdigits) != 4 or not all(h in "0123456789abcdefABCDEF" for h in hexdigits):
                    self.fail("bad \\u escape: four hex digits expected")
                code = int(hexdigits, 16)
                self.i += 6
                low = t[self.i + 2 : self.i + 6] if t.startswith("\\u", self.i) else ""
                if (
                    0xD800 <= code < 0xDC00
                    and len(low) == 4
                    and all(h in "0123456789abcdefABCDEF" for h in low)
                ):
                    lo = int(low, 16)
                    if 0xDC00 <= lo < 0xE000:  # a UTF-16 surrogate pair: one character
                        code = 0x10000 + ((code - 0xD800) << 10) + (lo - 0xDC00)
                        self.i += 6
                parts.append(chr(code))
            else:
                self.fail(f"bad escape \\{esc}")


__all__ = ["BOM", "KEY", "MAX_DEPTH", "Document", "HuJSONError", "decode", "parse"]
