"""The HTTP API (latentdiff.serve) in-process: jobs, batching, progress, cancel, uploads, errors, auth, restarts."""

import base64
import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from conftest import build_tiny_model
from fastapi.testclient import TestClient
from PIL import Image

from latentdiff.errors import ConfigError
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.keys import watermark_key
from latentdiff.pipeline.batch import batch_key, generate_batch
from latentdiff.serve.app import create_app
from latentdiff.serve.jobs import Job, JobQueue, JobStore


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return LatentDiffusion.load(tiny_model_dir)


@pytest.fixture(scope="module")
def slow_pipe(tmp_path_factory):
    """T = 1000 so that a 1000-step job runs long enough to be cancelled mid-way."""
    return LatentDiffusion.load(build_tiny_model(tmp_path_factory.mktemp("slow"), num_train_steps=1000))


def make_app(tmp_path, pipe, **kw):
    return create_app({"tiny": pipe}, tmp_path / "out", **kw)


def wait(client, job_id, timeout=30.0, headers=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['status']}")


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def read_png(client, path):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    return np.asarray(im), im.text


def test_generate_job_reproduces_the_seed_and_records_provenance(tmp_path, pipe):
    with TestClient(make_app(tmp_path, pipe)) as client:
        r = client.post("/v1/jobs", json={"kind": "generate", "n": 3, "seed": 5, "class": 1, "steps": 2})
        assert r.status_code == 202 and r.json()["status"] == "queued"
        job = wait(client, r.json()["id"])
        assert job["status"] == "done" and len(job["images"]) == 3 and "audio" not in job  # an image model
        expected, _ = pipe.generate(3, labels=1, seed=5, steps=2, watermark=watermark_key())  # marked in z_T
        for k, path in enumerate(job["images"]):
            img, text = read_png(client, path)
            assert np.array_equal(img, expected[k][..., 0])
            record = json.loads(text["latentdiff"])
            assert record["seed"] == 5 and record["labels"] == 1 and record["model"]["name"] == "tiny"
            assert record["watermark"]["scheme"] == "gaussian-shading-zT" and record["synthetic"] is True
        # the same request again: the same images (seeds reproduce)
        again = wait(client, client.post("/v1/jobs", json={"n": 3, "seed": 5, "class": 1, "steps": 2}).json()["id"])
        assert [read_png(client, p)[0].tobytes() for p in again["images"]] == \
               [read_png(client, p)[0].tobytes() for p in job["images"]]


def test_generate_batch_equals_each_request_alone(pipe):
    reqs = [pipe.request(n, labels=k, seed=s, sampler="ddim") for n, k, s in [(2, 0, 1), (1, 2, 7), (3, 1, 9)]]
    out = generate_batch(pipe, reqs)
    for r, images in zip(reqs, out):
        assert np.array_equal(images, pipe.generate(r)[0])
    key = watermark_key()
    for r, images in zip(reqs, generate_batch(pipe, reqs, watermark=key)):
        assert np.array_equal(images, pipe.generate(r, watermark=key)[0])
    # a different seed changes the images, so the equality above is not vacuous
    assert not np.array_equal(out[0], pipe.generate(reqs[0].replace(seed=2))[0])
    assert batch_key(pipe.request(1, sampler="ddpm")) is None  # stochastic: draws noise every step
    assert batch_key(pipe.request(1, sampler="ddim", eta=0.5)) is None
    with pytest.raises(ConfigError):
        generate_batch(pipe, [reqs[0], pipe.request(1, labels=0, steps=1)])


def test_server_batches_compatible_jobs_with_per_job_seeds(tmp_path, pipe):
    app = make_app(tmp_path, pipe)
    client = TestClient(app)  # no lifespan yet: the worker has not started, so the jobs wait together
    bodies = [{"n": 2, "seed": 11, "class": 0}, {"n": 1, "seed": 12, "class": 2}, {"n": 1, "seed": 13, "sampler": "ddpm"}]
    ids = [client.post("/v1/jobs", json=b).json()["id"] for b in bodies]
    assert client.get(f"/v1/jobs/{ids[2]}").json()["position"] == 3
    with TestClient(app) as client:
        jobs = [wait(client, i) for i in ids]
        assert app.state.worker.batches == [2, 1]  # the ddpm job is stochastic, so it runs alone
        for body, job in zip(bodies[:2], jobs):
            expected, _ = pipe.generate(body["n"], labels=body["class"], seed=body["seed"], watermark=watermark_key())
            got = np.stack([read_png(client, p)[0] for p in job["images"]])
            # the same up to float rounding: a batch of 3 and one of 1 differ by ~1e-6 before the 8-bit rounding,
            # which flips a pixel by one level where a value sits that close to a half level (1 pixel in 784 seen)
            diff = np.abs(got.astype(int) - expected[..., 0])
            assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_progress_events_and_cancel_within_a_step(tmp_path, slow_pipe):
    with TestClient(make_app(tmp_path, slow_pipe)) as client:
        job_id = client.post("/v1/jobs", json={"n": 1, "steps": 1000, "sampler": "ddim"}).json()["id"]
        steps = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    data = json.loads(line[5:])
                    if "step" in data and data.get("status") == "running" and data["step"] > 0:
                        steps.append(data["step"])
                        if data["preview"]:
                            assert Image.open(io.BytesIO(base64.b64decode(data["preview"]))).size == (28, 28)
                            client.post(f"/v1/jobs/{job_id}/cancel")
                    if data.get("status") in ("cancelled", "done", "failed"):
                        break
        job = wait(client, job_id)
        assert job["status"] == "cancelled" and job["images"] == []
        assert 0 < job["step"] < 1000 and steps == sorted(steps)


