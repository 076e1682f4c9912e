"""The one exception type for bad user input.

The CLI turns it into a one-line message and a non-zero exit; anything else that escapes
is a bug in bert_jax and keeps its traceback.
"""


class BertJaxError(ValueError):
    """Bad input: the message names the file or field and what is wrong with it."""
