"""Peak memory and CPU by group of the process tree of a benchmark while a job runs
(``predict_throughput.py``'s jobs), read from /proc (Linux) by a small separate process.

    python benchmarks/process_tree.py PID    # the sampler: prints JSON once stdin closes
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time

import numpy as np

# Who used the CPU while a job ran: its workers (the model actors, any decode tasks),
# the driver (this process: Ray Data's executor and the part writer), and everything
# else in the tree (Ray's raylet, GCS, agents, log monitor and Ray Data's helper actors).
CPU_GROUPS = ("job workers", "driver", "Ray's other processes")


def read_processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, resident bytes, CPU clock ticks) of every process, from /proc (Linux)."""
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            processes[int(entry)] = (int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
                                     int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return processes


def descendants(root: int, processes: dict[int, tuple[int, int, int]]) -> set[int]:
    """``root`` and every process below it."""
    members, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, (parent, _, _) in processes.items() if parent in frontier and pid not in members}
        members |= frontier
    return members


def cpu_group(pid: int, root: int, was: str | None) -> str:
    """Which of ``CPU_GROUPS`` a process is in, from its title (a Ray worker's names what it
    runs) and the group it ``was`` in: a prestarted worker becomes a model actor, and a job
    worker stays one while it exits (when its title can no longer be read)."""
    if pid == root:
        return CPU_GROUPS[1]
    if was == CPU_GROUPS[0]:
        return was
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read()
    except OSError:
        return was or CPU_GROUPS[2]
    return CPU_GROUPS[0] if b"MapWorker" in command or b"MapBatches" in command else CPU_GROUPS[2]


def sample_tree(root: int, every_s: float = 0.5) -> None:
    """Sampler process: once stdin closes, print as JSON the peak resident memory of
    ``root``'s process tree (less the sampler's own) and, at each sample, the time and
    the CPU seconds each of ``CPU_GROUPS`` has used so far (each process in the group it
    is in now; one that ended keeps its last reading).

    Each sample reads every process's /proc entry (~1.4 ms of CPU with ~90 processes),
    and the sampler's CPU comes out of the job it measures: twice a second it costs
    the job under 0.2% of one core."""
    ticks, groups, last_cpu, peak, series = os.sysconf("SC_CLK_TCK"), {}, {}, 0, []
    while not select.select([sys.stdin], [], [], every_s)[0]:
        processes = read_processes()
        members = descendants(root, processes) - {os.getpid()}
        peak = max(peak, sum(processes[pid][1] for pid in members if pid in processes))
        for pid in members & processes.keys():
            groups[pid] = cpu_group(pid, root, groups.get(pid))
            last_cpu[pid] = processes[pid][2] / ticks
        used = dict.fromkeys(CPU_GROUPS, 0.0)
        for pid, seconds in last_cpu.items():
            used[groups[pid]] += seconds
        series.append([time.time(), *used.values()])
    print(json.dumps({"peak_rss": peak, "cpu": series}))


class TreeSampler:
    """Peak resident memory of this process tree while a phase runs, and the CPU its
    groups of processes used, sampled by a small separate process: a thread here would
    take the GIL from the model's Python code in (a) and (b) but not in (c), whose model
    runs in a Ray actor; a forked child would make this process copy its pages on write."""

    peak, cpu = 0, []

    def __enter__(self):
        self._sampler = subprocess.Popen([sys.executable, __file__, str(os.getpid())],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        samples = json.loads(self._sampler.communicate("")[0] or '{"peak_rss": 0, "cpu": []}')  # closing stdin ends it
        self.peak, self.cpu = samples["peak_rss"], samples["cpu"]

    def cores_used(self, start: float, end: float) -> dict[str, float]:
        """Cores each group used on average between two times (seconds since the epoch)."""
        if len(self.cpu) < 2 or end <= start:
            return dict.fromkeys(CPU_GROUPS, math.nan)
        times = np.array([sample[0] for sample in self.cpu])
        return {group: float(np.diff(np.interp([start, end], times, [sample[1 + i] for sample in self.cpu]))[0]
                             / (end - start))
                for i, group in enumerate(CPU_GROUPS)}


if __name__ == "__main__":
    sample_tree(int(sys.argv[1]))
