"""The one exception type that reaches users as a one-line message."""


class LlametteError(ValueError):
    """Bad input: a file, flag or prompt that llamette cannot use. The message names it."""
