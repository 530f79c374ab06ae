"""Where a command's CPU goes: runs it, samples /proc every 0.5 s for the command and all its descendants
(Ray's GCS, raylet, workers and actors are descendants of a driver that starts Ray), and prints CPU seconds
per process name. Linux only.

    python bench/cpu_by_process.py fetalpipe infer --manifest ARCHIVE/manifest.csv --output /tmp/out --overwrite

Ray renames its worker processes (`ray::MapWorker(...)`, `ray::IDLE`), so each process is reported under the most
specific name it had while sampled. CPU used by a process in its last 0.5 s before exiting is not counted."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, command line)."""
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        processes[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, command)
    return processes


def descendants(processes: dict, root: int) -> set[int]:
    children = collections.defaultdict(list)
    for pid, (parent, _, _) in processes.items():
        children[parent].append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children[pid])
    return found


def specificity(name: str) -> int:
    return 3 if name.startswith("ray::") and not name.startswith("ray::IDLE") else 2 if name.startswith("ray::IDLE") else 1 if name else 0


def short_name(command: str, root_command: str) -> str:
    if command == root_command:
        return "driver (the command)"
    for marker in ("raylet", "gcs_server", "dashboard_agent", "runtime_env", "log_monitor", "monitor.py"):
        if marker in command:
            return marker
    return command.split()[0] if command else "?"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    started = time.time()
    process = subprocess.Popen(sys.argv[1:])
    seen: dict[int, tuple[float, str]] = {}
    root_command = ""
    while process.poll() is None:
        processes = snapshot()
        root_command = root_command or processes.get(process.pid, (0, 0, ""))[2]
        for pid in descendants(processes, process.pid):
            if pid in processes:
                _, cpu_seconds, command = processes[pid]
                old_name = seen.get(pid, (0.0, ""))[1]
                seen[pid] = (cpu_seconds, command if specificity(command) >= specificity(old_name) else old_name)
        time.sleep(0.5)
    wall_seconds = time.time() - started
    by_name = collections.defaultdict(float)
    for cpu_seconds, command in seen.values():
        by_name[short_name(command, root_command) if not command.startswith("ray::") else command.split()[0]] += cpu_seconds
    print(f"\nwall {wall_seconds:.1f} s, CPU {sum(by_name.values()):.1f} s over {len(seen)} processes")
    for name, cpu_seconds in sorted(by_name.items(), key=lambda item: -item[1]):
        print(f"{cpu_seconds:8.1f} s  {name}")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
