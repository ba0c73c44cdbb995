"""The one exception type of the data layer."""


class DataError(ValueError):
    """Bad or missing training data, found before any training starts.

    ``str()`` is one line that names the file, line, field or corpus at fault, so the CLI can print
    it as is (it subclasses ValueError, which the CLI reports without a traceback).
    """
