"""What every benchmark records beside its figures: where the results go, the commit, the CPU.

Benchmarks are scripts (``python benchmarks/<name>.py``); they import this module from their
own folder, so it needs no installation.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

#: NVLink multicast stays off on the lent multi-GPU machines (their notes say why).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off() -> dict[str, str | None]:
    """Turn NVLink multicast off unless the caller's environment says otherwise (before NCCL
    starts); returns the settings in force, for the result file."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    return {name: os.environ.get(name) for name in MULTICAST_OFF}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The short commit of the checkout, with "-dirty" when tracked code differs from it (the
    figures then come from code no commit holds; results files do not count), or None outside
    a git checkout. An exported copy (the GPU machine gets one) names its commit in
    $SPLITSERVE_GIT_COMMIT: a git folder above the copy would otherwise answer with its own,
    wrong, commit."""
    if os.environ.get("SPLITSERVE_GIT_COMMIT"):
        return os.environ["SPLITSERVE_GIT_COMMIT"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        changed = git("diff", "--quiet", "HEAD", "--", ".", f":(exclude){RESULTS_DIR.relative_to(REPO_ROOT)}")
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 1 else "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def default_out_path(benchmark: str, device_slug: str, now: datetime) -> Path:
    """benchmarks/results/<benchmark>_<device>_<date>.json"""
    return RESULTS_DIR / f"{benchmark}_{device_slug}_{now:%Y-%m-%d}.json"


def write_json(out: Path, data: dict[str, Any]) -> None:
    """A result file with no plot: ``out``'s folder made if missing, the JSON written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def save_report(out: Path, report: dict[str, Any], write_plot: Callable[[Path, dict[str, Any]], None],
                format_table: Callable[[dict[str, Any]], str]) -> None:
    """Write the JSON and its PNG beside it, then print the table (last, so it shows)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(out.with_suffix(".png"))
    write_plot(out.with_suffix(".png"), report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {out} and {report['plot']}")


def finish_figure(fig, path: Path, title: str, dpi: int = 110) -> None:
    """Title, lay out, save and close a benchmark's figure (every plot ends the same way)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def report_header(benchmark: str, script: str, argv: list[str], now: datetime,
                  device: dict[str, Any]) -> dict[str, Any]:
    """The fields every result file starts with: what ran, when, at which commit, on what."""
    import shlex
    import sys

    return {"benchmark": benchmark,
            "command": shlex.join([sys.executable, str(Path(script).resolve().relative_to(REPO_ROOT)), *argv]),
            "date": now.isoformat(timespec="seconds"), "git_commit": git_commit(), "device": device}
