"""lorakit's own errors: the command line prints their message, not a traceback.

Every error lorakit raises for a user's mistake (a bad file, folder, option or name) derives from
``LorakitError``; the ones that are also ``ValueError``s stay so, for callers that catch those.  Anything
else reaching the command line is a bug and prints its traceback.
"""


class LorakitError(Exception):
    """An error whose message already says what went wrong and what to do."""


class WrongBaseModelError(LorakitError):
    """A file made for another base model (architecture or size) than the one it was given to; a command whose
    ``--model`` defaults to the built-in model says so when none was given (``lorakit.cli``)."""


class InvalidValueError(LorakitError, ValueError):
    """A value given by the user (an option, flag, name or argument) that lorakit cannot use."""
