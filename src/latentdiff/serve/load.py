"""A `latentdiff serve` subprocess on a free loopback port, and a load generator for it: many clients submitting
small jobs over HTTP, then waiting for them.

Used by the load, restart and browser tests and by ``scripts/serve_load.py`` (numbers in docs/benchmarks.md). Every submitted job
must end ``done`` or have been refused with 429: :class:`LoadResult` counts both and the ids, so a lost or
duplicated job shows.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import latentdiff


@dataclass
class LoadResult:
    accepted: list[str] = field(default_factory=list)   # job ids answered 202
    rejected: int = 0                                   # answered 429 (with Retry-After)
    errors: list[str] = field(default_factory=list)     # anything else: a failure of the test
    latencies: list[float] = field(default_factory=list)  # submit -> done, seconds, per accepted job
    finished: dict[str, str] = field(default_factory=dict)  # id -> final status
    images: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))
        return {"accepted": len(self.accepted), "rejected_429": self.rejected, "errors": len(self.errors),
                "done": sum(s == "done" for s in self.finished.values()), "p50_s": pct(0.5), "p95_s": pct(0.95),
                "mean_s": statistics.fmean(lat) if lat else float("nan"), "images": self.images,
                "images_per_s": self.images / self.seconds if self.seconds else 0.0, "wall_s": self.seconds}


def run_load(base_url: str, clients: int, jobs: int, body, *, token: str | None = None,
             timeout: float = 300.0) -> LoadResult:
    """`clients` threads share `jobs` submissions of `body(i)` (a JSON dict); each client waits for its job
    to finish (polling GET /v1/jobs/{id}) before submitting the next."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    result = LoadResult()
    lock = threading.Lock()
    counter = iter(range(jobs))
    deadline = time.monotonic() + timeout

    def client():
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.monotonic()
                r = http.post("/v1/jobs", json=body(i))
                if r.status_code == 429:
                    with lock:
                        result.rejected += 1
                    time.sleep(min(float(r.headers.get("retry-after", 1)), 1.0) * 0.1)
                    continue
                if r.status_code != 202:
                    with lock:
                        result.errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                job_id = r.json()["id"]
                with lock:
                    result.accepted.append(job_id)
                _wait(http, job_id, t0, result, lock, deadline)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - t0
    return result


def _wait(http, job_id: str, t0: float, result: LoadResult, lock, deadline: float):
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            with lock:
                result.finished[job_id] = job["status"]
                if job["status"] == "done":
                    result.latencies.append(time.monotonic() - t0)
                    result.images += len(job["images"])
            return
        time.sleep(0.02)
    with lock:
        result.errors.append(f"job {job_id} did not finish in time")


@contextmanager
def running_server(model, out, *extra, timeout: float = 90.0):
    """Start `latentdiff serve --model MODEL --port 0 --out OUT EXTRA...`; yield (base URL, process)."""
    env = {**os.environ, "PYTHONPATH": str(Path(latentdiff.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTDIFF_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff", "serve", "--model", str(model), "--port", "0",
                             "--out", str(out), "--device", "cpu", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, t0, lines = None, time.monotonic(), []
        while url is None:
            line = proc.stdout.readline()
            lines.append(line)
            found = re.search(r"at (http://[^ ]+/) ", line)
            if found:
                url = found.group(1).rstrip("/")
            elif not line and proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start:\n" + "".join(lines))
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
