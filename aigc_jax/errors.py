"""The one exception type a user is meant to read."""


class UserError(Exception):
  """Bad input from the user: the message is one sentence saying what to do.

  The command line prints it without a traceback and exits with status 2.
  """
