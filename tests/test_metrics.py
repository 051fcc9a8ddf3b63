"""The paper's r, R^2, cosine and MSE against hand-derived values (arithmetic in comments)
and against numpy's own correlation as an independent implementation."""

import math

import numpy as np
import pytest
import torch

from els_audit.metrics import (cosine_similarity_batch, mse_batch, pearson_r, pearson_r_batch, r_squared,
                               r_squared_batch)


def img(vals, shape=(1, 2, 2)):
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


def test_pearson_r_hand_derived():
    # a = [1,2,3,4]: mean 2.5, centred [-1.5,-.5,.5,1.5], norm sqrt(5)
    # b = [1,3,2,4]: mean 2.5, centred [-1.5,.5,-.5,1.5], norm sqrt(5)
    # dot = 2.25 - .25 - .25 + 2.25 = 4  ->  r = 4 / 5 = 0.8
    assert pearson_r(img([1, 2, 3, 4]), img([1, 3, 2, 4])) == pytest.approx(0.8, abs=1e-15)


def test_pearson_r_is_r_not_r_squared():
    # b = 5 - a exactly anti-correlates: r = -1 (its square would be +1)
    a = img([1, 2, 3, 4])
    assert pearson_r(a, 5 - a) == pytest.approx(-1.0, abs=1e-15)
    assert pearson_r(a, 3 * a + 7) == pytest.approx(1.0, abs=1e-15)


def test_pearson_r_global_mean_over_channels():
    # C=2, H=1, W=2.  a = [[0,2],[4,6]], b = [[0,2],[0,2]].
    # Global: a mean 3 -> [-3,-1,1,3] (norm sqrt 20); b mean 1 -> [-1,1,-1,1] (norm 2)
    # dot = 3 - 1 - 1 + 3 = 4 -> r = 4 / (2 sqrt 20) = 0.4472136
    # (per-channel centring would give [-1,1,-1,1] for both and r = 1: not the paper's r)
    a = img([0, 2, 4, 6], (2, 1, 2))
    b = img([0, 2, 0, 2], (2, 1, 2))
    assert pearson_r(a, b) == pytest.approx(4 / (2 * math.sqrt(20)), abs=1e-15)


def test_r_squared_hand_derived_and_asymmetric():
    # target [1,2,3,4]: mean 2.5, SST = 2.25+.25+.25+2.25 = 5; pred [1,2,3,5]: SSE = 1
    # R^2 = 1 - 1/5 = 0.8.  Swapped: target [1,2,3,5] mean 2.75,
    # SST = 3.0625+.5625+.0625+5.0625 = 8.75 -> 1 - 1/8.75 = 0.8857142857
    t, p = img([1, 2, 3, 4]), img([1, 2, 3, 5])
    assert r_squared(p, t) == pytest.approx(0.8, abs=1e-15)
    assert r_squared(t, p) == pytest.approx(1 - 1 / 8.75, abs=1e-15)
    # predicting the target's mean gives 0; a perfect prediction 1; worse than the mean < 0
    assert r_squared(torch.full_like(t, 2.5), t) == pytest.approx(0.0, abs=1e-15)
    assert r_squared(t, t) == 1.0
    # pred = 5 - t: SSE = 16+4+0... = (4-1)^2+(3-2)^2+(2-3)^2+(1-4)^2 = 20 -> 1 - 20/5 = -3
    assert r_squared(5 - t, t) == pytest.approx(-3.0, abs=1e-15)


def test_constant_images_are_nan_not_errors():
    c = img([2, 2, 2, 2])
    assert math.isnan(pearson_r(c, img([1, 2, 3, 4])))
    assert math.isnan(r_squared(img([1, 2, 3, 4]), c))
    assert not math.isnan(r_squared(c, img([1, 2, 3, 4])))   # a constant prediction is fine: R^2 = 1 - SSE/SST


def test_batched_match_numpy_corrcoef_and_loops():
    g = np.random.default_rng(0)
    a = g.normal(size=(5, 3, 4, 4))
    b = 0.5 * a + g.normal(size=(5, 3, 4, 4))
    r = pearson_r_batch(a, b)
    want = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(5)]    # independent implementation
    np.testing.assert_allclose(r, want, atol=1e-13)
    np.testing.assert_allclose(r, [pearson_r(a[i], b[i]) for i in range(5)], atol=0)
    r2 = r_squared_batch(a, b)
    want2 = [1 - ((b[i] - a[i]) ** 2).sum() / ((b[i] - b[i].mean()) ** 2).sum() for i in range(5)]
    np.testing.assert_allclose(r2, want2, atol=1e-13)
    # torch and numpy inputs agree
    np.testing.assert_allclose(pearson_r_batch(torch.from_numpy(a).float(), torch.from_numpy(b).float()), r, atol=1e-6)


def test_cosine_and_mse_hand_derived():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # row 0: <a,b> = 1, |a| = 1, |b| = sqrt 2 -> 1/sqrt 2; row 1: |a| = 0 -> nan
    c = cosine_similarity_batch(a, b)
    assert c[0] == pytest.approx(1 / math.sqrt(2), abs=1e-15) and math.isnan(c[1])
    # row 0: (0 + 1)/2 = 0.5; row 1: (1 + 0)/2 = 0.5
    np.testing.assert_allclose(mse_batch(a, b), [0.5, 0.5], atol=0)


@pytest.mark.parametrize("fn", [pearson_r, r_squared, pearson_r_batch, r_squared_batch, mse_batch])
def test_bad_input_raises(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(np.zeros((2, 3, 4)), np.zeros((2, 4, 3)))
    bad = np.zeros((2, 3, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="tensor or a numpy array"):
        fn([1, 2], [1, 2])
