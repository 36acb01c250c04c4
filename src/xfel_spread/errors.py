"""Problems with the user's input, as opposed to bugs (in the spirit of DIALS's ``Sorry``).

A command of the package reports a :class:`UserInputError` as one line, ``program: error: message``,
and exits with status 1 (``xfel_spread.cli.common.run_command``); so it does for the ``OSError``
subclasses in :data:`USER_PATH_ERRORS`, which name a path the user gave (a missing input, an output
directory that does not exist). Any other exception is a bug: it keeps its traceback.

Every input-error class of the package derives from :class:`UserInputError` and keeps its older
base too (``class ConfigError(UserInputError, ValueError)``), so ``except ValueError`` still works.
"""

from __future__ import annotations


class UserInputError(Exception):
    """An input of the user's (file, setting, option) that cannot be used; ``str()`` is one line naming it."""


class OptionError(UserInputError, ValueError):
    """A command-line option, or a combination of options, that cannot be used; the message names the option."""


#: OSErrors that name a path the user gave; reported like a UserInputError.
USER_PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                               NotADirectoryError)

#: Everything a command reports as one line rather than a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (UserInputError,) + USER_PATH_ERRORS


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (one line) rather than a bug (traceback)."""
    return isinstance(error, USER_ERRORS)


def error_line(program: str, error: BaseException) -> str:
    """The line a command prints for a user error: ``program: error: message`` (the classes keep messages one line)."""
    return f"{program}: error: {error}"
