"""Facts about this machine that decide how a model is loaded: cores, memory, SIMD, backend."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional


def physical_cores() -> int:
    """Physical cores usable by this process (hyper-threads slow llama.cpp's matmuls down)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = _linux_physical_cores() or _macos_physical_cores()
    return max(1, min(cores, usable) if cores else usable)


def _linux_physical_cores() -> Optional[int]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs = set()
    for block in text.split("\n\n"):
        phys = re.search(r"^physical id\s*:\s*(\d+)", block, re.M)
        core = re.search(r"^core id\s*:\s*(\d+)", block, re.M)
        if phys and core:
            pairs.add((phys.group(1), core.group(1)))
    return len(pairs) or None  # ARM boards (a Pi) list no core ids: fall back to the count


def _macos_physical_cores() -> Optional[int]:
    if platform.system() != "Darwin":
        return None
    try:
        return int(subprocess.check_output(["sysctl", "-n", "hw.physicalcpu"], text=True))
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None


def available_memory() -> Optional[int]:
    """Bytes a new model can use without swapping, or None when the OS will not say: the
    machine's available memory, or less when a memory cgroup (a container's --memory) allows
    less -- there the kernel kills the process at the cgroup's limit, whatever the machine has."""
    machine = _machine_available()
    room = cgroup_room()
    return room if machine is None else machine if room is None else min(machine, room)


def _machine_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# (limit, usage, the page cache the kernel reclaims first) per cgroup version
_CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """What this process's memory cgroup and its ancestors still allow (limit - usage, the
    reclaimable page cache not counted as used), the tightest of them; None with no limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            version, base = 2, root
        elif "memory" in controllers.split(","):
            version, base = 1, root / "memory"
        else:
            continue
        # Inside a container the path may be the host's, not visible here: the hierarchy's root
        # is then the container's own cgroup.
        leaf = base / path.strip("/")
        folders = [leaf, *(p for p in leaf.parents if p.is_relative_to(base))] if leaf.is_dir() else [base]
        for folder in folders:
            room = _room(folder, *_CGROUP_FILES[version])
            if room is not None:
                rooms.append(room)
    return min(rooms) if rooms else None


def _room(folder: Path, limit_file: str, usage_file: str, reclaimable: str) -> Optional[int]:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= 2**60:  # v1 writes "unlimited" as ~2**63
            return None
        usage = int((folder / usage_file).read_text())
        cache = 0
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == reclaimable:
                cache = int(value)
        return max(0, int(limit_text) - max(0, usage - cache))
    except (OSError, ValueError):
        return None


def backend() -> str:
    """Which llama.cpp backend this build computes on."""
    from .bindings import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        if platform.system() == "Darwin":
            return "Metal"
        return "GPU"
    return "CPU"


def system_info() -> str:
    """llama.cpp's own line of compiled features, e.g. 'CPU : SSE3 = 1 | AVX2 = 1 | ...'."""
    from .bindings import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def simd_features() -> list[str]:
    """The SIMD features llama.cpp was built with and found on this CPU (AVX2, NEON, ...)."""
    return [name for name, on in re.findall(r"([A-Z0-9_]+) = (\d)", system_info()) if on == "1"]
