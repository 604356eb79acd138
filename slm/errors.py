"""The one exception type users see: a one-line message, exit code 2, no traceback."""


class SlmError(Exception):
    """An error caused by the user's input (config, files, data), reported in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def describe(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` of a third-party exception, for a one-line SlmError."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else 'no message'}"
