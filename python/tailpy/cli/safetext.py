"""Strings from outside (a node's hostname and OS, user names, tags, key descriptions, DNS names, control's
messages) made safe to print for people.

A terminal obeys the control characters in what it is given: ESC starts an escape sequence (colours, cursor
moves, OSC 0 sets the window title, OSC 8 a hyperlink), a newline or a carriage return forges a line of its
own, and the Unicode bidirectional controls reorder what is shown (CVE-2021-42574, "Trojan Source"). And rich
reads ``[...]`` in a string as its console markup (a style, a ``[link=...]``; an unbalanced ``[/bold]``
raises rich.errors.MarkupError). So every string from outside goes through :func:`visible` before it is
printed for people (each control character becomes a visible escape such as ``\\x1b`` or ``\\n``), and
reaches rich as a :class:`rich.text.Text` (:func:`cell`, :func:`assemble`) or through :func:`markup`, never
as markup. ``--json`` output needs none of this: :func:`json.dumps` escapes control characters itself (RFC
8259 section 7) and the values stay exact.
"""

from __future__ import annotations

import sys

import click
from rich.markup import escape
from rich.text import Text

# The bidirectional formatting controls: LRE, RLE, PDF, LRO, RLO (U+202A..U+202E) and LRI, RLI, FSI, PDI
# (U+2066..U+2069) (Unicode Standard Annex #9, section 2).
BIDI_CONTROLS = frozenset(range(0x202A, 0x202F)) | frozenset(range(0x2066, 0x206A))

_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _escape_of(cp: int) -> str:
    if cp in _NAMED:
        return _NAMED[cp]
    return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}"


# LINE SEPARATOR and PARAGRAPH SEPARATOR: line breaks to some terminals and viewers (as in the logs'
# escaping, tailpy.httpguard.escape_controls).
LINE_SEPARATORS = frozenset({0x2028, 0x2029})

# C0 (U+0000..U+001F), DEL (U+007F), C1 (U+0080..U+009F), the line separators and the bidi controls -> their
# visible escape.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), *sorted(LINE_SEPARATORS), *sorted(BIDI_CONTROLS)]
_TABLE: dict[int, str] = {cp: _escape_of(cp) for cp in _CONTROLS}
_TABLE_KEEP_LINES: dict[int, str] = {cp: e for cp, e in _TABLE.items() if cp not in (0x09, 0x0A)}


def visible(value: object) -> str:
    """``str(value)`` with each control character replaced by a visible escape: ``\\t``, ``\\n``, ``\\r``,
    ``\\xNN`` for the rest of C0 (ESC is ``\\x1b``), DEL and C1, ``\\uNNNN`` for U+2028, U+2029 and the bidi
    controls (U+202A..U+202E, U+2066..U+2069). One line, whatever ``value`` holds; other characters (and
    backslashes) as they are."""
    return str(value).translate(_TABLE)


def visible_lines(value: object) -> str:
    """As :func:`visible`, but newlines and tabs stay: text meant to span lines (a policy file, a Prometheus
    exposition, an error that lists one problem a line). A carriage return is still shown as ``\\r`` (it
    would overwrite the start of its line)."""
    return str(value).translate(_TABLE_KEEP_LINES)


def markup(value: object) -> str:
    """``value`` for a rich markup string: :func:`visible`, then :func:`rich.markup.escape` (``[`` that
    would open a tag becomes ``\\[``)."""
    return escape(visible(value))


def cell(value: object) -> Text:
    """``value`` as a rich :class:`~rich.text.Text` (one line, :func:`visible`): a table cell or a part of a
    line that rich prints as it is (no markup, no emoji codes, no highlighting)."""
    return Text(visible(value))


def assemble(*parts: str | tuple[str, str]) -> Text:
    """A line of rich :class:`~rich.text.Text` from ``parts``: a plain string or ``(text, style)``, each made
    :func:`visible`; for a line that mixes a style of ours with strings from outside."""
    return Text.assemble(*((visible(p[0]), p[1]) if isinstance(p, tuple) else visible(p) for p in parts))


def say(line: object, err: bool = False) -> None:
    """Print one line for people (:func:`visible`) with :func:`click.echo` (to stderr with ``err``)."""
    click.echo(visible(line), err=err)


def say_lines(text: object, err: bool = False) -> None:
    """Print ``text`` that may span lines (:func:`visible_lines`) with :func:`click.echo`."""
    click.echo(visible_lines(text), err=err)


def fields(pairs: list[tuple[str, object]], width: int, sep: str = " ") -> None:
    """Print ``label:`` lines (a ``show`` command's output): the label and its colon padded to ``width``,
    then ``sep``, then the value made :func:`visible`."""
    for label, value in pairs:
        click.echo(f"{label + ':':{width}}{sep}{visible(value)}")


def on_terminal() -> bool:
    """Whether stdout is a terminal (output a person reads, rather than a pipe or a file a program reads)."""
    return sys.stdout.isatty()


__all__ = [
    "BIDI_CONTROLS",
    "assemble",
    "cell",
    "fields",
    "markup",
    "on_terminal",
    "say",
    "say_lines",
    "visible",
    "visible_lines",
]
