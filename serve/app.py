"""The online embedding endpoint: a Ray Serve application with one encoder deployment behind FastAPI.

    POST /embed?patch_size=4&output=patches|pooled&format=npy|npz|tif
        body .npz (Content-Type application/x-npz or application/octet-stream): arrays named by modality,
             (B, H, W, T, C) raw units, NaN missing, plus optional `months` (B, T) or (T,)
        body multipart/form-data: one multi-band GeoTIFF per modality (field name = modality, T*C bands
             time-major), optional text field `months` ("0,1,2"); the answer may be a GeoTIFF on the same grid
        body image/tiff with ?modality=NAME: one GeoTIFF
      -> .npy (default for arrays), .npz {"embeddings"}, or GeoTIFF (default for GeoTIFF input with
         output=patches) with one band per embedding dimension, the input's CRS, and pixels of p x 10 m.
      Header X-Batch-Size: how many requests shared the encoder forward that answered this one.
    GET /healthz, GET /info (model size, modalities and bands, embedding dim)

Requests go through `@serve.batch`: those of equal shape (modalities, H, W, T) and patch size within one
batch window are concatenated into one forward. Bad requests get a 4xx JSON {"error", "field"}.
"""


import asyncio
import email.parser
import email.policy
import io
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve.inputs import BadRequest, EmbedInput, Limits, parse_geotiffs, parse_npz, parse_patch_size


@dataclass
class ServeConfig:
    """The endpoint: model, batching, autoscaling and request limits."""

    # any source olmoearth.load takes: exported .safetensors, checkpoint folder, random:<size>[:<seed>]
    model_uri: str = "random:nano"
    host: str = "127.0.0.1"  # HTTP address Serve listens on
    port: int = 8000  # HTTP port
    name: str = "olmoearth"  # Serve application name
    route_prefix: str = "/"  # URL prefix of the endpoint's routes
    max_batch_size: int = 16  # requests concatenated into one encoder forward at most
    batch_wait_timeout_s: float = 0.02  # seconds a batch waits to fill before it runs
    # requests a replica holds at once; must be >= max_batch_size, else batches never fill
    max_ongoing_requests: int = 32
    min_replicas: int = 1  # autoscaling: fewest replicas
    max_replicas: int = 2  # autoscaling: most replicas
    target_ongoing_requests: float = 16.0  # autoscaling: ongoing requests per replica to aim for
    num_cpus: float = 1.0  # CPUs reserved per replica
    num_gpus: float = 0.0  # GPUs per replica (> 0: the encoder runs on CUDA)
    torch_threads: int = 0  # torch intra-op threads per replica (0: torch's default)
    default_patch_size: int = 4  # patch size when a request gives none (1..8)
    max_tile: int = 256  # largest tile side in px a request may send
    max_samples: int = 64  # most samples (B) per request
    max_body_mb: float = 256.0  # largest request body in MB (larger: 413)


NPZ_TYPES = ("application/x-npz", "application/npz", "application/octet-stream", "application/zip")
TIFF_TYPES = ("image/tiff", "image/geotiff", "application/geotiff")

