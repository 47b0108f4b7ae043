"""One evaluation run: read a labelled dataset, embed it with Ray Data (the trained encoder and the
baselines side by side), score kNN / linear probes, print one line per figure and write
<out>/eval.json and <out>/eval.md."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from pipelines.common.ray_start import init_ray
from pipelines.common.storage import Storage, join
from pipelines.evaluation.extract import extract_features
from pipelines.evaluation.readers import reader_from_config
from pipelines.evaluation.score import format_record, markdown_table, score_task
from pipelines.evaluation.task import split_sizes


@dataclass
class DatasetConfig:
    """The labelled dataset to evaluate on."""

    format: str = "synth"  # synth | bigearthnet | chips | geobench
    root: str = ""  # dataset folder or URI (synth: the corpus root)
    name: str = ""  # task name in the report (default: per format)
    kind: str = "classification"  # chips/synth: classification | multilabel | segmentation
    s1_root: str = ""  # bigearthnet: the Sentinel-1 patch folders (optional)
    modality: str = "sentinel2_l2a"  # chips: modality of the chip bands
    bands: list[str] = field(default_factory=list)  # chips: band names in file order
    class_names: list[str] = field(default_factory=list)  # class names (default: labels seen)
    labels_csv: str = "labels.csv"  # chips: labels CSV inside root
    partition: str = "default"  # geobench: partition name
    # train/val/test fractions where the data has no split
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.0, 0.3])
    split_block: int = 4  # synth: grid cells per side of a geographic split block
    chip_size: int = 64  # synth: chip side in pixels (cropped from the tile)
    chips_per_tile: int = 1  # synth: chips cut from each tile
    max_timesteps: int = 12  # synth: first T timesteps kept
    max_samples: int = 0  # synth: tiles read (0 = all)
    # synth: corpus modalities fed to the encoder
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a", "sentinel1", "landsat"])


@dataclass
class EvalConfig:
    """`olmoearth eval`: kNN and linear probes of a frozen encoder and baselines on a labelled dataset."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # the labelled dataset
    checkpoint: str = ""  # trained encoder: any source olmoearth.load takes (empty: baselines only)
    # random (random-init encoder, same size) and/or band_stats
    baselines: list[str] = field(default_factory=lambda: ["random", "band_stats"])
    random_size: str = ""  # size of the random encoder (default: the checkpoint's)
    patch_size: int = 4  # encoder patch size, 1..8
    pooling: str = "mean"  # mean | max (classification)
    probes: list[str] = field(default_factory=lambda: ["knn", "linear"])  # knn and/or linear
    k: int = 20  # neighbours of the kNN probe
    # logistic regression C grid, chosen on the held-out split
    Cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    val_fraction: float = 0.2  # held out of train to pick C / lr when no val split
    seg_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])  # segmentation head lrs tried
    seg_epochs: int = 50  # segmentation head training epochs
    seed: int = 0  # seed of splits, random encoder and probes
    batch_size: int = 16  # chips per embedding batch
    num_actors: int = 1  # embedding actors (Ray Data actor pool size)
    out: str = "runs/eval"  # output folder or URI for eval.json / eval.md
    ray_address: str = ""  # Ray cluster address (empty: RAY_ADDRESS, else a local cluster)


def build_reader(cfg: EvalConfig):
    d = cfg.dataset
    common = {}
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

            enc = load_source(sources["trained"])
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
    t0 = time.time()
    init_ray(address=cfg.ray_address or None)
    reader = build_reader(cfg)
    info = reader.info()
    rows = reader.rows()
    sizes = split_sizes(rows)
    print(f"eval task={info.name} kind={info.kind} classes={info.num_classes} "
          + " ".join(f"n_{k}={v}" for k, v in sizes.items()), flush=True)
    sources = feature_sources(cfg)
    dense = info.kind == "segmentation"
    feats = extract_features(reader, rows, sources, patch_size=cfg.patch_size, pooling=cfg.pooling, dense=dense,
                             batch_size=cfg.batch_size, num_actors=cfg.num_actors)
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
    storage = Storage()
    storage.write_text(join(cfg.out, "eval.json"), json.dumps(report, indent=2))
    storage.write_text(join(cfg.out, "eval.md"), markdown_table(records, title=f"Evaluation: {info.name}"))
    print(f"eval wrote {join(cfg.out, 'eval.json')} and {join(cfg.out, 'eval.md')}", flush=True)
    return report
