"""The one exception type of merge_methods: a bad parameter, input or shape, with a clear message."""


class MergeError(ValueError):
    """Raised for invalid merge input; the message names the method, parameter or key."""
