"""Load and fault tests of a real `latentdiff serve` process on loopback, bounded in count and time."""

import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import build_tiny_model

from latentdiff.serve.load import run_load, running_server


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("load-model"), num_train_steps=1000)


def check_none_lost(result, jobs: int):
    assert result.errors == []
    assert len(result.accepted) == len(set(result.accepted))             # no duplicate ids
    assert len(result.accepted) + result.rejected == jobs                 # every job: accepted or 429
    assert set(result.finished) == set(result.accepted)                   # none lost
    assert all(status == "done" for status in result.finished.values())


def body(i):
    return {"n": 1, "steps": 4, "seed": i, "class": i % 3}


@pytest.mark.slow
def test_20_clients_200_jobs(model, tmp_path):
    with running_server(model, tmp_path / "out", "--max-queue", "16") as (url, _):
        result = run_load(url, clients=20, jobs=200, body=body, timeout=600)
        check_none_lost(result, 200)


def test_small_load_then_kill_mid_job_and_restart(model, tmp_path):
    """One server process (starting one costs seconds): 4 clients × 20 jobs with a queue of 2, then a SIGKILL
    in the middle of a job, then a restart on the same folder."""
    out = tmp_path / "out"
    with running_server(model, out, "--max-queue", "2") as (url, proc):
        result = run_load(url, clients=4, jobs=20, body=body, timeout=120)
        check_none_lost(result, 20)
        jobs = httpx.get(url + "/v1/jobs?limit=500").json()["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted(result.accepted)

        done = httpx.post(url + "/v1/jobs", json={"n": 2, "steps": 3, "seed": 1}).json()["id"]
        t0 = time.monotonic()
        while httpx.get(f"{url}/v1/jobs/{done}").json()["status"] != "done":
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        finished = httpx.get(f"{url}/v1/jobs/{done}").json()
        pngs = [httpx.get(url + p).content for p in finished["images"]]
        long = httpx.post(url + "/v1/jobs", json={"n": 8, "steps": 1000, "seed": 2}).json()["id"]
        while httpx.get(f"{url}/v1/jobs/{long}").json()["step"] == 0:
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        proc.kill()  # SIGKILL mid-job: no clean shutdown at all
        proc.wait()
    assert not any(p.name.endswith(".tmp") for p in (out / "images").iterdir())
    with running_server(model, out) as (url, _):
        again = httpx.get(f"{url}/v1/jobs/{done}").json()
        assert again["status"] == "done" and [httpx.get(url + p).content for p in again["images"]] == pngs
        interrupted = httpx.get(f"{url}/v1/jobs/{long}").json()
        assert interrupted["status"] == "failed" and interrupted["error"] == "server restarted"
