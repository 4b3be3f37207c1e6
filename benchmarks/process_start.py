"""What a service process costs to start: `hptune serve` until /healthz answers, and a
standalone worker until it has run a 4-trial job, in CPU seconds, against another commit.

    .venv/bin/python benchmarks/process_start.py --against REV [--runs 7] [--out FILE.md]

Every deployment starts these processes, and the test suite starts some 200 of them (a
server per module or test that needs a real one, two to sixteen workers each), so their
start-up is paid many times over. The reference is the same measurement of `REV`'s tree
(a temporary `git worktree`), run by this venv's Python, alternating run by run with this
tree's, on fresh SQLite files: the machine's load then weighs on both alike. Bytecode is
written for both trees first, so neither pays for compiling.

- `serve`: `python -m service serve --workers 0`, from spawn until /healthz answers
  (imports, settings, the schema check, the app, uvicorn).
- `worker`: `python -m service worker`, from spawn until a queued job of 4 tiny digits
  trials (random sampler, 3 epochs, 16 units) has succeeded: imports, the schema check,
  the dataset, the first trials with their first exported model.

CPU seconds are the process's user + system time from /proc, medians of `--runs`.
Prints a markdown table and writes it with the command, date and machine to `--out`
(default benchmarks/RESULTS_process_start.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from service.spawn import free_port, wait_healthy  # noqa: E402

JOB = {"name": "start", "dataset": "digits", "n_trials": 4, "max_epochs": 3,
       "sampler": {"name": "random", "seed": 1}, "model": {"hidden_layers": [16]}}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service(tree: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "service", *args], cwd=tree, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def measure(tree: Path, work: Path) -> tuple[float, float]:
    """(serve, worker) CPU seconds of one start of each, on a fresh SQLite file."""
    env = {**os.environ, "HPTUNE_DATABASE_URL": f"sqlite:///{work / 'start.db'}",
           "HPTUNE_POLL_INTERVAL": "0.1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    key = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--owner", "b"],
                         cwd=tree, env=env, capture_output=True, text=True, check=True
                         ).stdout.strip().splitlines()[-1]
    port = free_port()
    server = _service(tree, env, work / "serve.log", "serve", "--port", str(port),
                      "--workers", "0")
    worker = None
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_healthy(url, server, timeout_s=60):
            raise RuntimeError((work / "serve.log").read_text())
        serve_s = _cpu_s(server.pid)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            job_id = client.post("/api/v1/jobs", json=JOB).json()["id"]
            worker = _service(tree, env, work / "worker.log", "worker")
            deadline = time.monotonic() + 120
            while client.get(f"/api/v1/jobs/{job_id}").json()["status"] != "succeeded":
                if time.monotonic() > deadline:
                    raise RuntimeError((work / "worker.log").read_text())
                time.sleep(0.05)
        return serve_s, _cpu_s(worker.pid)
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the reference commit")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "RESULTS_process_start.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="process-start-"))
    reference = tmp / "reference"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(reference), args.against],
                   cwd=ROOT, check=True)
    try:
        trees = {"this tree": ROOT, f"`{args.against}`": reference}
        for tree in trees.values():  # bytecode for both, and a first start of each unmeasured
            subprocess.run([sys.executable, "-m", "compileall", "-q", "service", "search",
                            "trainer", "migrations"], cwd=tree, check=True)
            measure(tree, Path(tempfile.mkdtemp(dir=tmp)))
        figures: dict[str, dict[str, list[float]]] = {name: {"serve": [], "worker": []}
                                                      for name in trees}
        for run in range(args.runs):
            for name, tree in trees.items():
                serve_s, worker_s = measure(tree, Path(tempfile.mkdtemp(dir=tmp)))
                figures[name]["serve"].append(serve_s)
                figures[name]["worker"].append(worker_s)
            print(f"run {run + 1}/{args.runs}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT,
                       check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: {kind: statistics.median(v) for kind, v in kinds.items()}
               for name, kinds in figures.items()}
    mine, ref = medians["this tree"], medians[f"`{args.against}`"]
    lines = ["| process | this tree (CPU s) | " + f"`{args.against}` (CPU s) | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for kind in ("serve", "worker"):
        lines.append(f"| {kind} | {mine[kind]:.2f} | {ref[kind]:.2f} | "
                     f"{mine[kind] / ref[kind]:.2f} |")
    table = "\n".join(lines)
    raw = "\n".join(f"- {name} {kind}: {', '.join(f'{x:.2f}' for x in values)}"
                    for name, kinds in figures.items() for kind, values in kinds.items())
    print(table)
    print(raw)
    args.out.write_text(
        "# Process start-up\n\n"
        f"`{' '.join(['python', *sys.argv])}` on {datetime.now():%Y-%m-%d %H:%M}, "
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}: "
        f"medians of {args.runs} alternating runs.\n\n{table}\n\nEvery run:\n\n{raw}\n")


if __name__ == "__main__":
    main()
