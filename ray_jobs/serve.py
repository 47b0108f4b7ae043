"""`olmoearth serve`: run the embedding endpoint (serve/app.py) until interrupted.

    olmoearth serve --config configs/serve.yaml --model_uri s3://bucket/models/enc.safetensors --port 8000

--config takes either a ServeConfig YAML or a Ray Serve config (configs/serve.yaml: the first application's
`args` and the `http_options` host / port are used); flags override it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import yaml

from pipelines.common.config import add_config_args, config_from_args
from pipelines.common.ray_start import init_ray


def serve_config_to_job_yaml(path: str) -> str:
    """A Ray Serve config file -> a temporary ServeConfig YAML (or `path` itself if it is one already)."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if "applications" not in data:
        return path
    apps = data["applications"] or []
    if not apps:
        raise ValueError(f"{path}: `applications` is empty")
    app = apps[0]
    args = dict(app.get("args") or {})
    http = data.get("http_options") or {}
    args.setdefault("host", http.get("host", "127.0.0.1"))
    args.setdefault("port", http.get("port", 8000))
    args.setdefault("name", app.get("name", "olmoearth"))
    args.setdefault("route_prefix", app.get("route_prefix", "/"))
    fd, out = tempfile.mkstemp(suffix=".yaml", prefix="serve-")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(args, fh)
    return out


def parse(argv: list[str] | None):
    from serve.app import ServeConfig

    parser = argparse.ArgumentParser(prog="olmoearth serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_args(parser, ServeConfig)
    args = parser.parse_args(argv)
    if args.config:
        args.config = serve_config_to_job_yaml(args.config)
    return config_from_args(ServeConfig, args)


def main(argv: list[str] | None = None) -> int:
    from ray import serve

    from serve.app import run

    cfg = parse(argv)
    init_ray()
    run(cfg)
    print(f"OlmoEarth endpoint on http://{cfg.host}:{cfg.port}{cfg.route_prefix} (model {cfg.model_uri}); Ctrl-C stops it",
          flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
