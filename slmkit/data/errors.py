"""The error types of the data pipeline: one base, and the tokenizer mismatch that several commands check."""


class DataError(ValueError):
    """A problem with the user's data or dataset directory; the message says what and where."""


class TokenizerMismatchError(DataError):
    """A model's tokenizer.json is not the one a dataset's token ids were made with (see `check_same_tokenizer`)."""
