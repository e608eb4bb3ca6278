"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class SwiftSVDError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2
