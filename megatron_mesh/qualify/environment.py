"""Check ``versions``: the software and the device this qualification ran on."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

import torch

from megatron_mesh.compat.torch_compile import TORCH_COMPILE
from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult

PACKAGES = ("megatron-core", "transformer-engine", "transformers", "apex", "numpy", "triton",
            "tokenizers", "huggingface-hub")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def describe() -> dict:
    """Versions and device, for the report's header."""
    cuda = torch.cuda.is_available()
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda or "none"}
    if cuda:
        versions["cudnn"] = str(torch.backends.cudnn.version())
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        versions["driver"] = _driver()
    versions.update({p: _version(p) for p in PACKAGES})
    count = torch.cuda.device_count() if cuda else 0
    device = (f"{count} x {torch.cuda.get_device_name(0)}" if cuda
              else f"CPU ({platform.processor() or platform.machine()})")
    return {"device": device, "gpus": count, "versions": versions,
            "adaptations": TORCH_COMPILE.adaptations()}


def check(ctx: Context) -> CheckResult:
    info = describe()
    summary = f"{info['device']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    if info["adaptations"]:
        summary += f"; {len(info['adaptations'])} adaptation(s) to this torch (report.json)"
    if not ctx.profile.cpu and not info["gpus"]:
        return CheckResult("versions", FAIL, "no CUDA device visible: " + summary, details=info)
    return CheckResult("versions", PASS, summary, details=info)
