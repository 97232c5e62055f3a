"""What ran a benchmark: machine, versions, date. Written beside every result file."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Dict, Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    """The project's commit, with ``+dirty`` when its code (``gala_kernels/``, ``csrc/``, build files)
    has changes or untracked files, if it is a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        code_paths = ["gala_kernels", "csrc", "setup.py", "CMakeLists.txt"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *code_paths], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def load_average() -> Optional[float]:
    """1-minute load average: other processes on a small machine distort CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "liger_kernel": package_version("liger-kernel") or package_version("liger_kernel"),
        "gala_kernels": package_version("gala_kernels"),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "argv": " ".join(sys.argv),
        "load_average_start": load_average(),
    }
    return info
