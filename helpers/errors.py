"""The exception for input a user can fix; the command line prints it as one line."""


class UserError(Exception):
    """Bad input (a path, a prompt, an option): the message says what and what to do."""
