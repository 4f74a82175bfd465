"""The HTTP API and web UI: a FastAPI app over a job queue and one worker thread.

Routes (OpenAPI document at /docs, served from the package, no CDN): ``POST /v1/jobs``, ``GET /v1/jobs``,
``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (server-sent events), ``POST /v1/jobs/{id}/cancel``,
``GET /v1/images/{name}``, ``GET /v1/audio/{name}`` (an audio model's WAVs), ``GET /v1/models``, ``GET /healthz``, and the UI at ``/``. Every error is a JSON
body ``{"error": message}`` with a 4xx status; a bug is a 500 with no traceback in the body.

With a token every route needs ``Authorization: Bearer TOKEN`` except /healthz and the UI's static files
(they hold no data; the UI sends the token with each of its API calls).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from latentdiff.serve import schema, uploads
from latentdiff.serve.jobs import AUDIO_NAME, FINISHED, IMAGE_NAME, JobQueue, JobStore
from latentdiff.serve.worker import Worker

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 24 << 20  # a whole request body (JSON with base64 images, or multipart)
PUBLIC = ("/healthz", "/", "/ui/", "/favicon.ico")
STATIC = files("latentdiff.serve") / "static"


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request) -> dict:
    """The job body from JSON or multipart (a `request` JSON field plus `image`, `mask`, `images` files)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise schema.ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_multipart(request)
    if ctype not in ("application/json", ""):
        raise schema.ApiError(415, f"send the job as application/json or multipart/form-data, not {ctype}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise schema.ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return _json(bytes(data))


def _json(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise schema.ApiError(400, f"malformed JSON: {str(e)[:200]}") from None


async def _read_multipart(request: Request) -> dict:
    try:
        form = await request.form(max_files=schema.MAX_COMBINE + 2, max_fields=4,
                                  max_part_size=uploads.MAX_UPLOAD_BYTES)
    except Exception as e:  # python-multipart / starlette parse errors (a part over max_part_size among them)
        status = 413 if "maximum size" in str(e) else 400
        raise schema.ApiError(status, f"malformed or oversized multipart body: {str(e)[:200]}") from None
    body = {}
    for key in form:
        values = form.getlist(key)
        if key == "request":
            body.update(_json(values[0].encode() if isinstance(values[0], str) else await values[0].read()))
        elif key in schema.IMAGE_FIELDS:
            blobs = [await v.read() if hasattr(v, "read") else v for v in values]
            body[key] = blobs if key == "images" else blobs[0]
        else:
            raise schema.ApiError(422, f"unknown multipart field {key!r}: send `request` (JSON) and image files")
    return body


def _check_token(request: Request, token: str | None) -> JSONResponse | None:
    path = request.url.path
    if token is None or path in PUBLIC or path.startswith("/ui/"):
        return None
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return error(401, "missing or wrong token: send the header `Authorization: Bearer TOKEN`",
                     {"WWW-Authenticate": "Bearer"})
    return None


def model_info(name: str, pipe) -> dict:
    from latentdiff.sampling.samplers import SAMPLERS

    s = pipe.cfg.sample
    return {"name": name, "modality": pipe.cfg.modality, "image_shape": list(pipe.image_shape), "classes": list(pipe.class_names),
            "conditioning": "text" if pipe.has_text else "class" if pipe.num_classes else "none",
            "defaults": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance},
            "samplers": list(SAMPLERS), "kinds": list(schema.KINDS)}


def create_app(models: dict, out: str | Path, *, token: str | None = None, max_queued: int = 64,
               batching: bool = True, max_batch_images: int = 64, watermark: bool = True) -> FastAPI:
    """The app for loaded `models` (name -> LatentDiffusion), keeping jobs and images under `out`. Generated
    images carry this installation's watermark (``latentdiff keys``) unless `watermark` is False."""
    from latentdiff.pipeline.keys import watermark_key

    queue = JobQueue(JobStore(Path(out)), max_queued)
    worker = Worker(queue, models, batching=batching, max_batch_images=max_batch_images,
                    watermark=watermark_key() if watermark else None)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()
        worker.join(timeout=30)

    app = FastAPI(title="latentdiff", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Latent diffusion jobs: generate, edit, inpaint, interpolate, combine.")
    app.state.queue, app.state.worker = queue, worker
    _errors(app)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        return _check_token(request, token) or await call_next(request)

    _api_routes(app, models, queue)
    _ui_routes(app)
    return app


def _errors(app: FastAPI):
    @app.exception_handler(schema.ApiError)
    async def api_error(request, e: schema.ApiError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        return error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "internal server error; see the server log")


def _api_routes(app: FastAPI, models: dict, queue: JobQueue):
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models():
        return {"models": [model_info(name, pipe) for name, pipe in models.items()]}

    @app.post("/v1/jobs", status_code=202, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.openapi_body()}}}})
    async def submit(request: Request):
        """Queue a job; answers at once with its id (429 with Retry-After when the queue is full)."""
        body = await read_body(request)
        spec = await run_in_threadpool(schema.parse_job, body, models, uploads.decode)
        job = queue.submit(spec)
        return JSONResponse({"id": job.id, "status": job.status}, status_code=202)

    @app.get("/v1/jobs")
    def list_jobs(limit: int = 50):
        jobs = sorted(queue.jobs.values(), key=lambda j: j.created, reverse=True)[:max(0, min(limit, 500))]
        return {"jobs": [j.public(queue.position(j)) for j in jobs]}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str):
        job = queue.get(job_id)
        return job.public(queue.position(job))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        job = queue.cancel(job_id)
        return job.public(queue.position(job))

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        from sse_starlette.sse import EventSourceResponse

        return EventSourceResponse(_event_stream(queue, queue.get(job_id), request), ping=10)

    def output_file(name: str, pattern, media_type: str, what: str) -> FileResponse:
        """A finished output from the output folder; only names of our own pattern, so no path can escape it."""
        path = queue.store.images_dir / name
        if not pattern.match(name) or not path.is_file():
            raise schema.ApiError(404, f"no {what} {name!r}")
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/v1/images/{name}")
    def image(name: str):
        return output_file(name, IMAGE_NAME, "image/png", "image")

    @app.get("/v1/audio/{name}")
    def audio(name: str):
        return output_file(name, AUDIO_NAME, "audio/wav", "audio")


async def _event_stream(queue: JobQueue, job, request: Request):
    """`progress` events (step, total, preview) while the job runs, then one `end` event with the job."""
    seen = -1
    while True:
        if await request.is_disconnected():
            return
        if job.version != seen:
            seen = job.version
            if job.status in FINISHED:
                yield {"event": "end", "data": json.dumps(job.public())}
                return
            yield {"event": "progress", "data": json.dumps({"status": job.status, "step": job.step,
                                                            "total": job.total, "position": queue.position(job),
                                                            "preview": job.preview})}
        await asyncio.sleep(0.05)


def _ui_routes(app: FastAPI):
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/ui", StaticFiles(directory=str(STATIC)), name="ui")

    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    try:  # the OpenAPI page from the swagger-ui-bundle package (the `serve` extra), never from a CDN
        import swagger_ui_bundle
    except ImportError:
        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="latentdiff API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
