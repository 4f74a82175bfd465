"""Issue 15, item 4: the class-histogram bias report (evaluation/bias.py, `latentdiff eval --bias`)."""

import json

import numpy as np
import pytest

from latentdiff.evaluation.bias import compare, histogram


def test_histogram_counts_each_class_in_its_own_bin():
    h = histogram(np.array([0, 2, 2, 2, 1]), 4)
    assert h.tolist() == pytest.approx([0.2, 0.2, 0.6, 0.0])


def test_compare_names_the_over_and_under_produced_class():
    ref = np.full(4, 0.25)
    r = compare(np.array([3] * 7 + [0, 1, 2] + [1] * 0), ref)  # class 3 over, classes 0-2 under
    assert r["most_over"] == 3 and r["most_over_by"] == pytest.approx(0.7 - 0.25)
    assert r["most_under"] in (0, 1, 2) and r["most_under_by"] == pytest.approx(0.1 - 0.25)
    assert r["tv_distance"] == pytest.approx(0.45)  # ½ Σ|p - q| = ½ (0.45 + 3·0.15)
    assert r["chi2_p"] < 0.05
    fair = compare(np.arange(400) % 4, ref)
    assert fair["tv_distance"] == 0 and fair["chi2_p"] == pytest.approx(1.0)


def test_eval_bias_cli(tiny_model_dir, latentdiff_cli):
    code, out, err = latentdiff_cli("eval", "--model", tiny_model_dir, "--bias", "--n", 12, "--bias-guidance", "1,3",
                                    "--reference", "bundled", "--json", "--steps", 2)
    assert code == 0, err
    rep = json.loads(out)
    assert [r["setting"] for r in rep["rows"]] == ["unconditional", "guidance 1", "guidance 3"]
    assert all(abs(sum(r["histogram"]) - 1) < 1e-3 and r["n"] == 12 for r in rep["rows"])
    code, _, err = latentdiff_cli("eval", "--bias", "--samples", "x.npz")
    assert code == 2


# --- text-to-image (emoji) models: category histograms and the skin tones of person prompts -------------------

def _single_tone_people(data):
    """Indices of images with one known tone: every single-tone variant, and the bases of emoji with variants."""
    from latentdiff.evaluation.skin_tone import person_groups, tone_index

    bases = {g[0] for g in person_groups(data).values()}
    return [i for i, t in enumerate(data.tones) if (t and tone_index(t) is not None) or i in bases]


def test_tone_names_follow_the_data_sets_modifiers():
    from latentdiff.data.emoji import SKIN_TONES
    from latentdiff.evaluation.skin_tone import TONE_BINS, TONE_CLASSES, UNCLEAR, tone_fractions, tone_index

    assert TONE_CLASSES == ("default", *SKIN_TONES.values())  # light (1F3FB) … dark (1F3FF), in order
    assert TONE_BINS[UNCLEAR] == "unclear" and len(TONE_BINS) == 7
    assert tone_index("") == 0 and tone_index("medium skin tone") == 3
    assert tone_index("dark skin tone, dark skin tone") == 5 and tone_index("light skin tone, dark skin tone") is None
    assert tone_fractions("light skin tone, dark skin tone").tolist() == [0, 0.5, 0, 0, 0, 0.5, 0]


def test_skin_tone_classifier_on_real_images_of_known_tone():
    from latentdiff.data.emoji import load_emoji
    from latentdiff.evaluation.skin_tone import TONE_CLASSES, classify_tones, tone_index

    data = load_emoji("all", bundled=True)
    idx = _single_tone_people(data)
    true = np.array([tone_index(data.tones[i]) for i in idx])
    pred = classify_tones(data.images[idx])
    assert len(idx) > 150 and set(true) == set(range(len(TONE_CLASSES)))
    for k in range(len(TONE_CLASSES)):  # two swapped tones would fail here
        assert (pred[true == k] == k).mean() >= 0.8, TONE_CLASSES[k]
    assert (pred == true).mean() >= 0.9
    blank = np.full((2, 64, 64, 3), 255, np.uint8)
    assert classify_tones(blank).tolist() == [6, 6]  # no skin: unclear


