"""The one exception type users see: a one-line message, exit code 2, no traceback.

Exit codes of the `slm` command (README "Exit codes"):
  0   success
  1   a bug in slm: an unexpected exception, printed with its traceback
  2   bad input or bad data: an SlmError (config, files, shards), a usage error, a failed check
  3   interrupted: SIGTERM or SIGUSR1 (preemption, a time limit) stopped a training or scoring stage at a safe
      point; its work is kept (a whole checkpoint, whole shards) and a rerun continues (slm.preempt)
  130 aborted (Ctrl-C)
"""

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 3
EXIT_ABORTED = 130


class SlmError(Exception):
    """An error caused by the user's input (config, files, data), reported in one line."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def describe(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` of a third-party exception, for a one-line SlmError."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else 'no message'}"
