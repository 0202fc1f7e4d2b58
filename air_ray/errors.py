"""The one exception type that means "the user asked for something that cannot be done".

The CLI turns it into a one-line message and exit code 2; everything else is a bug and keeps its traceback.
"""


class AirRayError(Exception):
    """A clear, user-facing error (bad model name, bad input, mismatched heads, ...)."""
