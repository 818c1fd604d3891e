"""megatron-mesh: MeSH recursive transformers as a megatron-core plugin."""

from setuptools import find_packages, setup

setup(
    name="megatron-mesh",
    version="0.1.0",
    description="Recursive (looped) transformers with the MeSH state buffer on megatron-core",
    packages=find_packages(include=["megatron_mesh", "megatron_mesh.*"]),
    package_data={"megatron_mesh": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        # GPU machines (Python >= 3.12) take these from plain `pip install .`; the CPU path in the
        # Makefile installs them itself (see requirements/cpu.txt) and uses --no-deps here.
        "megatron-core==0.19.2",
        "torch>=2.6",
        "numpy",
        "packaging>=24.2",
        "PyYAML>=6",
        "transformers>=4.57,<5",
        "safetensors",
        "xxhash",
    ],
    extras_require={"logging": ["tensorboard", "wandb"]},
)
