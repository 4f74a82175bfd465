"""Jobs: their state, the folder that keeps them across restarts, and the bounded queue in front of the worker.

Each job is one JSON file in ``OUT/jobs/`` written atomically at every change of status, and its images
are PNGs in ``OUT/images/`` written (atomically) before the job is marked done, so a crash or restart
loses no finished image. On startup, jobs a previous process left ``queued`` or ``running`` are marked
``failed`` with the reason "server restarted": reported, not lost.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.serve.schema import ApiError, JobSpec
from latentdiff.utils.files import write_text_atomic

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^[0-9a-f]{32}-\d{3}\.png$")
AUDIO_NAME = re.compile(r"^[0-9a-f]{32}-\d{3}\.wav$")


@dataclass
class Job:
    id: str
    kind: str
    model: str
    record: dict                       # the provenance record (JobSpec.record())
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    images: list[str] = field(default_factory=list)   # file names in OUT/images
    audio: list[str] = field(default_factory=list)    # WAV file names in OUT/images (audio models' generate jobs)
    spec: JobSpec | None = None        # in memory only: what the worker runs
    step: int = 0
    total: int = 0
    preview: str | None = None         # base64 PNG of the latest x̂0 preview
    version: int = 0                   # bumped at every change the event stream should send
    cancel: threading.Event = field(default_factory=threading.Event)

    def public(self, position: int | None = None) -> dict:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        out = {"id": self.id, "kind": self.kind, "model": self.model, "status": self.status,
               "images": [f"/v1/images/{name}" for name in self.images], "request": self.record,
               "step": self.step, "total": self.total, "created": self.created, "started": self.started,
               "finished": self.finished}
        if self.audio:
            out["audio"] = [f"/v1/audio/{name}" for name in self.audio]
        if self.error:
            out["error"] = self.error
        if position is not None:
            out["position"] = position
        return out

    def stored(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "kind", "model", "record", "status", "created", "started",
                                              "finished", "error", "images", "audio")}


class JobStore:
    """OUT/jobs/*.json and OUT/images/*.png."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.jobs_dir = self.out / "jobs"
        self.images_dir = self.out / "images"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)

    def save(self, job: Job) -> None:
        write_text_atomic(self.jobs_dir / f"{job.id}.json", json.dumps(job.stored()))

    def load(self) -> list[Job]:
        """Every stored job; those a previous process left unfinished are marked failed (and saved so)."""
        jobs = []
        for path in sorted(self.jobs_dir.glob("*.json")):
            try:
                d = json.loads(path.read_text())
                job = Job(**{k: d[k] for k in ("id", "kind", "model", "record", "status", "created", "started",
                                               "finished", "error", "images")},
                          audio=d.get("audio", []))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping unreadable job file %s (%s)", path.name, e)
                continue
            if job.status not in FINISHED:
                job.status, job.error, job.finished = "failed", "server restarted", time.time()
                self.save(job)
            jobs.append(job)
        return jobs


class JobQueue:
    """The jobs of this process and the bounded queue of those waiting for the worker."""

    def __init__(self, store: JobStore, max_queued: int = 64):
        self.store = store
        self.max_queued = max_queued
        self.jobs: dict[str, Job] = {j.id: j for j in store.load()}
        self.queue: deque[str] = deque()
        self.cond = threading.Condition()
        self.seconds_per_job = 1.0  # running mean, for Retry-After

    def submit(self, spec: JobSpec) -> Job:
        with self.cond:
            if len(self.queue) >= self.max_queued:
                wait = max(1, min(600, math.ceil(self.seconds_per_job * len(self.queue))))
                raise ApiError(429, f"the queue is full ({self.max_queued} jobs); retry in {wait} s",
                               {"Retry-After": str(wait)})
            job = Job(uuid.uuid4().hex, spec.kind, spec.model, spec.record(), spec=spec)
            self.store.save(job)
            self.jobs[job.id] = job
            self.queue.append(job.id)
            self.cond.notify_all()
            return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        return job

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, None when not queued."""
        with self.cond:
            return self.queue.index(job.id) + 1 if job.id in self.queue else None

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self.cond:
            job.cancel.set()
            if job.id in self.queue:  # not started: cancelled at once
                self.queue.remove(job.id)
                self.finish(job, "cancelled")
        return job

    def take(self, batch_key, max_images: int, timeout: float = 0.5) -> list[Job]:
        """The next job and, when `batch_key(spec)` is not None, the queued jobs compatible with it (up to
        `max_images` images in all); [] after `timeout` seconds without work."""
        with self.cond:
            if not self.queue and not self.cond.wait(timeout):
                return []
            if not self.queue:
                return []
            first = self.jobs[self.queue.popleft()]
            batch = [first]
            key = batch_key(first.spec)
            if key is not None:
                images = first.spec.request.n
                for job_id in list(self.queue):
                    job = self.jobs[job_id]
                    if job.model == first.model and batch_key(job.spec) == key \
                            and images + job.spec.request.n <= max_images:
                        self.queue.remove(job_id)
                        batch.append(job)
                        images += job.spec.request.n
            for job in batch:
                job.status, job.started = "running", time.time()
                job.version += 1
                self.store.save(job)
            return batch

    def requeue(self, jobs: list[Job]) -> None:
        """Put unfinished jobs of an interrupted batch back at the front, in their order."""
        with self.cond:
            for job in reversed(jobs):
                job.status, job.started, job.step = "queued", None, 0
                job.version += 1
                self.store.save(job)
                self.queue.appendleft(job.id)
            self.cond.notify_all()

    def finish(self, job: Job, status: str, error: str | None = None, images: list[str] | None = None,
               audio: list[str] | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        if images is not None:
            job.images = images
        if audio is not None:
            job.audio = audio
        job.spec = None  # free the inputs
        job.version += 1
        self.store.save(job)
        if status == "done" and job.started:
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (job.finished - job.started)
