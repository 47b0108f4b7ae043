"""The ORIGINAL OlmoEarth training code (PyPI `olmoearth-pretrain==0.1.2`: its masking, losses and contrastive
Latent MIM train module), loaded beside this project's torch for objective-parity tests and benches.

    masking, loss, cl = original_training()   # the modules train.masking, train.loss, contrastive_latentmim

The wheel pins torch<2.10 and wants olmo-core (its training framework), so it is never installed: it is
downloaded once (`pip download --no-deps`) into .cache/original (git-ignored), unzipped, and put on sys.path.
Its training code imports at module level what these paths never call (olmo-core's config, optimiser,
distributed and trainer types; `class_registry` for its registries; torchvision for data augmentations):
those names are stubbed here, and only those. The stubs that ARE reached at run time are trivial for the
single-process case: `get_local_tensor` (DTensor -> local tensor) is the identity, `ReduceType` only names a
metric's reduction, and the registries' `register` decorator records the class.
Only tests and bench scripts import this module; the project itself never imports the original packages.
"""

from __future__ import annotations

import enum
import functools
import os
import subprocess
import sys
import types
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "original")
SPEC = "olmoearth-pretrain==0.1.2"


def original_source() -> str:
    """Folder holding the unpacked `olmoearth_pretrain` package (downloaded once; fails loudly if it cannot)."""
    dest = os.path.join(ROOT, "olmoearth_pretrain-0.1.2")
    if not os.path.isdir(os.path.join(dest, "olmoearth_pretrain")):
        dist = os.path.join(ROOT, "dist")
        os.makedirs(dist, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "-d", dist, SPEC], check=True)
        wheel = [f for f in os.listdir(dist) if f.startswith("olmoearth_pretrain-0.1.2") and f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(dist, wheel[0])) as zf:
            zf.extractall(dest + ".tmp")
        os.rename(dest + ".tmp", dest)
    return dest


class _Anything:
    """Stands for a framework class or value that is only named (annotations, isinstance, base classes)."""

    def __init__(self, *args, **kwargs):
        pass


class _ClassRegistry:
    """class_registry.ClassRegistry: `register(key)` as a decorator and `get_class(key)`."""

    def __init__(self, *args, **kwargs):
        self._classes: dict[str, type] = {}

    def __class_getitem__(cls, item):
        return cls

    def register(self, key):
        def add(klass):
            self._classes[key] = klass
            return klass
        return add

    def get_class(self, key):
        return self._classes[key]


def _stub_module(name: str, **names) -> None:
    """sys.modules[name] = a module whose every unknown attribute is a stand-in class."""
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so that submodules import
    mod.__dict__.update(names)
    mod.__getattr__ = lambda attr: _Anything if not attr.startswith("__") else (_ for _ in ()).throw(
        AttributeError(attr))
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)


def _install_stubs() -> None:
    for name in ("olmo_core", "olmo_core.config", "olmo_core.distributed", "olmo_core.distributed.parallel",
                 "olmo_core.exceptions", "olmo_core.optim", "olmo_core.optim.scheduler", "olmo_core.train",
                 "olmo_core.train.common", "olmo_core.train.train_module", "olmo_core.utils",
                 "torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional"):
        if name not in sys.modules:
            _stub_module(name)
    # the metric reduction names passed to the trainer's record_metric (recorded, never reduced here)
    sys.modules["olmo_core.train.common"].ReduceType = enum.Enum("ReduceType", "mean sum max")
    _stub_module("olmo_core.distributed.utils")
    du = sys.modules["olmo_core.distributed.utils"]
    du.get_local_tensor = lambda t: t  # single process: a tensor is its own local shard
    du.get_world_size = lambda *a, **k: 1
    du.get_local_rank = lambda *a, **k: 0
    if "class_registry" not in sys.modules:
        _stub_module("class_registry", ClassRegistry=_ClassRegistry)


