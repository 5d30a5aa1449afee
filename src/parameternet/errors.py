"""The one exception type the library raises for bad user input.

It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working; the CLI turns it into
one sentence on stderr and a non-zero exit instead of a traceback.
"""

__all__ = ["ParameterNetError"]


class ParameterNetError(ValueError):
    """Bad input: the message names the offending value and what to do instead."""
