"""The base of lorakit's own errors: the command line prints their message, not a traceback."""


class LorakitError(Exception):
    """An error whose message already says what went wrong and what to do."""