api = FastAPI(title="OlmoEarth embeddings", version="1")


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """multipart/form-data -> (files {field: bytes}, text fields {field: str}) with the stdlib MIME parser."""
    if "boundary=" not in content_type:
        raise BadRequest("Content-Type", "multipart/form-data without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise BadRequest("body", "malformed multipart/form-data body")
    files, fields = {}, {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise BadRequest("body", "multipart part without a field name")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or part.get_content_type() in TIFF_TYPES + NPZ_TYPES:
            if name in files:
                raise BadRequest(name, "given twice")
            files[name] = data
        else:
            fields[name] = data.decode(errors="replace")
    return files, fields


def error(e: BadRequest) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status)


@serve.deployment(name="OlmoEarthEncoder")
@serve.ingress(api)
class EncoderDeployment:
    def __init__(self, cfg: ServeConfig):
        from serve.embedder import Embedder

        self.cfg = cfg
        self.limits = Limits(cfg.max_tile, cfg.max_samples)
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        self.embedder = Embedder(cfg.model_uri, device=device, num_threads=cfg.torch_threads or None)
        self.embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.started = time.time()

    # ---- batched forward ---------------------------------------------------------------------------------

    def _forward(self, items: list[tuple[EmbedInput, int]]) -> list:
        """Group compatible requests, one forward per group; a failing group fails only its requests."""
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (inp, p) in enumerate(items):
            groups.setdefault((inp.shape_key, p), []).append(i)
        for (_, p), idx in groups.items():
            try:
                x = {m: np.concatenate([items[i][0].x[m] for i in idx]) for m in items[idx[0]][0].x}
                months = np.concatenate([items[i][0].months for i in idx])
                patches, pooled = self.embedder.embed(x, months, p)
                start = 0
                for i in idx:
                    b = items[i][0].batch
                    results[i] = (patches[start : start + b], pooled[start : start + b], len(idx))
                    start += b
            except Exception as e:  # noqa: BLE001 - reported to each caller, the replica keeps serving
                for i in idx:
                    results[i] = e
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def embed_batch(self, items: list[tuple[EmbedInput, int]]) -> list:
        return await asyncio.get_running_loop().run_in_executor(None, self._forward, items)

    # ---- routes ------------------------------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1)}

    @api.get("/info")
    def info(self) -> dict:
        out = self.embedder.describe()
        out["limits"] = {"max_tile": self.cfg.max_tile, "max_samples": self.cfg.max_samples,
                         "patch_size": [1, 8], "default_patch_size": self.cfg.default_patch_size}  # fmt: skip
        out["batching"] = {"max_batch_size": self.cfg.max_batch_size,
                           "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s}  # fmt: skip
        return out

    @api.post("/embed")
    async def embed(self, request: Request) -> Response:
        try:
            inp, p, output, fmt = await self._parse(request)
        except BadRequest as e:
            return error(e)
        result = await self.embed_batch((inp, p))
        if isinstance(result, Exception):  # inputs were validated: a failure here is the server's
            return JSONResponse({"error": f"{type(result).__name__}: {result}", "field": None}, status_code=500)
        patches, pooled, batch_size = result
        headers = {"X-Batch-Size": str(batch_size), "X-Patch-Size": str(p)}
        emb = patches if output == "patches" else pooled
        if fmt == "tif":
            from serve.mapping.geo import write_geotiff_bytes

            g = inp.georef
            a, b, c, d, e, f = g.transform
            transform = (a * p, b * p, c, d * p, e * p, f)  # same origin, pixels p times larger
            tags = {"patch_size": p, "model": self.embedder.info.get("source"), "units": "embedding"}
            data = write_geotiff_bytes(patches[0], g.crs_wkt, transform, tags)
            return Response(data, media_type="image/tiff", headers=headers)
        buf = io.BytesIO()
        if fmt == "npz":
            np.savez(buf, embeddings=emb, patch_size=np.int64(p))
            return Response(buf.getvalue(), media_type="application/x-npz", headers=headers)
        np.save(buf, emb)
        return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)

    async def _parse(self, request: Request) -> tuple[EmbedInput, int, str, str]:
        q = request.query_params
        known = {"patch_size", "output", "format", "months", "modality"}
        unknown = sorted(set(q) - known)
        if unknown:
            raise BadRequest(unknown[0], f"unknown query parameter; known: {', '.join(sorted(known))}")
        p = parse_patch_size(q.get("patch_size"), self.cfg.default_patch_size)
        output = q.get("output", "patches")
        if output not in ("patches", "pooled"):
            raise BadRequest("output", f"must be 'patches' or 'pooled', got {output!r}")
        ctype = request.headers.get("content-type", "")
        base = ctype.split(";")[0].strip().lower()
        if not (base == "multipart/form-data" or base in NPZ_TYPES or base in TIFF_TYPES):
            raise BadRequest("Content-Type", f"unsupported {ctype!r}; send multipart/form-data (GeoTIFF per "
                                             "modality), application/x-npz or image/tiff", status=415)  # fmt: skip
        length = request.headers.get("content-length")
        limit = int(self.cfg.max_body_mb * 2**20)
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadRequest("body", f"request body over {self.cfg.max_body_mb} MB", status=413)
        body = await request.body()
        if len(body) > limit:
            raise BadRequest("body", f"request body over {self.cfg.max_body_mb} MB", status=413)
        if not body:
            raise BadRequest("body", "empty request body")
        if base == "multipart/form-data":
            files, fields = parse_multipart(body, ctype)
            months = fields.pop("months", None) or q.get("months")
            for k in fields:
                raise BadRequest(k, "unexpected text field (send GeoTIFFs as file parts)")
            inp = await asyncio.to_thread(parse_geotiffs, files, p, self.limits, months)
        elif base in TIFF_TYPES:
            modality = q.get("modality")
            if not modality:
                raise BadRequest("modality", "required with a single image/tiff body (e.g. ?modality=sentinel2_l2a)")
            inp = await asyncio.to_thread(parse_geotiffs, {modality: body}, p, self.limits, q.get("months"))
        else:
            inp = await asyncio.to_thread(parse_npz, body, p, self.limits, q.get("months"))
        fmt = q.get("format") or ("tif" if inp.georef is not None and output == "patches" else "npy")
        if fmt not in ("npy", "npz", "tif"):
            raise BadRequest("format", f"must be npy, npz or tif, got {fmt!r}")
        if fmt == "tif" and (inp.georef is None or output != "patches"):
            raise BadRequest("format", "tif output needs GeoTIFF input and output=patches")
        return inp, p, output, fmt


def build_app(cfg: ServeConfig):
    """The bound Serve application for `cfg` (autoscaling, batching and resources applied)."""
    if cfg.max_ongoing_requests < cfg.max_batch_size:
        raise ValueError(f"max_ongoing_requests ({cfg.max_ongoing_requests}) must be >= max_batch_size "
                         f"({cfg.max_batch_size}), else batches never fill")  # fmt: skip
    if not 1 <= cfg.min_replicas <= cfg.max_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {cfg.min_replicas}, {cfg.max_replicas}")
    actor = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        actor["num_gpus"] = cfg.num_gpus
    return EncoderDeployment.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options=actor,
    ).bind(cfg)  # fmt: skip


def app_builder(args: dict):
    """Entry for `serve run serve.app:app_builder` / a Serve config YAML (configs/serve.yaml): args are
    ServeConfig fields."""
    from pipelines.common.config import from_dict

    return build_app(from_dict(ServeConfig, dict(args or {})))


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve on cfg.host:cfg.port and deploy the application; returns its handle."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=blocking)
