"""Errors a user can cause and fix. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
  """Base class: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config file, key or value that cannot be used."""


class DataError(UserError, ValueError):
  """Input data or a prepared dataset that cannot be used."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint or workdir that cannot be used."""


class TrainingError(UserError, RuntimeError):
  """The run cannot go on (e.g. a non-finite loss); the message says at which step."""


class BundleError(UserError, ValueError):
  """An inference bundle, or a request against one (a node id, a blocked path), that cannot be used."""


class WeightsError(UserError, ValueError):
  """Outside weights (`hmem import`) that cannot become an anchor."""
