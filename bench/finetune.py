"""Fine-tuning: the job's throughput against a plain PyTorch loop, and what fine-tuning buys on the labelled
synthetic task, side by side in one run on a corpus written to local files.

1. this job (`pipelines.finetune.job.fit`: Ray Train + DeepSpeed ZeRO-2), 1 worker, 1 torch thread ->
   samples/s of each epoch's training steps (evaluation and checkpoints left out, as in its metrics rows);
   the first epoch (start-up, the frozen one of the original schedule) is left out, the median of the rest
   taken;
2. a plain single-process loop (pipelines/finetune/baselines.py `plain_finetune`) over the same model, head,
   rows, D4 draws, AdamW groups, schedule and clipping, 1 torch thread -> samples/s over the same epochs;
   `ratio finetune_job_vs_plain` = 1. / 2. (the target: >= 0.9);
3. test scores on the synthetic task: the job's fine-tuned model (the best-val epoch), the frozen linear probe
   of the same initial encoder (the evaluation stage's probe), and the same fine-tuning started from a
   random-init encoder of the same size (another seed; with --init_from random:... both runs start random).

    DS_ACCELERATOR=cpu python bench/finetune.py [--kind segmentation|classification] [--epochs N] \
        [--tiles N] [--init_from random:nano:0]
The recipe of each kind is its shipped config (configs/finetune_synth_seg.yaml, finetune_synth_cls.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


CONFIGS = {"segmentation": "configs/finetune_synth_seg.yaml", "classification": "configs/finetune_synth_cls.yaml"}
TILES = {"segmentation": 16, "classification": 36}  # the corpora of tests/test_finetune.py


def job_config(root: str, runs: str, kind: str, epochs: int | None, init_from: str, workers: int = 1):
    """The shipped recipe of the kind (configs/finetune_synth_*.yaml), on this corpus, `workers` workers."""
    import yaml

    from pipelines.common.config import from_dict
    from pipelines.finetune.config import FinetuneConfig

    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root_dir, CONFIGS[kind])) as f:
        doc = yaml.safe_load(f)
    doc["data"]["root"], doc["model"]["init_from"] = root, init_from
    doc["train"].update({"num_workers": workers, "precision": "fp32", "log_every": 0,
                         **({"epochs": epochs} if epochs else {})})  # fmt: skip
    doc["run"] = {"name": f"bench-{kind}", "storage_path": runs, "keep_checkpoints": 1}
    return from_dict(FinetuneConfig, doc)


def run_job(cfg) -> tuple[dict, list[dict]]:
    from pipelines.common.storage import Storage, join
    from pipelines.finetune.config import run_uri
    from pipelines.finetune.job import fit

    report = fit(cfg)
    rows = [json.loads(x) for x in Storage().read_text(join(run_uri(cfg), "metrics.jsonl")).splitlines()]
    return report, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="segmentation", choices=["segmentation", "classification"])
    ap.add_argument("--epochs", type=int, default=0, help="epochs; 0: the kind's config (10 / 6)")
    ap.add_argument("--tiles", type=int, default=0, help="labelled 256 px tiles of the corpus; 0: 16 for "
                    "segmentation, 36 for classification (the tests' corpora)")
    ap.add_argument("--init_from", default="random:nano:0", help="the encoder to fine-tune (olmoearth.load)")
    args = ap.parse_args()

    import torch

    from olmoearth import load
    from pipelines.common.ray_start import init_ray
    from pipelines.common.storage import Storage
    from pipelines.corpus.synth import SynthConfig, write_corpus
    from pipelines.finetune.baselines import frozen_probe, plain_finetune, scores_on
    from pipelines.finetune.data import checked_splits, make_reader, task_spec
    from pipelines.finetune.loop import build_model
    from pipelines.pretrain.worker import normal_priority

    tmp = tempfile.mkdtemp(prefix="bench-finetune-")
    root = os.path.join(tmp, "synth")
    tiles = args.tiles or TILES[args.kind]
    write_corpus(SynthConfig(num_samples=tiles, seed=3, labelled=True, timesteps=2, cloud_rate=0.0,
                             missing_timestep_rate=0.0, missing_modality_rate=0.0), root, Storage())  # fmt: skip
    cfg = job_config(root, os.path.join(tmp, "runs"), args.kind, args.epochs, args.init_from)
    init_ray(num_cpus=4)
    started = time.time()
    report, rows = run_job(cfg)
    job_s = time.time() - started
    job_rate = statistics.median(r["samples_per_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["samples_per_s"]

    reader = make_reader(cfg.data)
    task = task_spec(cfg.data, reader.info(), cfg.model.head)
    splits, _ = checked_splits(reader, task)
    torch.set_num_threads(1)
    normal_priority()  # as the job's workers: niceness 0 where allowed, so both loops compete alike
    model = build_model(cfg, task, Storage())
    _, plain = plain_finetune(cfg, reader, splits, model, threads=1)
    rates = plain["epoch_samples_per_s"]  # the same epochs left out as for the job
    plain_rate = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    metric = {"segmentation": "miou", "classification": "accuracy"}[args.kind]
    probe = frozen_probe(reader, splits, task, load(args.init_from))
    size = args.init_from.split(":")[1] if args.init_from.startswith("random:") else "nano"
    scratch_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=f"random:{size}:1"))
    scratch, _ = plain_finetune(scratch_cfg, reader, splits, build_model(scratch_cfg, task, Storage()))
    scratch_score = scores_on(scratch, reader, splits["test"])[metric]
    tuned = report["test_at_best"][metric]

    print(f"# fine-tuning bench: {args.kind}, {cfg.train.epochs} epochs, {len(splits['train'])} train / "
          f"{len(splits['test'])} test chips, init {args.init_from}; job wall {job_s:.0f} s")
    print("| what | samples/s | test " + metric + " |")
    print("|---|---:|---:|")
    print(f"| job (Ray Train + DeepSpeed ZeRO-2, 1 worker) | {job_rate:.2f} | {tuned:.4f} |")
    print(f"| plain PyTorch loop, same model / batches | {plain_rate:.2f} | |")
    print(f"| frozen linear probe of the same encoder | | {probe['value']:.4f} |")
    print(f"| fine-tuned from random init (seed 1) | | {scratch_score:.4f} |")
    print(f"ratio finetune_job_vs_plain: {job_rate / plain_rate:.3f}")
    print(f"ratio finetuned_vs_frozen_probe_{metric}: {tuned / max(probe['value'], 1e-9):.3f}")
    print(f"ratio finetuned_vs_random_init_{metric}: {tuned / max(scratch_score, 1e-9):.3f}")


if __name__ == "__main__":
    main()
