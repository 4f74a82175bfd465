"""A load generator for a running server: many clients submitting small jobs over HTTP, then waiting for them.

Used by the load tests and ``scripts/serve_load.py`` (numbers in docs/benchmarks.md). Every submitted job
must end ``done`` or have been refused with 429: :class:`LoadResult` counts both and the ids, so a lost or
duplicated job shows.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field


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
