"""The one error type of the data pipeline."""


class DataError(ValueError):
    """A problem with the user's data or dataset directory; the message says what and where."""
