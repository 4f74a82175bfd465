"""Text-to-image evaluation: the emoji judges, R-precision, and the metrics next to their real-data floors."""

import numpy as np
import pytest
import torch

from latentdiff.data.emoji import load_emoji
from latentdiff.errors import DataError
from latentdiff.evaluation.emoji_nets import build_vocab, tokenize, words
from latentdiff.evaluation.emoji_train import (
    classifier_accuracy,
    shift,
    to_input,
    train_emoji_classifier,
    train_emoji_clip,
)
from latentdiff.evaluation.text_to_image import EmojiJudges, evaluate_text_to_image, format_table, r_precision
from latentdiff.utils.state import save_state


def test_r_precision_counts_top1_among_candidates():
    pool = np.eye(4)  # caption j's embedding is axis j
    images = np.eye(4)[[0, 1, 2, 3]]
    assert r_precision(images, np.arange(4), pool, candidates=4)[0] == 1.0
    # images that point at the next caption: the true one never ranks first
    assert r_precision(images, np.array([3, 0, 1, 2]), pool, candidates=4)[0] == 0.0
    # with 2 candidates out of 4, an image that matches only caption 1 but whose truth is caption 0 ranks
    # first exactly when caption 1 is not drawn: chance 2/3 over many rounds
    img = np.array([[0.5, 1.0, 0.0, 0.0]])
    mean, _, k = r_precision(img / np.linalg.norm(img), np.array([0]), pool, candidates=2, rounds=3000)
    assert k == 2 and abs(mean - 2 / 3) < 0.03
    with pytest.raises(DataError):
        r_precision(images, np.arange(3), pool)


def test_words_vocab_and_tokens():
    assert words("Waving hand: medium-light skin tone, wave") == ["waving", "hand", "medium", "light", "skin",
                                                                   "tone", "wave"]
    vocab = build_vocab(["a cat", "a dog", "a cat face"])
    assert vocab[:4] == ["<pad>", "<unk>", "a", "cat"]
    ids, mask = tokenize(["a cat", "zebra a"], vocab)
    assert ids.tolist() == [[2, 3], [1, 2]] and mask.all()
    assert to_input(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 3, 32, 32)


def test_shift_moves_images_on_white():
    x = -torch.ones(1, 3, 8, 8)
    y = shift(x, torch.Generator().manual_seed(0), pad=3)
    assert y.shape == x.shape and ((y == 1) | (y == -1)).all()


@pytest.fixture(scope="module")
def judges():
    return EmojiJudges.load()  # the shipped ones


def test_judges_train_save_and_load_round_trip(tmp_path):
    train = load_emoji("train", bundled=True).select(np.arange(300) < 48)
    clf, clf_meta = train_emoji_classifier(train, steps=2, batch_size=24)
    clip, clip_meta = train_emoji_clip(train, steps=2, batch_size=24)
    for net, meta, name in ((clf, clf_meta, "c"), (clip, clip_meta, "p")):
        save_state(tmp_path / f"{name}.safetensors", {k: v for k, v in net.state_dict().items()
                                                      if v.is_floating_point()}, meta)
    loaded = EmojiJudges.load(tmp_path / "c.safetensors", tmp_path / "p.safetensors")
    with torch.no_grad():
        want = clf.features(to_input(train.images[:5])).numpy()
        want_txt = clip.embed_text(*tokenize(train.captions[:5], clip_meta["vocab"])).numpy()
    assert np.allclose(loaded.features(train.images[:5]), want, atol=1e-5)
    assert np.allclose(loaded.text_embeddings(train.captions[:5]), want_txt, atol=1e-5)
    assert set(classifier_accuracy(clf, train, clf_meta["subcategories"])) == {"category_accuracy",
                                                                              "subcategory_accuracy"}
    with pytest.raises(Exception, match="emoji-clip"):
        EmojiJudges.load(tmp_path / "c.safetensors", tmp_path / "c.safetensors")


def test_a_perfect_generator_scores_its_floor_and_a_wrong_one_less(judges):
    data = {s: load_emoji(s, bundled=True) for s in ("train", "heldout")}
    lookup = {c: img for s in data.values() for c, img in zip(s.captions, s.images)}
    assert len(lookup) == sum(len(s) for s in data.values())  # captions are unique in the subset

    def oracle(captions):
        return np.stack([lookup[c] for c in captions])

    res = evaluate_text_to_image(oracle, n=100, judges=judges, rounds=2, bundled=True)
    for split in ("train", "heldout"):
        r = res[split]
        for key in ("fd", "precision", "recall", "category_accuracy", "r_precision"):
            assert r[key] == pytest.approx(r[key + "_floor"]), (split, key)
    assert res["train"]["n"] == 100 and res["heldout"]["n"] == 21

    blank = evaluate_text_to_image(lambda c: np.full((len(c), 64, 64, 3), 255, np.uint8), n=100, judges=judges,
                                   splits=("train",), rounds=2, bundled=True)["train"]
    assert blank["fd"] > 2 * blank["fd_floor"] and blank["recall"] < blank["recall_floor"]
    assert blank["r_precision"] <= 0.05 < 0.3 < blank["r_precision_floor"]  # one image for all captions: chance
    table = format_table(res)
    assert table.count("\n") == 6 and "R-precision" in table


def test_generator_output_is_checked(judges):
    with pytest.raises(DataError, match="generator returned"):
        evaluate_text_to_image(lambda c: np.zeros((len(c), 32, 32, 3), np.uint8), n=20, judges=judges,
                               splits=("train",), bundled=True)


def test_eval_command_scores_a_text_model(monkeypatch, tmp_path, judges):
    import json

    from conftest import run_cli
    from latentdiff.pipeline import LatentDiffusion

    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))  # no downloaded set: the bundled subset
    monkeypatch.delenv("LATENTDIFF_EMOJI_DIR", raising=False)
    held = load_emoji("heldout", bundled=True)
    lookup = dict(zip(held.captions, held.images))
    calls = []

    class FakeTextModel:  # what `eval` needs of a text model: has_text, image_shape, generate(n, prompt=...)
        has_text = True
        image_shape = (3, 64, 64)

        def generate(self, n, *, prompt, **fields):
            calls.append(fields)
            return np.stack([lookup[p] for p in prompt]), None

    model = tmp_path / "text-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"config": {"text": {"encoder": "bytes"}}}))
    monkeypatch.setattr(LatentDiffusion, "load", classmethod(lambda cls, *a, **k: FakeTextModel()))
    code, out, err = run_cli("eval", "--model", model, "--n", "20", "--split", "heldout", "--steps", "7", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])["heldout"]
    assert result["n"] == 20 and result["fd"] == pytest.approx(result["fd_floor"])
    assert calls[0]["steps"] == 7 and "| R-precision |" in out


def test_emoji_classifier_is_a_registered_extractor(judges):
    from latentdiff.evaluation.features import get_extractor

    ext = get_extractor("emoji-classifier")
    held = load_emoji("heldout", bundled=True)
    assert np.allclose(ext.features(held.images[:8]), judges.features(held.images[:8]), atol=1e-5)
    assert (ext.predict(held.images) == judges.categories(held.images)).all()
    # the shipped classifier's held-out category accuracy on the bundled subset (0.88 on the full held-out split)
    assert (ext.predict(held.images) == held.labels).mean() > 0.6
    with pytest.raises(DataError, match="RGB"):
        ext.features(np.zeros((2, 28, 28), np.uint8))
