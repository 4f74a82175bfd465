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
