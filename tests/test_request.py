"""SampleRequest: every knob of a generation resolved against the model and checked in one place."""

import json

import numpy as np
import pytest
from PIL import Image

from latentdiff.errors import ConfigError
from latentdiff.pipeline import LatentDiffusion, SampleRequest
from latentdiff.pipeline.request import ModelDefaults

DEFAULTS = ModelDefaults(sampler="ddim", steps=50, guidance=2.0, num_train_steps=1000, num_classes=10)


def test_resolve_fills_the_model_defaults_once():
    req = SampleRequest(n=3, labels=7).resolve(DEFAULTS)
    assert (req.sampler, req.steps, req.guidance, req.spacing, req.labels) == ("ddim", 50, 2.0, "trailing", (7, 7, 7))
    assert req.resolved and req.resolve(DEFAULTS) == req  # resolving again changes nothing
    assert req.to_dict()["labels"] == 7 and json.loads(json.dumps(req.to_dict())) == req.to_dict()
    mixed = SampleRequest(n=2, labels=(1, 2), sampler="heun", steps=5, guidance=0.0).resolve(DEFAULTS)
    assert mixed.to_dict()["labels"] == [1, 2] and mixed.guidance == 0.0 and mixed.sampler == "heun"


@pytest.mark.parametrize("fields, message", [
    (dict(sampler="fastest"), "unknown sampler 'fastest'"),
    (dict(steps=0), "steps must be an integer between 1 and 1000"),
    (dict(steps=1001), "steps must be an integer between 1 and 1000"),
    (dict(spacing="zigzag"), "unknown timestep spacing"),
    (dict(guidance=1e30), "guidance must be a finite number between 0 and 100"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance=-1.0), "guidance must be a finite number"),
    (dict(classifier_scale=1e30, labels=1), "classifier scale must be a finite number"),
    (dict(classifier_scale=2.0), "classifier guidance needs the classes"),
    (dict(eta=1.5), "eta must be a finite number between 0 and 1"),
    (dict(labels=10), "class must be between 0 and 9"),
    (dict(labels=np.array([2**63], dtype=np.uint64)), "class must be between 0 and 9"),
    (dict(labels=(1, 2, 3)), "got 3 labels for 2 images"),
    (dict(labels=(1.5, 2.0)), "class labels must be integers"),
    (dict(seed=-1), "seed must be between 0"),
    (dict(batch_size=0), "batch size must be between 1"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(compile="fastest"), "unknown compile mode"),
])
def test_every_field_is_checked_with_a_clear_message(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SampleRequest(n=2, **fields).resolve(DEFAULTS)


def test_an_unconditional_model_refuses_labels_unless_a_classifier_guides():
    uncond = ModelDefaults("ddim", 50, 1.0, 1000, num_classes=0, classifier_classes=10)
    with pytest.raises(ConfigError, match="unconditional"):
        SampleRequest(n=1, labels=3).resolve(uncond)
    assert SampleRequest(n=1, labels=3, classifier_scale=2.0).resolve(uncond).labels == (3,)


def test_build_accepts_keyword_fields_and_refuses_unknown_ones():
    assert SampleRequest.build(4, compile=True).compile == "default"
    assert SampleRequest.build(4, compile=False).compile is None
    with pytest.raises(ConfigError, match="unknown sampling option"):
        SampleRequest.build(4, label=3)


def test_the_same_request_gives_the_same_images_through_both_spellings(tiny_model_dir):
    pipe = LatentDiffusion.load(tiny_model_dir)
    a, la = pipe.generate(SampleRequest(n=3, labels=(0, 1, 2), steps=2, seed=5))
    b, lb = pipe.generate(3, labels=[0, 1, 2], steps=2, seed=5)
    assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_every_command_records_the_resolved_request(tiny_model_dir, latentdiff_cli, tmp_path):
    """Provenance is the same record everywhere: `edit` records the guidance it used, not None."""
    code, _, err = latentdiff_cli("sample", "--model", tiny_model_dir, "--n", 3, "--class", 1, "--out",
                                  tmp_path / "s.png", "--no-progress")
    assert code == 0, err
    sampled = json.loads(Image.open(tmp_path / "s.png").text["latentdiff"])
    code, _, err = latentdiff_cli("edit", tmp_path / "s.png", "--model", tiny_model_dir, "--class", 1, "--out",
                                  tmp_path / "e.png")
    assert code == 2 or code == 0, err  # a grid of 3 is not the model's size: either refused or resized
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "in.png")
    code, _, err = latentdiff_cli("edit", tmp_path / "in.png", "--model", tiny_model_dir, "--class", 1, "--out",
                                  tmp_path / "e.png")
    assert code == 0, err
    edited = json.loads(Image.open(tmp_path / "e.png").text["latentdiff"])
    request_keys = set(SampleRequest().to_dict())
    assert request_keys <= set(sampled) and request_keys <= set(edited)
    assert edited["guidance"] == sampled["guidance"] == LatentDiffusion.load(tiny_model_dir).cfg.sample.guidance
    assert edited["sampler"] == sampled["sampler"] and edited["labels"] == sampled["labels"] == 1


