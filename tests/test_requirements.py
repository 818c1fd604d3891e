"""The Docker image installs the CPU environment's pins minus what the NGC base image ships."""

from conftest import REPO


def pins(name):
    lines = (REPO / "requirements" / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_docker_requirements_follow_the_cpu_pins():
    cpu, docker = pins("cpu.txt"), pins("docker.txt")
    assert docker == {k: v for k, v in cpu.items() if k not in ("torch", "numpy")}
