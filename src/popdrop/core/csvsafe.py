"""CSV that a spreadsheet opens as data, never as a formula: the one writer every export
uses (contacts, consent ledger, segments, voucher batches, the CLI's files).

Rules: every cell of every row goes through `safe_cell`, whatever its column, because
any text may come from outside (an email such as `=1+1@example.com` is a valid address).
A text cell that a spreadsheet would evaluate (it starts with `=`, `+`, `-`, `@`, a tab
or a line break) gets a leading `'`, the OWASP advice; a plain number (`+33612345678`,
`-5`, `1.5`) is left alone: it cannot call anything, and a phone number must survive an
export → import round trip. `restore_cell` undoes the quote when such a file comes back
through the importer, so an exported address re-imports as itself.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from typing import IO, Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def safe_cell(value: Any) -> Any:
    """The cell as written: None as empty, numbers as they are, text neutralised."""
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return value
    text = str(value)
    if text.startswith(FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def restore_cell(text: str) -> str:
    """A cell as `safe_cell` wrote it → the original text (other cells unchanged)."""
    if text[:1] == "'" and text[1:].startswith(FORMULA_START):
        return text[1:]
    return text


class SafeWriter:
    """`csv.writer` whose every cell is neutralised."""

    def __init__(self, handle: IO[str], *, lineterminator: str = "\n") -> None:
        self._writer = csv.writer(handle, lineterminator=lineterminator)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([safe_cell(cell) for cell in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_text(rows: Iterable[Iterable[Any]]) -> str:
    """Rows as CSV text (a chunk of a streamed export, or a whole small file)."""
    out = io.StringIO()
    SafeWriter(out).writerows(rows)
    return out.getvalue()