def test_skin_colours_are_what_the_full_data_gives(tmp_path):
    from latentdiff.data.emoji import find_emoji, load_emoji
    from latentdiff.evaluation.skin_tone import SKIN_COLOURS, derive_skin_colours, tone_accuracy

    if find_emoji() is None:
        pytest.skip("the full emoji set is not downloaded")
    assert derive_skin_colours(load_emoji("train")).tolist() == SKIN_COLOURS.astype(int).tolist()
    held = tone_accuracy(load_emoji("heldout"))
    assert held["n"] > 200 and held["accuracy"] >= 0.9


class _OracleTextModel:
    """A stand-in text-to-image model: the training image of each caption; the empty prompt: random images."""
    has_text = True
    image_shape = (3, 64, 64)

    def __init__(self, data):
        self.lookup, self.data = dict(zip(data.captions, data.images)), data

    def generate(self, n, *, prompt=None, seed=0, **fields):
        if prompt is None:
            return self.data.images[np.random.default_rng(seed).integers(len(self.data), size=n)], None
        return np.stack([self.lookup[p] for p in prompt]), None


def test_text_bias_report_on_an_oracle_model():
    from latentdiff.data.emoji import CATEGORIES, load_emoji
    from latentdiff.evaluation.bias import format_text_bias_table, text_bias_report
    from latentdiff.evaluation.skin_tone import TONE_BINS
    from latentdiff.evaluation.text_to_image import EmojiJudges

    train = load_emoji("train", bundled=True)
    rep = text_bias_report(_OracleTextModel(train), EmojiJudges.load(), train, 24, (None, 3.0),
                           heldout=load_emoji("heldout", bundled=True))
    cat, tone = rep["categories"], rep["skin_tone"]
    assert cat["class_names"] == list(CATEGORIES) and tone["class_names"] == list(TONE_BINS)
    assert [r["setting"] for r in cat["rows"]] == ["empty prompt", "training captions", "training captions, guidance 3"]
    for r in cat["rows"] + tone["rows"]:
        assert r["n"] == 24 and sum(r["histogram"]) == pytest.approx(1, abs=1e-3)
    for h in (tone["reference_histogram"], tone["data_histogram"], cat["reference_histogram"]):
        assert sum(h) == pytest.approx(1, abs=1e-3)
    # the base emoji's captions name no tone and the oracle draws the base image: all default (yellow)
    assert tone["rows"][0]["histogram"][0] == 1 and tone["rows"][0]["most_over"] == 0
    assert tone["data_histogram"][0] > 0.3 and tone["n_prompts"] == 14
    table = format_text_bias_table(rep)
    assert "| person prompts without a tone |" in table and "Tone classifier accuracy" in table


def test_eval_bias_cli_on_a_text_model(monkeypatch, tmp_path, latentdiff_cli):
    from latentdiff.data.emoji import load_emoji
    from latentdiff.pipeline import LatentDiffusion

    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))  # no downloaded set: the bundled subset
    monkeypatch.delenv("LATENTDIFF_EMOJI_DIR", raising=False)
    model = _OracleTextModel(load_emoji("train", bundled=True))
    monkeypatch.setattr(LatentDiffusion, "load", classmethod(lambda cls, *a, **k: model))
    code, out, err = latentdiff_cli("eval", "--model", tmp_path, "--bias", "--n", 12, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert [r["setting"] for r in rep["skin_tone"]["rows"]] == ["person prompts without a tone"]
    assert rep["skin_tone"]["classifier_accuracy"]["n"] == 2
    code, out, err = latentdiff_cli("eval", "--model", tmp_path, "--bias", "--n", 12, "--bias-guidance", "1,x")
    assert code != 0 and "--bias-guidance" in err
