"""Errors that end a run with one line for the user (no traceback)."""


class UserError(Exception):
  """Bad input or environment: the message says what is wrong and how to fix it."""


class MissingDataPackageError(UserError):
  """A package that provides embedded data is not installed."""
