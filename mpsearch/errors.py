"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""


class MPSearchError(Exception):
    """Bad input: a clear message, no traceback, on one line (a newline inside a user's key is shown as \\n)."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class MPSearchWarning(UserWarning):
    """Something a user should know about a run that still produced results."""


class BaselineWarning(MPSearchWarning):
    """A uniform baseline the run evaluated beat the strategy: the plan is that baseline."""


class CandidateError(MPSearchError, ValueError):
    """A candidate that is not in the space (wrong length, a bit-width not offered, not an integer)."""


class SpaceError(MPSearchError):
    pass


class TaskError(MPSearchError):
    pass


class BudgetError(MPSearchError):
    pass


class PlanError(MPSearchError):
    pass


class StorageError(MPSearchError):
    pass


class OptionError(MPSearchError, ValueError):
    pass
