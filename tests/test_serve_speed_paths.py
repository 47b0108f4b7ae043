"""The endpoint's batching gives the same bytes whatever the batch: its forward (serve/app.py `_forward`, run
here in process without Ray) over many requests at once, some with missing pixels, timesteps or bandsets,
answers each request with exactly the bytes it gets alone; forwards are cut by visible-token count
(`forward_runs`), so none pads; the Server-Timing split names every stage."""

from __future__ import annotations

import io

import numpy as np
import pytest

from serve.app import EncoderDeployment, ServeConfig, Ticket, forward_runs, server_timing
from serve.inputs import Limits, parse_npz


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def deployment():
    """The deployment's class itself (Serve's deployment and ASGI ingress wrappers peeled), built here."""
    cls = next(c for c in EncoderDeployment.func_or_class.__mro__ if "_forward" in c.__dict__)
    return cls(ServeConfig(model_uri="random:nano:1", torch_threads=1, forward_tokens=4096))


def requests_with_holes(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        x = (rng.random((1 + k % 3, 32, 32, 2, 12)) * 3000).astype(np.float32)
        if k % 4 == 1:
            x[0, :8, :8] = np.nan  # a patch without any pixel: fewer visible tokens
        if k % 4 == 2:
            x[-1, :, :, 1, 3] = np.nan  # one band of one timestep: a bandset missing everywhere
        if k % 4 == 3:
            x[0, 16:, :, 0] = -99999.0  # nodata value, half a timestep
        out.append(npz(sentinel2_l2a=x, months=np.array([k % 12, (k + 1) % 12])))
    return out


def answer_bytes(dep, items, p: int) -> list[bytes]:
    results = dep._forward(items)
    return [dep._answer(inp, p, "patches", "npy", r).body for (inp, *_), r in zip(items, results, strict=True)]


def items_of(bodies: list[bytes], p: int) -> list:
    return [(parse_npz(b, p, Limits()).with_visible(p), p, Ticket(1e18), "embed") for b in bodies]


@pytest.mark.parametrize("p", [4, 8])
def test_batched_answers_are_the_bytes_of_each_request_alone(deployment, p):
    bodies = requests_with_holes(12)
    alone = [answer_bytes(deployment, items_of([b], p), p)[0] for b in bodies]
    together = answer_bytes(deployment, items_of(bodies, p), p)
    assert together == alone
    reversed_order = answer_bytes(deployment, items_of(bodies[::-1], p), p)[::-1]  # other batch-mates, order
    assert reversed_order == alone
    emb = [np.load(io.BytesIO(b)) for b in alone]
    assert len({a.tobytes() for a in emb}) == len(emb) and all(np.isfinite(a).any() for a in emb)
    assert any(np.isnan(a).any() for a in emb)  # the patch without pixels is NaN, as alone


def test_pooled_and_predictless_routes_keep_values(deployment):
    """Pooled answers batch the same way (the forward gives both outputs)."""
    bodies = requests_with_holes(6, seed=3)
    items = items_of(bodies, 4)
    together = deployment._forward(items)
    for it, r in zip(items, together, strict=True):
        alone = deployment._forward([(it[0], 4, Ticket(1e18), "embed")])[0]
        assert np.array_equal(r[0]["pooled"], alone[0]["pooled"])


def test_forward_runs_cut_by_count_and_size_in_arrival_order():
    order = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    visible = [np.array([10, 7]), np.array([10]), np.array([7, 10, 10])]
    runs = forward_runs(order, visible, k=2)
    assert runs == [[(0, 1), (2, 0)], [(0, 0), (1, 0)], [(2, 1), (2, 2)]]
    assert forward_runs(order, [None, None, None], k=4) == [order[:4], order[4:]]
    assert sorted(ij for r in forward_runs(order, visible, 1) for ij in r) == sorted(order)  # nothing lost


def test_visible_tokens_count_as_the_encoder_masks():
    import torch

    import olmoearth
    from olmoearth.inference import prepare
    from olmoearth.layout import ENCODER

    enc = olmoearth.load("random:nano")
    x = np.random.default_rng(1).random((3, 16, 16, 2, 12)).astype(np.float32) * 3000
    x[0, :4, :4] = np.nan
    x[1, :, :, 1, 7] = np.nan
    inp = parse_npz(npz(sentinel2_l2a=x), 4, Limits()).with_visible(4)
    _, _, masks = prepare(enc, {"sentinel2_l2a": torch.from_numpy(inp.x["sentinel2_l2a"])}, inp.months, 4)
    want = (masks["sentinel2_l2a"] == ENCODER).flatten(1).sum(1).numpy()
    assert inp.visible.tolist() == want.tolist() and len(set(want.tolist())) == 3


def test_server_timing_names_each_stage_in_ms():
    marks = {"start": 1.0, "body": 1.001, "decode": 1.003, "forward_start": 1.013, "forward_end": 1.033,
             "encode": 1.034}  # fmt: skip
    header = server_timing(marks)
    got = {k: float(v) for k, v in (part.split(";dur=") for part in header.split(", "))}
    assert got.keys() == {"body", "decode", "queue", "forward", "encode", "replica"}
    assert got["queue"] == pytest.approx(10.0) and got["replica"] == pytest.approx(34.0)
    assert "forward" not in server_timing({"start": 0.0, "body": 0.1})  # a request refused before its forward


def test_bf16_replica_answers_float32_near_fp32_and_the_same_bytes_whatever_the_batch(deployment):
    """precision=bf16 (autocast): answers stay float32 arrays of the same shape and NaN patches, within cosine
    0.999 of the fp32 replica's, and batching still does not change a byte."""
    cls = type(deployment)
    bf16 = cls(ServeConfig(model_uri="random:nano:1", torch_threads=1, forward_tokens=4096, precision="bf16"))
    assert bf16.embedder.describe()["precision"] == "bf16" and deployment.embedder.precision == "fp32"
    bodies = requests_with_holes(8, seed=5)
    alone = [answer_bytes(bf16, items_of([b], 4), 4)[0] for b in bodies]
    assert answer_bytes(bf16, items_of(bodies, 4), 4) == alone
    for b, ans in zip(bodies, alone, strict=True):
        got = np.load(io.BytesIO(ans))
        ref = np.load(io.BytesIO(answer_bytes(deployment, items_of([b], 4), 4)[0]))
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        ok = ~np.isnan(ref).any(-1)
        g, r = got[ok], ref[ok]
        cos = (g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1))
        assert cos.min() >= 0.999 and not np.array_equal(g, r)
