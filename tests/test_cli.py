"""megatron_mesh.cli, the tools' shell: a MeshError is `error: <message>` and exit status 2, any
other exception keeps its traceback; the standard flags land in one attribute name."""

import argparse
import subprocess
import sys

import pytest

from conftest import REPO
from megatron_mesh import cli
from megatron_mesh.errors import ConfigError, InputNotFoundError, MeshError


def test_a_user_error_is_one_line_and_status_2(capsys):
    @cli.tool
    def main(argv=None):
        raise ConfigError(f"model.layout={argv[0]!r}: expected 'P+CRK+D'")

    with pytest.raises(SystemExit) as stop:
        main(["4+8"])
    assert stop.value.code == cli.USAGE_ERROR == 2
    assert str(stop.value) == "error: model.layout='4+8': expected 'P+CRK+D'"  # read in-process
    assert isinstance(stop.value.__cause__, ConfigError)
    assert capsys.readouterr().err == "error: model.layout='4+8': expected 'P+CRK+D'\n"


def test_every_mesh_error_is_a_user_error_and_others_are_not():
    assert cli.is_user_error(InputNotFoundError("x.jsonl: input file not found"))
    assert cli.is_user_error(MeshError("anything the user gave"))
    assert not cli.is_user_error(ValueError("a bug"))
    assert not cli.is_user_error(FileNotFoundError("a file the code, not the user, named"))


def test_any_other_exception_passes_through_unchanged(capsys):
    bug = ValueError("an internal invariant")

    @cli.tool
    def main(argv=None):
        raise bug

    with pytest.raises(ValueError) as raised:
        main([])
    assert raised.value is bug and capsys.readouterr().err == ""


def test_fail_and_return_values():
    @cli.tool
    def main(argv=None):
        if argv:
            cli.fail(f"--samples {argv[0]}: expected an integer >= 1")
        return 3

    assert main([]) == 3  # a tool's own status (gpu_check returns one) is kept
    with pytest.raises(SystemExit) as stop:
        main(["0"])
    assert stop.value.code == 2 and str(stop.value) == "error: --samples 0: expected an integer >= 1"


def test_standard_flags_land_in_one_attribute():
    parser = argparse.ArgumentParser()
    cli.add_input(parser, "--load")
    cli.add_output(parser, "--out")
    cli.add_force(parser)
    old = parser.parse_args(["--load", "ckpt", "--out", "hf", "--force"])
    new = parser.parse_args(["--input", "ckpt", "--output", "hf"])
    assert (old.input, old.output, old.force) == ("ckpt", "hf", True)
    assert (new.input, new.output, new.force) == ("ckpt", "hf", False)


# a tool as `python tools/X.py` runs one: its directory first on sys.path, the shell from _bootstrap
TOOL = """
import sys
sys.path.insert(0, sys.argv[1])
from _bootstrap import cli

@cli.tool
def main(argv=None):
    from megatron_mesh.errors import ConfigError

    if sys.argv[2] == "user":
        raise ConfigError("training.train_iters=-1: expected an integer >= 1")
    raise KeyError("a bug")

main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, status, stderr", [
    ("user", 2, "error: training.train_iters=-1: expected an integer >= 1\n"),
    ("bug", 1, "KeyError: 'a bug'\n"),
], ids=["mesh-error", "bug"])
def test_exit_status_and_stderr_of_a_tool(kind, status, stderr):
    done = subprocess.run([sys.executable, "-c", TOOL, str(REPO / "tools"), kind], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == status, done.stderr[-2000:]
    assert done.stderr.endswith(stderr), done.stderr[-2000:]
    assert ("Traceback (most recent call last)" in done.stderr) == (kind == "bug"), done.stderr[-2000:]
