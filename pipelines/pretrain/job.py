"""The driver side of pretraining: Latent MIM Lite on Ray Train with DeepSpeed as the engine.

    cfg = load_config(PretrainConfig, argv)
    result = fit(cfg, probe=None)     # TorchTrainer(train_loop, ...).fit() plus resume / pruning

`fit` validates the config, finds the run's latest checkpoint to resume from, starts the worker group
(pipelines/pretrain/loop.py) with the config object, the test fault plan and the optional probe, shows a
progress bar, and afterwards prunes the run's checkpoints across its attempts."""

from __future__ import annotations

import time

from pipelines.common.faults import fault_plan
from pipelines.common.ray_start import init_ray
from pipelines.common.storage import Storage, is_s3, strip_scheme
from pipelines.pretrain.checkpoints import checkpoint_step, latest_checkpoint, prune_checkpoints, ray_storage
from pipelines.pretrain.config import PretrainConfig, final_step, run_uri, validate
from pipelines.pretrain.loop import Probe, train_loop
from pipelines.pretrain.worker import check_init_from

PROGRESS_KEYS = ("loss", "val_loss", "lr", "tokens_per_s")


def _progress_callback(total: int, initial: int, desc: str = "pretrain", keys: tuple[str, ...] = PROGRESS_KEYS):
    """A Ray Tune callback that moves a tqdm bar on the driver as workers report steps; its postfix shows
    the latest value of each of `keys` (pretraining: training loss, validation loss, learning rate and token
    rate; each kept until a newer one comes: validation is reported every train.val_every steps only). The
    bar is made on the driver at the first result (the callback itself is pickled into the run's config)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.bar, self.postfix = None, {}

        def __getstate__(self):
            return {"bar": None, "postfix": {}}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")
            step = int(result.get("step", self.bar.n))
            self.bar.update(max(0, step - self.bar.n))
            for k in keys:
                if k in result:
                    self.postfix[k] = f"{result[k]:.4g}"
            self.bar.set_postfix(self.postfix, refresh=False)

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _resume_point(cfg: PretrainConfig, storage: Storage, fs) -> tuple[object, int]:
    """(Ray Checkpoint to resume from or None, its step) for a resubmitted run name."""
    from ray.train import Checkpoint

    uri = run_uri(cfg)
    latest = latest_checkpoint(storage, uri) if cfg.run.resume else None
    if latest is None:
        return None, 0
    step = checkpoint_step(storage, latest)
    print(f"resuming {uri} from {latest} (step {step})")
    return Checkpoint(path=strip_scheme(latest) if is_s3(latest) else latest, filesystem=fs), step


def _trainer(cfg: PretrainConfig, fs, path: str, resume_from, initial: int, probe: Probe | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "faults": fault_plan(), "probe": probe, "submitted": time.time()},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[_progress_callback(final_step(cfg), initial)], verbose=0,
        ),
        resume_from_checkpoint=resume_from,
    )  # fmt: skip


def fit(cfg: PretrainConfig, probe: Probe | None = None):
    """Run (or continue) pretraining; returns Ray's Result (None when the run had already reached its
    final step, train.stop_at_step or train.max_steps). `probe(encoder) -> {name: score}` (picklable) is
    called every train.probe_every steps; it is required when probe_every > 0. The run's final
    metrics.jsonl and loss_curve.png lie in run_uri(cfg)."""
    validate(cfg)
    if cfg.train.probe_every > 0 and probe is None:
        raise ValueError("train.probe_every > 0 needs a probe (pipelines.evaluation.hook.make_probe)")
    storage = Storage()
    uri = run_uri(cfg)
    storage.makedirs(cfg.run.storage_path)
    fs, path = ray_storage(storage, cfg.run.storage_path)
    resume_from, initial = _resume_point(cfg, storage, fs)
    if initial >= final_step(cfg):
        print(f"{uri} already reached step {initial} >= its final step {final_step(cfg)}; nothing to do")
        return None
    if resume_from is None:
        check_init_from(cfg, storage)  # a fresh start: refuse wrong weights before any worker starts
    trainer = _trainer(cfg, fs, path, resume_from, initial, probe)
    init_ray()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    prune_checkpoints(storage, uri, cfg.train.keep_checkpoints)
    return result
