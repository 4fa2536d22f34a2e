"""The one exception every data loader raises for input it cannot use."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Input data that cannot be loaded; the message names the file and, when known, the line.

    Either pass a complete message (``DataError("u.data line 17: expected 4 fields, got 3")``) or
    let the constructor prefix it: ``DataError("expected 4 fields, got 3", file=path, line=17)``.
    """

    def __init__(self, message: str, *, file: str | Path | None = None,
                 line: int | None = None) -> None:
        self.file = Path(file).name if file is not None else None
        self.line = line
        self.detail = message
        super().__init__(_format(message, self.file, line))


def _format(message: str, file: str | None, line: int | None) -> str:
    if file is None:
        return message
    if line is None:
        return f"{file}: {message}"
    return f"{file} line {line}: {message}"
