"""The one exception type users see: a one-line message, exit code 2, no traceback."""


class SlmError(Exception):
    """An error caused by the user's input (config, files, data), reported in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
