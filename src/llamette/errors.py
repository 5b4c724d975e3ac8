"""The exception types that reach users as one-line messages."""


class LlametteError(ValueError):
    """Bad input: a file, flag or prompt that llamette cannot use. The message names it."""


class BadParameter(LlametteError):
    """A request's parameter out of range: `name` is the parameter (the server's 400 names it),
    `where` the part of it at fault (default: all of it)."""

    def __init__(self, name: str, problem: str, where: str | None = None):
        super().__init__(f"{where or name}: {problem}")
        self.name, self.problem = name, problem
