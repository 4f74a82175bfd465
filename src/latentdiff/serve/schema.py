"""The job body of ``POST /v1/jobs``: SampleRequest's fields (introspected, so a field added there appears
here) plus the fields of each kind of job, parsed into a :class:`JobSpec` and validated by the pipeline's
own checks (``SampleRequest.resolve``, the image decoders of ``latentdiff.data``).

Every problem is an :class:`ApiError` with the HTTP status to answer and a one-line message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from latentdiff.errors import LatentDiffError
from latentdiff.pipeline.request import SampleRequest

KINDS = ("generate", "edit", "inpaint", "interpolate", "combine")
# SampleRequest fields the server decides (batching, compilation) rather than the client.
SERVER_FIELDS = {"resolved", "batch_size", "compile"}
RENAMED = {"labels": "class"}  # the CLI flag's name
MAX_IMAGES_PER_JOB = 64
MAX_FRAMES = 64
MAX_COMBINE = 8


class ApiError(Exception):
    """A client error: HTTP `status` and a message meant for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def request_fields() -> dict[str, str]:
    """API name -> SampleRequest field name, for every field a client may set."""
    return {RENAMED.get(f.name, f.name): f.name for f in dataclasses.fields(SampleRequest)
            if f.name not in SERVER_FIELDS}


# kind -> its own fields (besides "kind", "model" and the SampleRequest fields), with a JSON-schema type each.
KIND_FIELDS: dict[str, dict[str, dict]] = {
    "generate": {},
    "edit": {"image": {"type": "string", "description": "base64 PNG/JPEG"},
             "strength": {"type": "number", "default": 0.6}},
    "inpaint": {"image": {"type": "string", "description": "base64 PNG/JPEG"},
                "mask": {"type": "string", "description": "base64 PNG of the image's size; white = regenerate"},
                "resample": {"type": "integer", "default": 0}},
    "interpolate": {"seeds": {"type": "array", "items": {"type": "integer"}},
                    "images": {"type": "array", "items": {"type": "string"}},
                    "frames": {"type": "integer", "default": 8}},
    "combine": {"images": {"type": "array", "items": {"type": "string"}},
                "weights": {"type": "array", "items": {"type": "number"}},
                "strength": {"type": "number", "default": 0.5}},
}
IMAGE_FIELDS = {"image", "mask", "images"}  # base64 strings in JSON, or multipart file parts


@dataclass
class JobSpec:
    """A validated job: what the worker runs. `images`/`mask` are decoded uint8 arrays."""

    kind: str
    model: str
    request: SampleRequest                    # resolved against the model
    options: dict = field(default_factory=dict)   # the kind's own settings (strength, frames, ...), JSON-ready
    images: object = None                     # uint8 N×H×W×C for edit/inpaint/combine/interpolate-by-image
    mask: object = None                       # bool H×W for inpaint

    def record(self) -> dict:
        """The job's provenance record: kind, model, the resolved request and the kind's settings."""
        return {"kind": self.kind, **self.request.to_dict(), **self.options}


def openapi_body() -> dict:
    """The JSON schema of the job body, for the OpenAPI document at /docs."""
    props = {"kind": {"type": "string", "enum": list(KINDS), "default": "generate"},
             "model": {"type": "string", "description": "a name from GET /v1/models (default: the first)"}}
    for api_name, name in request_fields().items():
        default = next(f.default for f in dataclasses.fields(SampleRequest) if f.name == name)
        props[api_name] = {"description": f"SampleRequest.{name}", **({"default": default}
                                                                      if default is not None else {})}
    for kind_fields in KIND_FIELDS.values():
        props.update(kind_fields)
    return {"type": "object", "properties": props, "additionalProperties": False,
            "example": {"kind": "generate", "n": 4, "steps": 10, "seed": 1, "class": 7}}


_ANNOTATIONS = {f.name: str(f.type) for f in dataclasses.fields(SampleRequest)}


def _check_json_type(api_name: str, value, annotation: str) -> None:
    """A JSON value against a SampleRequest field's annotation (a string: the module uses postponed
    annotations): the value checks themselves stay in SampleRequest.resolve."""
    if value is None:
        if "None" in annotation:
            return
        raise ApiError(422, f"{api_name} cannot be null")
    if isinstance(value, list) and annotation.startswith("tuple[int"):  # labels: one class per image
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return
        raise ApiError(422, f"{api_name} must be an integer or a list of integers")
    expected = {"str": (str,), "int": (int,), "float": (int, float), "tuple[int": (int,), "bool": (bool,)}
    for prefix, types in expected.items():
        if annotation.startswith(prefix):
            if isinstance(value, types) and (prefix == "bool" or not isinstance(value, bool)):
                return
            what = {"str": "a string", "int": "an integer", "float": "a number", "tuple[int": "an integer",
                    "bool": "true or false"}[prefix]
            raise ApiError(422, f"{api_name} must be {what}, got {json_repr(value)}")
    raise ApiError(422, f"{api_name}: unsupported value {json_repr(value)}")


def json_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok_type:
        raise ApiError(422, f"{name} must be {'an integer' if integer else 'a number'}, got {json_repr(value)}")
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be between {low:g} and {high:g}, got {json_repr(value)}")
    return value