@functools.cache
def original_training() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """(train.masking, train.loss, train.train_module.contrastive_latentmim) of the original package."""
    src = original_source()
    if src not in sys.path:
        sys.path.insert(0, src)
    import olmoearth_pretrain.config as config  # before the stubs: its standalone Config, not olmo-core's

    _install_stubs()
    config.OLMO_CORE_AVAILABLE = True  # the train package's import guard; the stubs stand in for olmo-core
    from olmoearth_pretrain.nn import flexi_vit
    from olmoearth_pretrain.train import loss, masking
    from olmoearth_pretrain.train.train_module import contrastive_latentmim
    from original_models import _modalities_in_supported_order

    # the same PYTHONHASHSEED-dependent modality order as the minimal package's (see original_models.py)
    flexi_vit.get_modalities_to_process = _modalities_in_supported_order
    return masking, loss, contrastive_latentmim


def original_latent_mim(minimal_model):
    """The training package's own LatentMIM (olmoearth_pretrain.nn, the model its train module trains),
    built from the same config classes as `minimal_model` (an olmoearth-pretrain-minimal LatentMIM) and loaded
    strictly with its weights. The minimal package's outputs lack what the training losses call
    (TokensAndMasks.flatten_tokens_and_masks_per_modality), so training runs on this one."""
    original_training()
    from olmoearth_pretrain.nn.flexi_vit import EncoderConfig, PredictorConfig
    from olmoearth_pretrain.nn.latent_mim import LatentMIMConfig

    enc, dec = minimal_model.encoder, minimal_model.decoder
    e = EncoderConfig(supported_modality_names=list(enc.supported_modality_names),
                      embedding_size=enc.embedding_size, max_patch_size=enc.max_patch_size,
                      num_heads=enc.blocks[0].attn.num_heads, mlp_ratio=4.0, depth=len(enc.blocks),
                      drop_path=0.0, use_linear_patch_embed=False)
    d = PredictorConfig(supported_modality_names=list(dec.supported_modality_names),
                        encoder_embedding_size=enc.embedding_size, decoder_embedding_size=dec.embedding_size,
                        depth=len(dec.blocks), mlp_ratio=4.0, num_heads=dec.blocks[0].attn.num_heads,
                        output_embedding_size=dec.output_embedding_size)
    model = LatentMIMConfig(encoder_config=e, decoder_config=d).build()
    model.load_state_dict(minimal_model.state_dict(), strict=True)
    return model


class _Recorder:
    """The trainer's metric sink: keeps the last value of each metric."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def record_metric(self, name, value, *args, **kwargs):
        self.metrics[name] = float(value)


def original_train_module(model, optimizer, rank_microbatch_size: int, patch_disc_tau: float = 0.1,
                          contrastive_tau: float = 0.1, contrastive_weight: float = 0.1,
                          max_grad_norm: float | None = 1.0):
    """The original's ContrastiveLatentMIMTrainModule around `model` (an original LatentMIM), as the v1
    recipe configures it (loss `modality_patch_discrimination`, InfoNCE weight 0.1, frozen target: EMA (1, 1),
    token exit 0 for every modality), without olmo-core's trainer: `train_batch` and `optim_step` are the
    original's own methods; `.trainer.metrics` holds what it records (e.g. "train/ModalityPatchDisc")."""
    _, loss, cl = original_training()
    tm = object.__new__(cl.ContrastiveLatentMIMTrainModule)  # olmo-core's TrainModule.__init__ is not needed
    tm.model = model
    tm.optimizer = optimizer
    tm.device = next(model.parameters()).device
    tm.rank_microbatch_size = rank_microbatch_size
    tm.start_ema, tm.end_ema = 1.0, 1.0
    tm.token_exit_cfg = {m: 0 for m in model.encoder.supported_modality_names}
    tm.base_loss = loss.ModalityPatchDiscriminationLoss(tau=patch_disc_tau)
    tm.contrastive_loss = loss.InfoNCELoss(tau=contrastive_tau, weight=contrastive_weight)
    tm.regularizer = tm.mae_loss = None
    tm.total_loss_name = tm.base_loss.name
    tm.autocast_precision = None
    tm.max_grad_norm = max_grad_norm
    tm.scheduler = None
    tm._replicate_grad_sync = False
    tm._dp_config = None
    tm.trainer = _Recorder()
    return tm

