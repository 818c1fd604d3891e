"""megatron-mesh: MeSH recursive transformers as a megatron-core plugin."""

from setuptools import find_packages, setup

setup(
    name="megatron-mesh",
    version="0.1.0",
    description="Recursive (looped) transformers with the MeSH state buffer on megatron-core",
    packages=find_packages(include=["megatron_mesh", "megatron_mesh.*"]),
    package_data={"megatron_mesh": ["py.typed"]},
    # the support matrix (README, "Supported versions"): what each range was tested with
    python_requires=">=3.11",
    install_requires=[
        # GPU machines (Python >= 3.12) take these from `pip install --no-build-isolation .`;
        # the CPU path in the Makefile installs them itself (requirements/cpu.txt), and the
        # lent GPU image's way is wheels on PYTHONPATH (requirements/gpu-kit.txt).
        "megatron-core==0.19.2",
        "torch>=2.11",
        "numpy>=2.4",
        "packaging>=24.2",
        "PyYAML>=6",
        "transformers>=4.57,<6",
        "safetensors",
        "xxhash",
        "psutil",
    ],
    extras_require={"logging": ["tensorboard", "wandb"]},
)