def parse_job(body, models: dict, decode) -> JobSpec:
    """Validate a job body (a JSON object) against the loaded `models` (name -> LatentDiffusion).

    `decode(kind_of_field, value, pipe, size=None)` turns an uploaded image or mask into an array (see uploads.py).
    """
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object")
    kind = body.get("kind", "generate")
    if kind not in KINDS:
        raise ApiError(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    allowed = {"kind", "model"} | set(request_fields()) | set(KIND_FIELDS[kind])
    if kind != "generate":
        allowed.discard("n")  # the inputs decide how many images come out
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(422, f"unknown field(s) for a {kind} job: {', '.join(map(str, unknown))}")
    model = body.get("model", next(iter(models)))
    if not isinstance(model, str) or model not in models:
        raise ApiError(422, f"unknown model {model!r}; GET /v1/models lists {', '.join(models)}")
    pipe = models[model]
    fields = {name: body[api] for api, name in request_fields().items() if api in body}
    for api, name in request_fields().items():
        if api in body:
            _check_json_type(api, body[api], _ANNOTATIONS[name])
    if kind == "generate":
        fields["n"] = _number(body, "n", 1, 1, MAX_IMAGES_PER_JOB, integer=True)
    try:
        spec = _KIND_PARSERS[kind](body, pipe, fields, decode)
        spec.model = model
        return spec
    except LatentDiffError as e:  # the pipeline's own validation: the request is at fault
        raise ApiError(422, str(e)) from None


def _resolve(pipe, fields: dict, n: int) -> SampleRequest:
    fields = {**fields, "n": n}
    if "labels" in fields and isinstance(fields["labels"], list):
        fields["labels"] = tuple(fields["labels"])
    return pipe.request(SampleRequest.build(**fields))


def _generate(body, pipe, fields, decode) -> JobSpec:
    return JobSpec("generate", "", _resolve(pipe, fields, fields.pop("n")))


def _edit(body, pipe, fields, decode) -> JobSpec:
    if "image" not in body:
        raise ApiError(422, "an edit job needs an image")
    strength = _number(body, "strength", 0.6, 0.0, 1.0)
    if strength == 0:
        raise ApiError(422, "strength must be in (0, 1], got 0")
    image, _ = decode("image", body["image"], pipe)
    return JobSpec("edit", "", _resolve(pipe, fields, 1), {"strength": strength}, images=image)


def _inpaint(body, pipe, fields, decode) -> JobSpec:
    if "image" not in body or "mask" not in body:
        raise ApiError(422, "an inpaint job needs an image and a mask")
    resample = _number(body, "resample", 0, 0, 20, integer=True)
    image, size = decode("image", body["image"], pipe)
    mask = decode("mask", body["mask"], pipe, size=size)
    if not mask.any():
        raise ApiError(422, "the mask is empty: paint (white) what to regenerate")
    return JobSpec("inpaint", "", _resolve(pipe, fields, 1), {"resample": resample}, images=image, mask=mask)


def _interpolate(body, pipe, fields, decode) -> JobSpec:
    import numpy as np

    frames = _number(body, "frames", 8, 2, MAX_FRAMES, integer=True)
    if ("seeds" in body) == ("images" in body):
        raise ApiError(422, "an interpolate job needs either seeds [A, B] or images [A, B]")
    ends = body.get("seeds", body.get("images"))
    if not isinstance(ends, list) or len(ends) != 2:
        raise ApiError(422, "seeds / images must be a list of two endpoints")
    options = {"frames": frames}
    images = None
    if "seeds" in body:
        for s in ends:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
                raise ApiError(422, f"seeds must be integers between 0 and 2^63-1, got {s!r}")
        options["seeds"] = list(ends)
    else:
        images = np.concatenate([decode("image", e, pipe)[0] for e in ends])
    if "images" in body or "guidance" not in fields:
        fields.setdefault("guidance", 1.0 if "images" in body else pipe.cfg.sample.guidance)
    fields["sampler"] = "ddim"  # interpolation regenerates with deterministic DDIM
    return JobSpec("interpolate", "", _resolve(pipe, fields, frames), options, images=images)


def _combine(body, pipe, fields, decode) -> JobSpec:
    import numpy as np

    ends = body.get("images")
    if not isinstance(ends, list) or not 2 <= len(ends) <= MAX_COMBINE:
        raise ApiError(422, f"a combine job needs 2 to {MAX_COMBINE} images")
    weights = body.get("weights", [1.0] * len(ends))
    if (not isinstance(weights, list) or len(weights) != len(ends)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < 1e6 for w in weights)):
        raise ApiError(422, "weights must be one positive number (below 1e6) per image")
    strength = _number(body, "strength", 0.5, 0.0, 1.0)
    if strength == 0:
        raise ApiError(422, "strength must be in (0, 1], got 0")
    images = np.concatenate([decode("image", e, pipe)[0] for e in ends])
    total = float(sum(weights))
    return JobSpec("combine", "", _resolve(pipe, fields, 1),
                   {"weights": [w / total for w in weights], "strength": strength}, images=images)


_KIND_PARSERS = {"generate": _generate, "edit": _edit, "inpaint": _inpaint, "interpolate": _interpolate,
                 "combine": _combine}
