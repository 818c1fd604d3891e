"""The errors a user meets: a bad config, file or command line, named with the fix.

Every such error derives from ``MeshError``. The tools print one as ``error: ...`` and exit 2
(``megatron_mesh.cli``); any other exception is a bug and keeps its traceback. The user errors
stay ``ValueError``s too, as code outside the tools has long caught them.
"""


class MeshError(Exception):
    """A problem with what the user gave (config, files, flags), not with the code."""


class CheckpointError(MeshError, ValueError):
    """Not a checkpoint, or one that disagrees with its config."""


class ConfigError(MeshError, ValueError):
    """A configuration file, override or model setting is invalid; the message names the file
    or key, what was given and what is expected."""
