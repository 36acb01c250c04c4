"""The SPREAD stage's error for unusable input."""

from xfel_spread.errors import UserInputError


class SpreadInputError(UserInputError, ValueError):
    """A user-input error of the SPREAD stage: a table, a site name, a setting or the stage-1
    results that cannot be used. The message is one line naming the file or setting."""
