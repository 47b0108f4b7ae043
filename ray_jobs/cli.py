"""`olmoearth` command: one subcommand per job. Each job lives in ray_jobs/<job>.py with `main(argv)`,
so `olmoearth pretrain ...` and `ray job submit -- python ray_jobs/pretrain.py ...` run the same code."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line description)
COMMANDS = {
    "synth": ("ray_jobs.synth", "write a realistic synthetic raw corpus (GeoTIFFs + CSVs) to a URI"),
    "build-corpus": ("ray_jobs.build_corpus", "validate raw GeoTIFFs and write training shards + stats"),
    "pretrain": ("ray_jobs.pretrain", "Latent MIM Lite pretraining with Ray Train + DeepSpeed"),
    "export": ("ray_jobs.export", "export the encoder of a checkpoint as one safetensors file"),
    "convert": ("ray_jobs.convert", "convert an original OlmoEarth v1 checkpoint to this project's format"),
    "serve": ("ray_jobs.serve", "run the Ray Serve embedding endpoint"),
    "embed": ("ray_jobs.embed_area", "embed a large area into a georeferenced embedding map"),
    "eval": ("ray_jobs.evaluate", "kNN and linear probes on frozen embeddings"),
    "select-cells": ("ray_jobs.select_cells", "choose corpus cells from an OpenStreetMap extract by category"),
    "materialize": ("ray_jobs.materialize", "write the raw corpus layout for cells from STAC imagery and maps"),
    "finetune": ("ray_jobs.finetune", "fine-tune the encoder and a head on a labelled task (Ray Train)"),
    "predict": ("ray_jobs.predict", "map a fine-tuned model's predictions over a large area"),
    "demo": ("ray_jobs.demo", "the whole system end to end on a local cluster"),
}


def usage() -> str:
    lines = ["usage: olmoearth <command> [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<14}{desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"olmoearth: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
