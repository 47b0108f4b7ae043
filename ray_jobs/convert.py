"""`olmoearth convert`: an original OlmoEarth v1 checkpoint folder (config.json + weights.pth) -> this
project's checkpoint (one safetensors file: encoder + decoder + frozen target projection), or with
--encoder_only true the encoder export that `olmoearth serve` / `olmoearth eval` load.

    olmoearth convert --src ~/hf/OlmoEarth-v1-Base --dst s3://models/olmoearth-v1-base.safetensors
    olmoearth convert --src s3://weights/OlmoEarth-v1-Nano --dst nano_encoder.safetensors --encoder_only true

Either side may be a local path or s3:// (endpoint from --s3_endpoint or AWS_ENDPOINT_URL). Every tensor is
mapped through an explicit name table; a missing, extra or mis-shaped tensor stops the job with its key.
The logic lives in olmoearth/convert.py; this parses the config and moves the bytes."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from tqdm import tqdm

from olmoearth.convert import convert
from pipelines.common.config import load_config
from pipelines.common.storage import Storage, is_s3, strip_scheme


@dataclass
class ConvertConfig:
    """Convert an original OlmoEarth v1 checkpoint."""

    src: str = ""  # original checkpoint folder (config.json + weights.pth): path or s3://
    dst: str = ""  # output .safetensors file: path or s3://
    encoder_only: bool = False  # write only the encoder (the export format that serving loads)


def run(cfg: ConvertConfig) -> dict:
    if not cfg.src:
        raise ValueError("convert: --src is required (an original checkpoint folder)")
    if not cfg.dst:
        raise ValueError("convert: --dst is required (the output .safetensors file)")
    if not cfg.dst.endswith(".safetensors"):
        raise ValueError(f"convert: --dst must name a .safetensors file, got {cfg.dst!r}")
    storage = Storage()
    src_fs = storage.fs(cfg.src) if is_s3(cfg.src) else None
    dst_fs = None
    if is_s3(cfg.dst):
        bucket = "s3://" + strip_scheme(cfg.dst).split("/")[0]
        storage.makedirs(bucket)
        dst_fs = storage.fs(cfg.dst)
    with tqdm(total=1, desc=f"convert {cfg.src}", unit="model") as bar:
        summary = convert(cfg.src, cfg.dst, src_fs=src_fs, dst_fs=dst_fs, encoder_only=cfg.encoder_only)
        bar.update(1)
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(ConvertConfig, argv, description=__doc__)
    print(json.dumps(run(cfg), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
