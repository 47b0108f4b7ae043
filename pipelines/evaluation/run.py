"""One evaluation run: read a labelled dataset, embed it with Ray Data (the trained encoder and the
baselines side by side), score kNN / linear probes, print one line per figure and write
<out>/eval.json and <out>/eval.md."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from pipelines.common.storage import Storage, join
from pipelines.evaluation.extract import extract_features
from pipelines.evaluation.readers import reader_from_config
from pipelines.evaluation.score import format_record, markdown_table, score_task
from pipelines.evaluation.task import split_sizes


@dataclass
class DatasetConfig:
    format: str = field(default="synth", metadata={"help": "synth | bigearthnet | chips | geobench"})
    root: str = field(default="", metadata={"help": "dataset folder or URI (synth: the corpus root)"})
    name: str = field(default="", metadata={"help": "task name in the report (default: per format)"})
    kind: str = field(default="classification", metadata={"help": "chips/synth: classification | multilabel | segmentation"})
    s1_root: str = field(default="", metadata={"help": "bigearthnet: the Sentinel-1 patch folders (optional)"})
    modality: str = field(default="sentinel2_l2a", metadata={"help": "chips: modality of the chip bands"})
    bands: list[str] = field(default_factory=list, metadata={"help": "chips: band names in file order"})
    class_names: list[str] = field(default_factory=list, metadata={"help": "class names (default: labels seen)"})
    labels_csv: str = field(default="labels.csv", metadata={"help": "chips: labels CSV inside root"})
    partition: str = field(default="default", metadata={"help": "geobench: partition name"})
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.0, 0.3],
                                   metadata={"help": "train/val/test fractions where the data has no split"})
    split_block: int = field(default=4, metadata={"help": "synth: grid cells per side of a geographic split block"})
    chip_size: int = field(default=64, metadata={"help": "synth: chip side in pixels (cropped from the tile)"})
    chips_per_tile: int = field(default=1, metadata={"help": "synth: chips cut from each tile"})
    max_timesteps: int = field(default=12, metadata={"help": "synth: first T timesteps kept"})
    max_samples: int = field(default=0, metadata={"help": "synth: tiles read (0 = all)"})
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a", "sentinel1", "landsat"],
                                  metadata={"help": "synth: corpus modalities fed to the encoder"})


@dataclass
class EvalConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    checkpoint: str = field(default="", metadata={"help": "trained encoder checkpoint URI (empty: baselines only)"})
    baselines: list[str] = field(default_factory=lambda: ["random", "band_stats"],
                                 metadata={"help": "random (random-init encoder, same size) and/or band_stats"})
    random_size: str = field(default="", metadata={"help": "size of the random encoder (default: the checkpoint's)"})
    patch_size: int = 4
    pooling: str = field(default="mean", metadata={"help": "mean | max (classification)"})
    probes: list[str] = field(default_factory=lambda: ["knn", "linear"])
    k: int = 20
    Cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0],
                            metadata={"help": "logistic regression C grid, chosen on the held-out split"})
    val_fraction: float = field(default=0.2, metadata={"help": "held out of train to pick C / lr when no val split"})
    seg_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    seg_epochs: int = 50
    seed: int = 0
    batch_size: int = 16
    num_actors: int = 1
    out: str = field(default="runs/eval", metadata={"help": "output folder or URI for eval.json / eval.md"})
    s3_endpoint: str = ""
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (empty: local / already initialised)"})


def build_reader(cfg: EvalConfig):
    d = cfg.dataset
    common = {"s3_endpoint": cfg.s3_endpoint or None}
    if d.name:
        common["name"] = d.name
    if d.format == "bigearthnet":
        return reader_from_config("bigearthnet", s2_root=d.root, s1_root=d.s1_root or None, class_names=list(d.class_names),
                                  fractions=tuple(d.fractions), seed=cfg.seed, **common)
    if d.format == "chips":
        return reader_from_config("chips", root=d.root, modality=d.modality, kind=d.kind, labels_csv=d.labels_csv,
                                  bands=list(d.bands), class_names=list(d.class_names), fractions=tuple(d.fractions),
                                  seed=cfg.seed, **common)
    if d.format == "geobench":
        return reader_from_config("geobench", root=d.root, partition=d.partition, **common)
    if d.format == "synth":
        return reader_from_config("synth", root=d.root, kind=d.kind, chip_size=d.chip_size,
                                  chips_per_tile=d.chips_per_tile, max_timesteps=d.max_timesteps,
                                  max_samples=d.max_samples, split_block=d.split_block, fractions=tuple(d.fractions),
                                  modalities=tuple(d.modalities),
                                  seed=cfg.seed, **common)
    raise ValueError(f"dataset.format: unknown format {d.format!r} (synth, bigearthnet, chips, geobench)")


def feature_sources(cfg: EvalConfig) -> dict[str, dict]:
    """{name: source spec}: the trained encoder first, then the baselines."""
    sources = {}
    random_spec = {"kind": "random", "size": cfg.random_size or "nano", "seed": cfg.seed}
    if cfg.checkpoint:
        sources["trained"] = {"kind": "checkpoint", "uri": cfg.checkpoint}
        if not cfg.random_size:  # the random twin copies the trained encoder's architecture
            from pipelines.evaluation.features import encoder_shape, load_source

            enc = load_source(sources["trained"], Storage(cfg.s3_endpoint or None))
            random_spec["overrides"] = encoder_shape(enc)
    for b in cfg.baselines:
        if b == "random":
            sources["random"] = random_spec
        elif b == "band_stats":
            sources["band_stats"] = {"kind": "band_stats"}
        else:
            raise ValueError(f"baselines: unknown baseline {b!r} (random, band_stats)")
    if not sources:
        raise ValueError("nothing to evaluate: give a checkpoint and/or baselines")
    return sources


def run_eval(cfg: EvalConfig) -> dict:
    import ray

    t0 = time.time()
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or None)
    reader = build_reader(cfg)
    info = reader.info()
    rows = reader.rows()
    sizes = split_sizes(rows)
    print(f"eval task={info.name} kind={info.kind} classes={info.num_classes} "
          + " ".join(f"n_{k}={v}" for k, v in sizes.items()), flush=True)
    sources = feature_sources(cfg)
    dense = info.kind == "segmentation"
    feats = extract_features(reader, rows, sources, patch_size=cfg.patch_size, pooling=cfg.pooling, dense=dense,
                             batch_size=cfg.batch_size, num_actors=cfg.num_actors, s3_endpoint=cfg.s3_endpoint or None)
    t_embed = time.time() - t0
    feats, no_data = feats.without_empty()
    if no_data:
        print(f"eval excluded {len(no_data)} chip(s) with no valid pixel in any modality/timestep "
              f"(listed in eval.json under 'excluded'), e.g. {no_data[:3]}", flush=True)
        sizes = {s: int((feats.splits == s).sum()) for s in sizes}
    records = []
    for name in tqdm(list(feats.features), desc="probes", unit="source"):
        one = type(feats)(feats.ids, feats.splits, feats.labels, {name: feats.features[name]})
        records += score_task(info, one, k=cfg.k, Cs=tuple(cfg.Cs), val_fraction=cfg.val_fraction,
                              seg_lrs=tuple(cfg.seg_lrs), seg_epochs=cfg.seg_epochs, seed=cfg.seed,
                              probes=tuple(cfg.probes))
    for r in records:
        print(format_record(r), flush=True)
    report = {
        "task": dataclasses.asdict(info),
        "splits": sizes,
        "excluded": {"no_valid_pixel": no_data},
        "sources": {k: {kk: vv for kk, vv in v.items() if kk != "encoder"} for k, v in sources.items()},
        "config": dataclasses.asdict(cfg),
        "results": records,
        "seconds": {"embed": round(t_embed, 2), "total": round(time.time() - t0, 2)},
    }
    storage = Storage(cfg.s3_endpoint or None)
    storage.write_text(join(cfg.out, "eval.json"), json.dumps(report, indent=2))
    storage.write_text(join(cfg.out, "eval.md"), markdown_table(records, title=f"Evaluation: {info.name}"))
    print(f"eval wrote {join(cfg.out, 'eval.json')} and {join(cfg.out, 'eval.md')}", flush=True)
    return report
