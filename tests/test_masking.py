import numpy as np
import pytest

from olmoearth.layout import DECODER, ENCODER, IGNORED, MISSING
from olmoearth.masking import mask_batch, modality_cross_random, random_mask, token_presence
from olmoearth.modalities import ENCODER_MODALITIES, MAP_MODALITIES, MODALITIES


def test_token_presence_marks_only_the_bandset_with_a_missing_pixel():
    rng = np.random.default_rng(0)
    x = {"sentinel2_l2a": rng.normal(size=(8, 12, 2, 12)), "srtm": rng.normal(size=(8, 12, 1, 1))}
    x["sentinel2_l2a"][5, 9, 1, 4] = np.nan  # band B05 -> bandset 1, patch (1, 2) at p=4, t=1
    x["srtm"][0, 0, 0, 0] = np.inf
    pres = token_presence(x, 4)
    assert pres["sentinel2_l2a"].shape == (2, 3, 2, 3)
    assert pres["srtm"].shape == (2, 3, 1, 1)
    expected = np.ones((2, 3, 2, 3), bool)
    expected[1, 2, 1, 1] = False
    np.testing.assert_array_equal(pres["sentinel2_l2a"], expected)
    assert not pres["srtm"][0, 0, 0, 0] and pres["srtm"].sum() == 5


def test_token_presence_rejects_bad_input():
    with pytest.raises(ValueError, match="not a multiple"):
        token_presence({"sentinel1": np.zeros((10, 8, 1, 2))}, 4)
    with pytest.raises(ValueError, match="sentinel1"):
        token_presence({"sentinel1": np.zeros((8, 8, 1, 3))}, 4)
    with pytest.raises(ValueError, match="unknown modality"):
        token_presence({"sentinel3": np.zeros((8, 8, 1, 3))}, 4)


def _random_presence(rng):
    """A random sample: random subset of modalities, random missing timesteps / bandsets / patches."""
    h, w, T = rng.integers(1, 5), rng.integers(1, 5), rng.integers(1, 5)
    names = [n for n in MODALITIES if rng.random() < 0.6] or ["sentinel2_l2a"]
    pres = {}
    for n in names:
        m = MODALITIES[n]
        t = T if m.temporal else 1
        p = rng.random((h, w, t, m.num_bandsets)) < rng.uniform(0.3, 1.0)
        pres[n] = p
    return pres


def test_maps_are_never_encoded_and_missing_stays_missing_over_thousands_of_maskings():
    rng = np.random.default_rng(1)
    n_with_both = 0
    for _ in range(3000):
        pres = _random_presence(rng)
        mask = modality_cross_random(pres, rng)
        assert set(mask) == set(pres)
        for n, m in mask.items():
            assert m.dtype == np.int8 and m.shape == pres[n].shape
            np.testing.assert_array_equal(m == MISSING, ~pres[n])  # missing <-> MISSING, exactly
            if n in MAP_MODALITIES:
                assert not (m == ENCODER).any(), f"map {n} was encoded"
        n_enc = sum(int((m == ENCODER).sum()) for m in mask.values())
        n_dec = sum(int((m == DECODER).sum()) for m in mask.values())
        n_encodable = sum(int(pres[n].sum()) for n in pres if n in ENCODER_MODALITIES)
        if n_encodable >= 4:  # enough encodable tokens: the view encodes and decodes something
            assert n_enc > 0 and n_dec > 0
            n_with_both += 1
    assert n_with_both > 1000


def test_cross_random_encodes_at_least_two_bandsets_and_subsets_bandsets():
    rng = np.random.default_rng(2)
    pres = {n: np.ones((4, 4, 3 if MODALITIES[n].temporal else 1, MODALITIES[n].num_bandsets), bool)
            for n in MODALITIES}
    n_encoded_sets, n_decoded_sets, encoded_and_decoded, encoded_only = [], [], 0, 0
    for _ in range(300):
        mask = modality_cross_random(pres, rng)
        enc = [(n, s) for n, m in mask.items() for s in range(m.shape[-1]) if (m[..., s] == ENCODER).any()]
        dec = [(n, s) for n, m in mask.items() for s in range(m.shape[-1]) if (m[..., s] == DECODER).any()]
        assert len(enc) >= 2
        assert all(n in ENCODER_MODALITIES for n, _ in enc)
        for m in mask.values():  # the base split is half and half per modality: at most half visible
            assert (m == ENCODER).mean() <= 0.5 + 1e-9
        # the original's rule (reference 3.4): every map and every non-encoded sensor bandset is decoded;
        # the decoded draw only decides whether an encoded bandset is decoded too
        every = {(n, s) for n, m in mask.items() for s in range(m.shape[-1])}
        assert every - set(enc) <= set(dec)
        encoded_and_decoded += len(set(enc) & set(dec))
        encoded_only += len(set(enc) - set(dec))
        n_encoded_sets.append(len(enc))
        n_decoded_sets.append(len(dec))
    # the number of encoded / decoded bandsets varies: bandsets are really sub-selected
    assert min(n_encoded_sets) == 2 and max(n_encoded_sets) == 6
    assert min(n_decoded_sets) >= 6 and max(n_decoded_sets) == 12
    assert encoded_and_decoded > 0 and encoded_only > 0
    assert any((m == IGNORED).any() for m in modality_cross_random(pres, rng).values())


def test_random_mask_splits_half_and_half():
    rng = np.random.default_rng(3)
    pres = {"sentinel1": np.ones((8, 8, 2, 1), bool)}
    m = random_mask(pres, rng, 0.5, 0.5)["sentinel1"]
    assert (m == ENCODER).sum() == 64 and (m == DECODER).sum() == 64


def test_mask_batch_stacks_samples():
    rng = np.random.default_rng(4)
    pres = [token_presence({"sentinel2_l2a": rng.normal(size=(8, 8, 2, 12)),
                            "worldcover": rng.normal(size=(8, 8, 1, 1))}, 4) for _ in range(3)]
    mb = mask_batch(pres, rng)
    assert mb["sentinel2_l2a"].shape == (3, 2, 2, 2, 3) and mb["worldcover"].shape == (3, 2, 2, 1, 1)


def test_cross_random_rejects_bad_presence():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="sentinel1"):
        modality_cross_random({"sentinel1": np.ones((2, 2, 1, 2), bool)}, rng)
    with pytest.raises(ValueError, match="ratio"):
        modality_cross_random({"sentinel1": np.ones((2, 2, 1, 1), bool)}, rng, encode_ratio=0.8)