def test_a_non_finite_sample_is_one_clear_error(tiny_model_dir, monkeypatch, latentdiff_cli, tmp_path):
    """Issue 12, item 5: huge guidance or broken weights give NaN/inf: an error naming the cause, no image."""
    from latentdiff.errors import ModelError
    from latentdiff.pipeline import control

    pipe = LatentDiffusion.load(tiny_model_dir)
    monkeypatch.setattr(pipe.autoencoder, "from_latent", lambda z: z.new_full((len(z), 1, 28, 28), float("nan")))
    with pytest.raises(ModelError, match=r"non-finite values .* \(guidance 50, classifier scale 0\): the guidance"):
        pipe.generate(2, steps=2, guidance=50.0)
    with pytest.raises(ModelError, match="non-finite values"):
        control.img2img(pipe, np.zeros((1, 28, 28, 1), np.uint8), 0.5, steps=2)
    code, _, err = latentdiff_cli("sample", "--model", tiny_model_dir, "--guidance", "1e30", "--out", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 1 and "guidance must be a finite number between 0 and 100" in err
    assert not (tmp_path / "x.png").exists()


def test_an_eps_schedule_whose_abar_underflows_is_refused_at_config_time():
    """Issue 12, item 5: ε-prediction with β_end = 0.9999 trained, then could never sample; now it is refused."""
    from latentdiff.pipeline.config import load_config

    with pytest.raises(ConfigError, match="too small for ε-prediction"):
        load_config(preset="tiny", overrides=["diffusion.prediction=eps", "diffusion.beta_end=0.9999"])
    load_config(preset="tiny", overrides=["diffusion.prediction=eps", "diffusion.schedule=cosine"])  # ᾱ_T 2e-9: fine
    load_config(preset="tiny", overrides=["diffusion.beta_end=0.9999"])  # v-prediction has no such limit


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_individual_writes_the_set_and_the_grid_together_or_nothing(failure, tiny_model_dir, latentdiff_cli,
                                                                        monkeypatch, tmp_path):
    """Issue 12, item 8: a full disk (or Ctrl-C) half-way through --save-individual leaves no PNG and no grid."""
    from latentdiff.pipeline import provenance as ld_images  # every CLI image goes through write_output (issue 15)

    real, calls = ld_images.write_output, []

    def flaky(path, img, record, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise failure
        return real(path, img, record, **kw)

    monkeypatch.setattr(ld_images, "write_output", flaky)
    code, _, err = latentdiff_cli("sample", "--model", tiny_model_dir, "--n", 5, "--steps", 2, "--no-progress",
                                  "--out", tmp_path / "grid.png", "--save-individual", tmp_path / "each")
    assert code == (2 if isinstance(failure, OSError) else 130), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no grid, no folder, no temporary folder
    monkeypatch.setattr(ld_images, "write_output", real)
    code, _, err = latentdiff_cli("sample", "--model", tiny_model_dir, "--n", 5, "--steps", 2, "--no-progress",
                                  "--out", tmp_path / "grid.png", "--save-individual", tmp_path / "each")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["each", "grid.png"]
