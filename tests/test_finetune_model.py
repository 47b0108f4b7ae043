"""The fine-tuned model library: heads, FineTunedModel, task_loss, the fine-tuned model file."""

import numpy as np
import pytest
import torch

import olmoearth
from olmoearth.checkpoint import CheckpointError, save_encoder, save_finetuned
from olmoearth.finetuned import FineTunedModel, TaskSpec, task_loss
from olmoearth.heads import LinearHead, UNetHead, UpsampleHead, build_head
from olmoearth.inference import encode, pool_patches, prepare
from olmoearth.loading import random_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(encoder_dim=32, encoder_depth=2, encoder_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def tiny_encoder(seed=0):
    return random_model("nano", seed, **TINY).encoder


def s2(B=2, H=16, T=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(100, 4000, size=(B, H, H, T, 12)).astype(np.float32)
    x[0, :4, :4, 0] = np.nan  # a missing corner in one timestep
    return {"sentinel2_l2a": x}, np.tile(np.arange(T), (B, 1))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_heads_shapes(p):
    B, h, w, D, K = 2, 3, 5, 16, 4
    patches = torch.randn(B, h, w, D)
    assert UpsampleHead(D, K, p)(patches).shape == (B, K, h * p, w * p)
    assert UNetHead(D, K, p)(patches).shape == (B, K, h * p, w * p)
    assert LinearHead(D, K)(torch.randn(B, D)).shape == (B, K)


def test_upsample_head_lays_each_token_out_on_its_own_patch():
    head = UpsampleHead(8, 2, 4).eval()  # eval: each token standardised alone, by the running statistics
    patches = torch.randn(1, 2, 3, 8)
    out = head(patches)  # (1, 2, 8, 12)
    z = head.linear(head.norm(patches[0, 1, 2][None]))[0].view(2, 4, 4)  # token (1, 2) -> its K x p x p block
    assert torch.allclose(out[0, :, 4:8, 8:12], z, atol=1e-6)


def test_heads_standardise_their_features():
    """Features that are one vector plus tiny chip-specific deviations (an encoder's pooled output) reach the
    linear layer standardised per feature in training; a one-sample training batch does not fail."""

    head = LinearHead(6, 3).train()
    seen = {}
    head.linear.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    feats = 5.0 + 0.05 * torch.randn(32, 6)
    head(feats)
    assert torch.allclose(seen["x"].mean(0), torch.zeros(6), atol=1e-3)
    assert torch.allclose(seen["x"].std(0, unbiased=False), torch.ones(6), atol=0.01)
    assert torch.allclose(head.norm.running_mean, 0.1 * feats.mean(0), atol=1e-5)  # momentum 0.1
    assert head(feats[:1]).shape == (1, 3)
    unet = build_head("unet", 6, 3, 4).train()
    tokens = 5.0 + 1e-3 * torch.randn(2, 2, 2, 6)
    assert unet(tokens).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("kind,head,shape", [
    ("classification", "linear", (2, 3)), ("multilabel", "linear", (2, 3)), ("regression", "linear", (2, 3)),
    ("segmentation", "upsample", (2, 3, 16, 16)), ("segmentation", "unet", (2, 3, 16, 16)),
    ("pixel_regression", "unet", (2, 3, 16, 16))])
def test_forward_shapes_and_gradients_reach_the_encoder(kind, head, shape):
    model = FineTunedModel(tiny_encoder(), TaskSpec(kind, ["a", "b", "c"], head=head, patch_size=4))
    model.train()
    x, months = s2()
    out = model(x, months)
    assert out.shape == shape
    out.square().mean().backward()
    for name, p in [("patch embed", model.encoder.patch_embeddings.parameters()),
                    ("block 0", model.encoder.blocks[0].parameters()), ("head", model.head.parameters())]:
        grads = [q.grad for q in p if q.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_scene_features_match_encode():
    """The fine-tuned model sees the features `encode` gives: the pooling is one function."""
    enc = tiny_encoder()
    x, months = s2()
    model = FineTunedModel(enc, TaskSpec("segmentation", ["a", "b"], head="upsample")).eval()
    emb = encode(enc, x, months, 4)
    xs, m, masks = prepare(enc, x, months, 4)
    with torch.no_grad():
        out = enc(xs, m, masks, 4)
    assert torch.equal(pool_patches(out.tokens, masks), emb.patches)
    with torch.no_grad():
        assert torch.allclose(model(x, months), model.head(emb.patches), atol=1e-6)


def test_predict_outputs():
    x, months = s2()
    enc = tiny_encoder()
    seg = FineTunedModel(enc, TaskSpec("segmentation", ["a", "b", "c"], head="unet")).train()
    out = seg.predict(x, months)
    assert out["class"].shape == (2, 16, 16) and out["class"].dtype == torch.int64
    assert torch.allclose(out["probs"].sum(1), torch.ones(2, 16, 16), atol=1e-5)
    assert seg.training  # predict restores the mode
    ml = FineTunedModel(enc, TaskSpec("multilabel", ["a", "b"])).predict(x, months)
    assert set(ml) == {"probs", "labels"} and torch.equal(ml["labels"], (ml["probs"] > 0.5).long())
    reg = FineTunedModel(enc, TaskSpec("regression", ["biomass"])).predict(x, months)
    assert reg["value"].shape == (2, 1) and reg["value"].dtype == torch.float32


def test_layer_groups_cover_every_parameter_once():
    model = FineTunedModel(tiny_encoder(), TaskSpec("segmentation", ["a", "b"], head="unet"))
    groups = model.layer_groups()
    assert len(groups) == len(model.encoder.blocks) + 2
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[1]} == {id(p) for p in model.encoder.blocks[0].parameters()}
    assert {id(p) for p in model.head_parameters()} <= {id(p) for p in groups[-1]}
    assert {id(p) for p in model.encoder.patch_embeddings.parameters()} <= {id(p) for p in groups[0]}
    backbone = {id(p) for p in model.backbone_parameters()}
    assert backbone.isdisjoint({id(p) for p in model.head_parameters()})
    assert backbone | {id(p) for p in model.head_parameters()} == set(ids)


def test_task_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="task.head.*per pixel"):
        TaskSpec("segmentation", ["a", "b"], head="linear")
    with pytest.raises(ValueError, match="task.head.*scene"):
        TaskSpec("classification", ["a", "b"], head="unet")
    with pytest.raises(ValueError, match="task.kind"):
        TaskSpec("detection", ["a"])
    with pytest.raises(ValueError, match="task.class_names"):
        TaskSpec("classification", ["a"])
    with pytest.raises(ValueError, match="task.chip_size"):
        TaskSpec("segmentation", ["a", "b"], head="unet", patch_size=4, chip_size=30)
    with pytest.raises(ValueError, match="task.modalities"):
        TaskSpec("classification", ["a", "b"], modalities=["worldcover"])
    t = TaskSpec("pixel_regression", ["ndvi"], head="upsample", num_timesteps=6, modalities=["sentinel1"])
    assert TaskSpec.from_dict(t.to_dict()) == t and t.per_pixel and t.num_outputs == 1


def test_task_loss_ignore_rules():
    seg = TaskSpec("segmentation", ["a", "b"], head="upsample")
    logits = torch.randn(1, 2, 2, 2)
    target = torch.tensor([[[0, -1], [1, -1]]])
    ce = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[[0, 1], [0, 0]], torch.tensor([0, 1]))
    assert torch.allclose(task_loss(seg, logits, target), ce)
    empty = task_loss(seg, logits.requires_grad_(), torch.full((1, 2, 2), -1))
    assert empty.item() == 0.0
    empty.backward()  # still a graph
    reg = TaskSpec("pixel_regression", ["v"], head="unet")
    out = torch.zeros(1, 1, 2, 2)
    tgt = torch.tensor([[[1.0, float("nan")], [3.0, float("nan")]]])
    assert task_loss(reg, out, tgt).item() == pytest.approx(5.0)  # mean of 1 and 9 over the finite targets
    ml = TaskSpec("multilabel", ["a", "b"])
    z = torch.tensor([[0.0, 0.0]])
    w = torch.tensor([1.0, 0.0])
    assert task_loss(ml, z, torch.tensor([[1, 0]]), w).item() == pytest.approx(np.log(2) / 2)
    cls = TaskSpec("classification", ["a", "b"])
    w2 = torch.tensor([1.0, 3.0])
    zz = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    want = torch.nn.functional.cross_entropy(zz, torch.tensor([0, 1]), weight=w2)
    assert torch.allclose(task_loss(cls, zz, torch.tensor([0, 1]), w2), want)


