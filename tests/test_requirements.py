"""The requirement files: the Docker image installs the CPU environment's pins minus what the NGC
base image ships; the CPU environment and the GPU image with its kit each meet setup.py."""

import pytest

from conftest import REPO


def test_docker_requirements_follow_the_cpu_pins():
    cpu, docker = pinned("cpu.txt"), pinned("docker.txt")
    assert docker == {k: v for k, v in cpu.items() if k not in ("torch", "numpy")}


def install_requires():
    """setup.py's runtime requirements, read from its source (setup() is not run)."""
    import ast

    from packaging.requirements import Requirement

    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.keyword) and node.arg == "install_requires")
    return [Requirement(ast.literal_eval(item)) for item in call.value.elts]


def pinned(name):
    """{canonical name: version} of a requirements file's ``==`` pins (comments stripped)."""
    from packaging.utils import canonicalize_name

    out = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            out[canonicalize_name(package)] = version
    return out


@pytest.mark.parametrize("environment", [("cpu.txt", "megatron.txt"), ("image.txt", "gpu-kit.txt")])
def test_each_environment_meets_every_runtime_requirement(environment):
    """The CPU environment and the GPU image plus its kit each hold every runtime requirement of
    setup.py at a version inside its declared range (the support matrix): a requirement the image
    lacks must be in the kit."""
    from packaging.utils import canonicalize_name

    pins = {k: v for name in environment for k, v in pinned(name).items()}
    for requirement in install_requires():
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name}: in none of {environment}"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version} vs {requirement}"


def test_the_kit_carries_only_what_the_image_lacks():
    assert not pinned("gpu-kit.txt").keys() & pinned("image.txt").keys()
