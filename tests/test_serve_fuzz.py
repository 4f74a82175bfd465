"""Fuzzing the JSON API with hypothesis: whatever the body, never a 500 and never a traceback."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentdiff.pipeline import LatentDiffusion
from latentdiff.serve.app import create_app
from latentdiff.serve.schema import KIND_FIELDS, request_fields

KEYS = ["kind", "model", *request_fields(), *{k for f in KIND_FIELDS.values() for k in f}, "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["generate", "edit", "inpaint", "interpolate", "combine",
                                                           "tiny", "ddim", "ddpm", "trailing", "fp32", "iVBORw0KGgo="]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                             max_size=3), max_leaves=6)
bodies = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    app = create_app({"tiny": LatentDiffusion.load(tiny_model_dir)}, tmp_path_factory.mktemp("fuzz"), max_queued=10**6)
    return TestClient(app)  # the worker is not started: accepted jobs only queue


def check(r):
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text and "File \"" not in r.text
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    else:
        assert r.status_code == 202 and r.json()["status"] == "queued"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_json_bodies_never_give_a_500(client, body):
    # encoded here: Python's JSON writes inf/nan as Infinity/NaN, which a client may send (httpx refuses to)
    check(client.post("/v1/jobs", content=json.dumps(body).encode(), headers={"content-type": "application/json"}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                     bodies.map(lambda b: json.dumps(b)[:-1].encode())))
def test_raw_bytes_never_give_a_500(client, raw):
    check(client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(min_size=1, max_size=40).filter(lambda p: "/" not in p and p not in (".", "..")))
def test_job_and_image_paths_never_give_a_500(client, path):
    from urllib.parse import quote

    for url in (f"/v1/jobs/{quote(path, safe='')}", f"/v1/images/{quote(path, safe='')}"):
        r = client.get(url)
        assert r.status_code == 404, (url, r.status_code)
        assert "error" in r.json()