def test_finetuned_file_round_trip(tmp_path):
    model = FineTunedModel(tiny_encoder(3), TaskSpec("segmentation", ["water", "land"], head="unet",
                                                     chip_size=16, num_timesteps=2)).eval()
    path = str(tmp_path / "ft.safetensors")
    save_finetuned(model, path, extra_meta={"epoch": 7})
    x, months = s2()
    back = olmoearth.load_finetuned(path)
    assert back.task == model.task and back.encoder.checkpoint_meta == {"epoch": 7}
    with torch.no_grad():
        assert torch.equal(back(x, months), model(x, months))
    assert isinstance(olmoearth.load_model(path), FineTunedModel)
    enc = olmoearth.load(path)  # the fine-tuned encoder
    assert not isinstance(enc, FineTunedModel)
    assert torch.equal(enc.blocks[0].attn.q.weight, model.encoder.blocks[0].attn.q.weight)
    with open(path, "rb") as fh:
        assert olmoearth.load_finetuned(fh.read()).task.class_names == ["water", "land"]


def test_load_finetuned_refuses_other_files(tmp_path):
    path = str(tmp_path / "enc.safetensors")
    save_encoder(tiny_encoder(), path)
    with pytest.raises(CheckpointError, match="enc.safetensors: not a fine-tuned model"):
        olmoearth.load_finetuned(path)
    with pytest.raises(CheckpointError, match="random:nano: not a fine-tuned model"):
        olmoearth.load_finetuned("random:nano")
