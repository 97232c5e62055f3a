"""What ran a benchmark: machine, versions, date, and the environment switches that change behaviour.

Every result file carries :func:`machine_info` of its device; :func:`device_slug` names the file
(``step_cpu_amd-epyc``, ``mass_cuda_nvidia-h200``), so each benchmark keeps one current file per
machine.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from typing import Dict, Optional

import torch

# Environment variables that change what the library computes or how (docs/environment.md).
BEHAVIOUR_VARIABLES = ("GALA_SYNC_LABEL_CHECK", "GALA_CUDA_CHECK_LABELS", "GALA_CPU_BUFFER_CACHE",
                       "GALA_TRITON_AUTOTUNE", "TRITON_INTERPRET")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


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


def behaviour_environment() -> Dict[str, str]:
    """The behaviour-changing environment variables that are set in this process."""
    return {name: os.environ[name] for name in BEHAVIOUR_VARIABLES if name in os.environ}


def command_line() -> str:
    """The command that ran, as it was typed (``python -m gala_kernels ...`` for the module)."""
    if sys.argv and sys.argv[0].endswith(os.path.join("gala_kernels", "__main__.py")):
        return " ".join(["python -m gala_kernels", *sys.argv[1:]])
    return " ".join(sys.argv)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def machine_info(device: torch.device) -> Dict[str, object]:
    """Machine, versions and date, for the header of a result file."""
    info: Dict[str, object] = {
        "date_utc": now_utc(),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "liger_kernel": package_version("liger-kernel") or package_version("liger_kernel"),
        "gala_kernels": package_version("gala_kernels"),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "command": command_line(),
        "environment": behaviour_environment(),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_sm_count=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}",
                    gpu_l2_bytes=int(getattr(props, "L2_cache_size", 0)),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda_archs_requested=os.environ.get("GALA_CUDA_ARCHS"))
    return info


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """``cpu_<cpu model>`` or ``cuda_<gpu name>``, lower case, dashes: the machine part of a file name."""
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")[:40].strip("-")
    return f"{device.type}_{name or 'unknown'}"


def require_cuda(what: str) -> torch.device:
    """The CUDA device, or SystemExit with a message naming the benchmark that needs it."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA GPU, and none is available here "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    return torch.device("cuda")


def resolve_device(name: Optional[str], what: str) -> torch.device:
    """``--device``: cuda when present by default, else cpu; a CUDA device without CUDA exits."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        require_cuda(f"{what} --device {name}")
    return device
