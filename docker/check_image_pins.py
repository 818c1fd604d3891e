"""Build-time check (Dockerfile): the NGC image's torch, TransformerEngine, CUDA-built packages
are still the versions the image came with, and megatron-core is at the repository's pin.

Reads only package metadata: nothing here needs a GPU (there is none during `docker build`).
"""

import sys
from importlib.metadata import version
from pathlib import Path

PINS = Path(sys.argv[1] if len(sys.argv) > 1 else "/etc/megatron-mesh-image-pins.txt")
MEGATRON = Path(__file__).resolve().parents[1] / "requirements" / "megatron.txt"


def main():
    pins = dict(line.strip().split("==", 1) for line in PINS.read_text().splitlines() if "==" in line)
    changed = [f"{name}: {pinned} -> {version(name)}" for name, pinned in pins.items()
               if version(name) != pinned]
    if changed:
        sys.exit("installing megatron-mesh changed packages of the base image:\n  "
                 + "\n  ".join(changed))
    wanted = next(line.split("==", 1)[1].strip() for line in MEGATRON.read_text().splitlines()
                  if line.startswith("megatron-core=="))
    if version("megatron-core") != wanted:
        sys.exit(f"megatron-core {version('megatron-core')} installed, "
                 f"requirements/megatron.txt pins {wanted}")
    print(f"python {sys.version.split()[0]} | torch {version('torch')} | megatron-core {wanted} | "
          f"{len(pins)} image packages unchanged")


if __name__ == "__main__":
    main()
