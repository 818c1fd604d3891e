"""The errors a user meets: a bad config, file or command line, named with the fix.

Every such error derives from ``MeshError``. The tools print one as ``error: ...`` and exit 2
(``megatron_mesh.cli``); any other exception is a bug and keeps its traceback. Each keeps the
builtin base it had (``ValueError``, ``FileNotFoundError``, ...), as code outside the tools has
long caught those.

The classes here are the ones no single module owns; a module with errors of its own derives
them from ``MeshError`` where it defines them (``megatron_mesh.fs.OutputExistsError``,
``megatron_mesh.data.integrity.DatasetIntegrityError``, ...).
"""


class MeshError(Exception):
    """A problem with what the user gave (config, files, flags), not with the code."""


class CheckpointError(MeshError, ValueError):
    """Not a checkpoint, or one that disagrees with its config."""


class ConfigError(MeshError, ValueError):
    """A configuration file, override or model setting is invalid; the message names the file
    or key, what was given and what is expected."""


class InputNotFoundError(MeshError, FileNotFoundError):
    """A file or directory the user named (on the command line or in a config) does not exist;
    the message names it and what was expected there."""


class DataError(MeshError, ValueError):
    """Data that cannot be used as asked: tokens outside the model's vocabulary, nothing to
    score, samples a metric is undefined on; the message names the source."""
