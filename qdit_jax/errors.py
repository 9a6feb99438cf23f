"""The one exception type for bad user input: the CLI prints its message as a single line."""
from __future__ import annotations


class QditError(ValueError):
    """Bad input (file, config, flag). The message names the problem and how to fix it."""
