"""User-facing errors: `main` prints them as one line and exits non-zero."""


class JaxlmError(Exception):
  """A problem with the user's input (config, data, files), not a bug."""


class ConfigError(JaxlmError, ValueError):
  """Invalid configuration; the message names the offending key."""


class DataError(JaxlmError):
  """Unreadable, missing or empty data; the message names the file or source."""
