"""The one exception type for problems a user can fix (bad input, wrong checkpoint, no disk space, ...).

Its message is a single line that says what is wrong and what to do. The CLI prints it as ``error: <message>`` and
exits with status 2; the Slicer module shows it in the status line.
"""


class HSAMError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""