def test_cancel_a_queued_job_and_429_when_the_queue_is_full(tmp_path, pipe):
    client = TestClient(make_app(tmp_path, pipe, max_queued=2))  # worker not started
    a = client.post("/v1/jobs", json={"n": 1}).json()["id"]
    client.post("/v1/jobs", json={"n": 1})
    r = client.post("/v1/jobs", json={"n": 1})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
    assert client.post(f"/v1/jobs/{a}/cancel").json()["status"] == "cancelled"
    assert client.post("/v1/jobs", json={"n": 1}).status_code == 202  # the cancelled job freed its place


def _bomb_png(width=30000, height=30000) -> str:
    """A valid small PNG whose header declares width×height pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * (width + 1) * 16)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "malformed JSON"),
    ({"n": 2, "colour": "red"}, 422, "unknown field"),
    ({"kind": "edit", "n": 2, "image": "x"}, 422, "unknown field"),
    ({"n": 0}, 422, "n must be between"),
    ({"n": 65}, 422, "n must be between"),
    ({"steps": 0}, 422, "steps"),
    ({"guidance": -1}, 422, "guidance"),
    ({"class": 3}, 422, "class must be between 0 and 2"),
    ({"sampler": "nope"}, 422, "unknown sampler"),
    ({"seed": 2**70}, 422, "seed"),
    ({"model": "other"}, 422, "unknown model"),
    ({"kind": "paint"}, 422, "kind must be one of"),
    ({"batch_size": 4}, 422, "unknown field"),
    ({"kind": "edit", "image": "%%%"}, 422, "not valid base64"),
    ({"kind": "edit", "image": base64.b64encode(b"hello").decode()}, 422, "cannot read image"),
    ({"kind": "edit", "image": _bomb_png()}, 422, "declares 900000000 pixels"),  # the data layer's limit
    ({"kind": "edit", "image": _bomb_png(3000, 3000)}, 413, "declares 3000×3000"),  # the server's lower one
    ({"kind": "edit", "image": "A" * (6 << 20)}, 413, "larger than"),
    ({"kind": "inpaint", "image": png_b64(np.zeros((28, 28), np.uint8))}, 422, "needs an image and a mask"),
    ({"kind": "interpolate", "seeds": [1]}, 422, "two endpoints"),
    ({"kind": "combine", "images": []}, 422, "2 to"),
])
def test_bad_requests_get_a_json_error_with_a_4xx(tmp_path, pipe, body, status, needle):
    client = TestClient(make_app(tmp_path, pipe))
    if isinstance(body, str):
        r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"] and "Traceback" not in r.text


def test_edit_inpaint_combine_interpolate_and_multipart(tmp_path, pipe):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    mask = np.zeros((28, 28), np.uint8)
    mask[8:20, 8:20] = 255
    with TestClient(make_app(tmp_path, pipe)) as client:
        bodies = [{"kind": "edit", "image": png_b64(img), "strength": 0.5, "seed": 1},
                  {"kind": "inpaint", "image": png_b64(img), "mask": png_b64(mask)},
                  {"kind": "combine", "images": [png_b64(img), png_b64(255 - img)], "weights": [1, 3]},
                  {"kind": "interpolate", "seeds": [1, 2], "frames": 4, "class": 1},
                  {"kind": "interpolate", "images": [png_b64(img), png_b64(255 - img)], "frames": 3}]
        jobs = [wait(client, client.post("/v1/jobs", json=b).json()["id"]) for b in bodies]
        assert [len(j["images"]) for j in jobs] == [1, 1, 1, 4, 3], [j.get("error") for j in jobs]
        inpainted, text = read_png(client, jobs[1]["images"][0])
        keep = mask == 0
        assert np.array_equal(inpainted[keep], img[keep])  # pixels outside the mask are the input's
        assert json.loads(text["latentdiff"])["kind"] == "inpaint"
        assert json.loads(read_png(client, jobs[2]["images"][0])[1]["latentdiff"])["weights"] == [0.25, 0.75]
        # the same edit as a multipart upload gives the same image
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        r = client.post("/v1/jobs", data={"request": json.dumps({"kind": "edit", "strength": 0.5, "seed": 1})},
                        files={"image": ("in.png", buf.getvalue(), "image/png")})
        assert r.status_code == 202, r.text
        multi = wait(client, r.json()["id"])
        assert np.array_equal(read_png(client, multi["images"][0])[0], read_png(client, jobs[0]["images"][0])[0])


def test_models_docs_and_schema_from_the_request_fields(tmp_path, pipe):
    client = TestClient(make_app(tmp_path, pipe))
    models = client.get("/v1/models").json()["models"]
    assert models[0]["name"] == "tiny" and models[0]["classes"] == ["c0", "c1", "c2"]
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"class", "seed", "steps", "sampler", "guidance", "eta", "image", "mask", "frames"} <= set(body["properties"])
    assert "labels" not in body["properties"] and "batch_size" not in body["properties"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "http://x"}).headers


def test_token_guards_every_route_but_healthz(tmp_path, pipe):
    from latentdiff.cli.serve import check_exposure

    with pytest.raises(ConfigError, match="token"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(ConfigError, match="16 characters"):
        check_exposure("0.0.0.0", "short")
    assert check_exposure("127.0.0.1", None) is None and check_exposure("::1", None) is None
    token = "s3cret-token-0123456789"
    client = TestClient(make_app(tmp_path, pipe, token=token))
    assert client.get("/healthz").status_code == 200
    for method, path in [("get", "/v1/models"), ("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/docs"),
                         ("get", "/openapi.json"), ("get", "/v1/images/" + "0" * 32 + "-000.png")]:
        r = getattr(client, method)(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # the UI's static files hold no data: the page loads, then asks for the token on its first 401
    assert client.get("/").status_code == 200 and client.get("/ui/app.js").status_code == 200


def test_restart_reports_unfinished_jobs_as_failed(tmp_path):
    store = JobStore(tmp_path)
    for status in ("queued", "running", "done"):
        store.save(Job(status * 4 + "0" * (32 - 4 * len(status)), "generate", "m", {}, status=status,
                       images=["x.png"] if status == "done" else []))
    (tmp_path / "jobs" / "broken.json").write_text("{")
    queue = JobQueue(JobStore(tmp_path))
    statuses = {j.status: j for j in queue.jobs.values()}
    assert sorted(j.status for j in queue.jobs.values()) == ["done", "failed", "failed"]
    assert all(j.error == "server restarted" for j in queue.jobs.values() if j.status == "failed")
    assert statuses["done"].images == ["x.png"]
    on_disk = [json.loads(p.read_text())["status"] for p in (tmp_path / "jobs").glob("*0.json")]
    assert sorted(on_disk) == ["done", "failed", "failed"]  # saved, so a second restart agrees


def test_cli_refuses_an_open_address_without_a_token(tiny_model_dir, latentdiff_cli, monkeypatch):
    from conftest import assert_one_line_error

    monkeypatch.delenv("LATENTDIFF_TOKEN", raising=False)
    code, _, err = latentdiff_cli("serve", "--model", tiny_model_dir, "--host", "0.0.0.0")
    assert_one_line_error(code, err, "give a token with --token or LATENTDIFF_TOKEN")
    code, _, err = latentdiff_cli("serve", "--model", tiny_model_dir, "--port", "70000")
    assert_one_line_error(code, err, "--port")


def test_control_operations_call_back_every_step(pipe):
    from latentdiff.pipeline import control, inpaint

    img = np.random.default_rng(1).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
    mask = np.zeros((28, 28), bool)
    mask[4:9, 4:9] = True
    for run in (lambda cb: control.img2img(pipe, img, 1.0, steps=2, callback=cb),
                lambda cb: inpaint.inpaint(pipe, img, mask, steps=2, callback=cb),
                lambda cb: control.combine(pipe, np.concatenate([img, img]), [1, 1], 1.0, steps=2, callback=cb),
                lambda cb: control.interpolate_seeds(pipe, 1, 2, 3, steps=2, callback=cb)):
        calls = []
        run(lambda i, n, x0: calls.append((i, n, tuple(x0.shape[1:]))))
        assert calls == [(0, 2, pipe.autoencoder.latent_shape), (1, 2, pipe.autoencoder.latent_shape)]

        def stop(i, n, x0):
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            run(stop)


def test_multipart_errors(tmp_path, pipe):
    client = TestClient(make_app(tmp_path, pipe))
    big = client.post("/v1/jobs", data={"request": json.dumps({"kind": "edit"})},
                      files={"image": ("in.png", b"\x89PNG" + b"0" * (5 << 20), "image/png")})
    assert big.status_code == 413 and "error" in big.json()
    tiny = {"image": ("in.png", b"x", "image/png")}  # a file part makes the body multipart
    odd = client.post("/v1/jobs", data={"request": "{}", "other": "1"}, files=tiny)
    assert odd.status_code == 422 and "unknown multipart field" in odd.json()["error"]
    bad = client.post("/v1/jobs", data={"request": "{oops"}, files=tiny)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]


def test_two_models_each_job_runs_on_its_own(tmp_path, pipe, slow_pipe):
    app = create_app({"a": pipe, "b": slow_pipe}, tmp_path / "out")
    client = TestClient(app)  # queue both before the worker starts: different models never share a batch
    ids = [client.post("/v1/jobs", json={"model": m, "n": 1, "seed": 4, "steps": 2}).json()["id"] for m in "ab"]
    assert client.post("/v1/jobs", json={"model": "b", "class": 0, "steps": 1001}).status_code == 422
    with TestClient(app) as client:
        jobs = [wait(client, i) for i in ids]
        assert app.state.worker.batches == [1, 1]
        for job, p in zip(jobs, (pipe, slow_pipe)):
            img, text = read_png(client, job["images"][0])
            assert json.loads(text["latentdiff"])["model"]["name"] == job["model"]
            assert np.array_equal(img, p.generate(1, seed=4, steps=2, watermark=watermark_key())[0][0, ..., 0])


def test_audio_model_job_lists_wavs_with_the_pngs_record(tmp_path):
    """An audio model's generate job: the PNG is the spectrogram (low frequencies at the bottom) and a WAV
    with the same provenance record sits beside it, served from /v1/audio as audio/wav."""
    from latentdiff.codecs.mel import uint8_to_waves
    from latentdiff.utils.audio import read_wav, to_int16

    digits = LatentDiffusion.load("pretrained:spoken-digits")
    with TestClient(create_app({"digits": digits}, tmp_path / "out")) as client:
        assert client.get("/v1/models").json()["models"][0]["modality"] == "audio"
        job = wait(client, client.post("/v1/jobs", json={"n": 1, "seed": 3, "class": 7, "steps": 2}).json()["id"],
                   timeout=120)
        assert job["status"] == "done" and len(job["images"]) == len(job["audio"]) == 1
        assert job["audio"][0] == job["images"][0].replace("/v1/images/", "/v1/audio/").replace(".png", ".wav")
        expected, _ = digits.generate(1, labels=7, seed=3, steps=2, watermark=watermark_key())
        img, text = read_png(client, job["images"][0])
        assert np.array_equal(img, expected[0, ::-1, :, 0])  # row 0 (lowest mel band) is at the bottom
        r = client.get(job["audio"][0])
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        (tmp_path / "got.wav").write_bytes(r.content)
        wave, rate, record = read_wav(tmp_path / "got.wav")
        assert rate == digits.cfg.mel.sample_rate and record == json.loads(text["latentdiff"])
        assert record["seed"] == 3 and record["griffin_lim_iters"] == digits.cfg.mel.griffin_lim_iters
        want = to_int16(uint8_to_waves(expected, digits.cfg.mel, seed=3)[0]) / 32768.0
        assert wave.shape == want.shape and np.abs(wave - want).max() <= 2 / 32768 and np.abs(want).max() > 0.01
        name = job["audio"][0].rsplit("/", 1)[1]
        for bad in (name.replace(".wav", ".png"), "x" + name, "..%2Fjobs%2F" + name):
            assert client.get(f"/v1/audio/{bad}").status_code == 404


def test_preview_of_a_spectrogram_is_flipped_like_the_saved_png(pipe):
    import torch

    from latentdiff.serve.worker import preview_png

    x0 = torch.randn(1, *pipe.autoencoder.latent_shape, generator=torch.Generator().manual_seed(0))
    up, down = (np.asarray(Image.open(io.BytesIO(base64.b64decode(preview_png(pipe, x0, f))))) for f in (False, True))
    assert up.std() > 0 and not np.array_equal(up, down) and np.array_equal(up[::-1], down)


def test_model_info_names_text_conditioning_so_the_ui_shows_the_prompt_box():
    from types import SimpleNamespace

    from latentdiff.pipeline.config import load_config
    from latentdiff.serve.app import model_info

    cfg = load_config(preset="emoji")
    pipe = SimpleNamespace(cfg=cfg, image_shape=(3, 64, 64), class_names=(), num_classes=0, has_text=True)
    assert model_info("emoji", pipe)["conditioning"] == "text"
    pipe.has_text, pipe.num_classes = False, 10
    assert model_info("fm", pipe)["conditioning"] == "class"
