"""The one kind of error a user can fix: bad settings, a wrong path or argument, a server
that cannot be reached.

Library code raises a `UserError` (or a subclass) whose message names the problem and the
fix in one line; `drseg`'s error handler prints it as ``drseg <verb>: error: <message>`` and
exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
This module imports nothing of drseg, so every layer can raise it.
"""

from __future__ import annotations


class UserError(Exception):
    """Cannot act as asked; the message says what is wrong and how to fix it."""
