"""What a fleet run shows: the live table, the JSON report and the plot."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class VersionRow:
    """One global version as the fleet saw it."""

    version: int
    time_s: float
    contributors: int
    mean_staleness: float
    devices_scored: int = 0
    personal_accuracy: float | None = None
    worst_personal_accuracy: float | None = None
    global_accuracy: float | None = None
    uplink_bytes: int = 0


@dataclass
class FleetReport:
    options: dict[str, object]
    rows: list[VersionRow] = field(default_factory=list)
    summary: dict[str, object] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"options": self.options,
                                    "versions": [asdict(r) for r in self.rows],
                                    "summary": self.summary}, indent=1, default=str))


HEADER = (f"{'version':>7} {'time s':>7} {'updates':>7} {'stale':>5} {'devices':>7} "
          f"{'personal':>8} {'worst':>6} {'global':>6} {'uplink KiB':>10}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_row(row: VersionRow) -> str:
    return (f"{row.version:>7} {row.time_s:>7.1f} {row.contributors:>7} "
            f"{row.mean_staleness:>5.2f} {row.devices_scored:>7} "
            f"{_pct(row.personal_accuracy):>8} {_pct(row.worst_personal_accuracy):>6} "
            f"{_pct(row.global_accuracy):>6} {row.uplink_bytes / 1024:>10.1f}")


def score_row(row: VersionRow, scores: dict[str, tuple[float, float]]) -> None:
    """Fill a row from the devices' (global, personal) accuracy on that version."""
    row.devices_scored = len(scores)
    if scores:
        personal = [p for _, p in scores.values()]
        row.personal_accuracy = statistics.fmean(personal)
        row.worst_personal_accuracy = min(personal)
        row.global_accuracy = statistics.fmean(g for g, _ in scores.values())


def plot(rows: list[VersionRow], path: Path, title: str) -> None:
    """Accuracy against uplink bytes and against time, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.personal_accuracy is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, xs, label in (
            (axes[0], [r.uplink_bytes / 2**20 for r in scored], "uplink so far (MiB)"),
            (axes[1], [r.time_s for r in scored], "wall time (s)")):
        ax.plot(xs, [100 * r.personal_accuracy for r in scored], label="personal (mean)")
        ax.plot(xs, [100 * r.worst_personal_accuracy for r in scored], ":",
                label="personal (worst device)")
        ax.plot(xs, [100 * r.global_accuracy for r in scored], label="global (mean)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("holdout accuracy (%)")
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
