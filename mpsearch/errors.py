"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""


class MPSearchError(Exception):
    """Bad input: a clear message, no traceback."""


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


class OptionError(MPSearchError):
    pass
