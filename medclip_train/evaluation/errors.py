"""The one error type of bad evaluation input; the CLI turns it into a message and exit code 2."""


class EvalInputError(ValueError):
    """Missing folder, empty class, malformed prompt file...: the message names the file or field at fault."""
