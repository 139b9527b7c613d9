"""The exception type of what the user can fix. Imports nothing, so that every module can raise it.

A `UserError` is bad input or a setting the user can change: a config key, a data file, a checkpoint, weights, an
output folder. Its message is one line that names the file / id / config key, and the command line prints it as
it is. Any other exception that ends a command is a bug of this package and is reported as one.
"""


class UserError(Exception):
    """Bad input the user can fix; the message names the file, id or config key. Subclassed by the errors of the
    config, the data sets, checkpoints and the run folder."""
