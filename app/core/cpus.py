"""How many CPUs this process may really use (thread pools size themselves from it)."""

from __future__ import annotations

import os
from pathlib import Path


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, capped by the cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", _cgroup2_quota),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", _cgroup1_quota),
    ):
        try:
            quota = parse(Path(path))
        except (OSError, ValueError):
            continue
        if quota is not None:
            n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def _cgroup2_quota(path: Path) -> float | None:
    quota, period = path.read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _cgroup1_quota(path: Path) -> float | None:
    quota = int(path.read_text())
    period = int((path.parent / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period
