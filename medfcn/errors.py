"""The one exception type for mistakes a user can fix (bad path, bad file, bad option), and
the one warning type for inputs that are probably mistakes but still processed.

The CLI prints a :class:`UserError` as one line and exits with code 2; anything else is a
bug and keeps its traceback (``--debug`` shows tracebacks for user errors too).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = [
    "PEER_LOST_STATUS",
    "UserError",
    "FailedOnAnotherRank",
    "InputWarning",
    "find_user_error",
    "collected_input_warnings",
]


class UserError(Exception):
    """An error in the user's input; the message names the file and says what to do."""


# The exit status of a process of several that stopped because another one failed first: it
# says nothing (the one that failed, or the launcher, says why); see medfcn.distributed. (2 is a
# user error, 3 `medfcn infer --continue-on-error` with scans that failed.)
PEER_LOST_STATUS = 4


class FailedOnAnotherRank(UserError):
    """In one process of several (:mod:`medfcn.distributed`): this process's work was fine or
    failed alike, and another process says why; every process stops, the command line prints
    nothing for this one and exits with :data:`PEER_LOST_STATUS`."""


class InputWarning(UserWarning):
    """An input that is probably a mistake but still processed (e.g. a label map given as the
    scan); the CLI prints it as one line ``medfcn: warning: ...``."""


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind ``err``, following ``__cause__``/``__context__`` chains.

    MONAI's config engine wraps errors raised while evaluating a config entry in
    ``RuntimeError("Failed to evaluate ...")``; the user's mistake is the innermost cause.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def innermost_cause(err: BaseException) -> BaseException:
    """The end of ``err``'s ``__cause__`` chain (``err`` itself when nothing caused it)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def root_message(err: BaseException) -> str:
    """``"<Type>: <first line>"`` of the innermost cause of ``err`` (MONAI wraps reader and
    config errors in generic RuntimeErrors), at most 300 characters."""
    err = innermost_cause(err)
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def collected_input_warnings(once: bool = False) -> Iterator[list[str]]:
    """Collect the messages of the :class:`InputWarning` s raised in the block (each one, also
    repeats) into the list it yields, filled when the block ends, e.g. for a scan's row of
    ``volumes.csv``. Every warning caught, of any kind, is re-emitted then, also when the block
    raises, so the CLI still prints each as it did. With ``once``, a warning raised again with
    the same category and message (several models checking one scan) counts and is re-emitted
    once."""
    messages: list[str] = []
    caught: list[warnings.WarningMessage] = []
    said: set[tuple[type, str]] = set()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputWarning)
            yield messages
    finally:
        for w in caught:
            if once and (w.category, str(w.message)) in said:
                continue
            said.add((w.category, str(w.message)))
            if issubclass(w.category, InputWarning):
                messages.append(str(w.message))
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
