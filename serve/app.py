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
    GET /info (model size, modalities and bands, embedding dim, limits)
    GET /healthz: a deployment of its own (`HealthDeployment`), so that it answers whatever the encoder's load

Requests go through `@serve.batch`: those of equal shape (modalities, H, W, T) and patch size within one
batch window are concatenated and run in forwards of at most `forward_tokens` tokens. Bad requests get a
4xx JSON {"error", "field"}. Hostile input is bounded before it costs anything: the body is read as a
stream under a size limit and two timeouts, every declared size (zip members, .npy headers, GeoTIFF
headers, the encoder tokens) is checked before decoding, decoding runs off the event loop, and a request
whose client left or whose deadline passed is dropped between forwards. Optional bearer-token auth.
"""

import asyncio
import email.parser
import email.policy
import hashlib
import hmac
import io
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.requests import ClientDisconnect

from serve.inputs import BadRequest, EmbedInput, Limits, parse_geotiffs, parse_npz, parse_patch_size

log = logging.getLogger(__name__)
TOKEN_ENV = "OLMOEARTH_SERVE_TOKEN"  # the bearer token, when the config gives none


@dataclass
class ServeConfig:
    """The endpoint: model, batching, autoscaling, request limits and access."""

    # any source olmoearth.load takes: exported .safetensors, checkpoint folder, random:<size>[:<seed>]
    model_uri: str = "random:nano"
    host: str = "127.0.0.1"  # HTTP address Serve listens on
    port: int = 8000  # HTTP port
    name: str = "olmoearth"  # Serve application name (the health route is the application <name>-health)
    route_prefix: str = "/"  # URL prefix of the endpoint's routes
    max_batch_size: int = 16  # requests concatenated into one encoder batch at most
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
    max_tile: int = 256  # largest tile side in px a request may send (larger: 413)
    max_samples: int = 64  # most samples (B) per request (more: 413)
    max_body_mb: float = 256.0  # largest request body in MB, enforced while it streams in (larger: 413)
    # encoder tokens of one request, (H/p) * (W/p) * T per bandset, summed over modalities and samples (more: 413)
    max_tokens: int = 131072
    max_tokens_per_sample: int = 16384  # encoder tokens of one sample: its attention length (more: 413)
    max_decoded_mb: float = 512.0  # arrays a request declares (zip members, .npy / GeoTIFF headers), MB (more: 413)
    max_parts: int = 8  # multipart parts or .npz arrays per request (more: 413)
    # a batch runs in forwards of at most this many tokens; between them, requests whose client has gone or
    # whose deadline has passed are dropped, and other batches get the encoder
    forward_tokens: int = 16384
    body_timeout_s: float = 60.0  # seconds the whole request body may take to arrive (slower: 408)
    body_idle_s: float = 10.0  # seconds the body may pause between chunks (longer: 408)
    request_timeout_s: float = 120.0  # deadline of a request, arrival to answer (past it: 503)
    # bearer token required on /embed and /info ("": the env var OLMOEARTH_SERVE_TOKEN, or no auth if unset)
    auth_token: str = ""

    @property
    def limits(self) -> Limits:
        return Limits(self.max_tile, self.max_samples, self.max_tokens, self.max_tokens_per_sample,
                      self.max_decoded_mb, self.max_parts)  # fmt: skip


NPZ_TYPES = ("application/x-npz", "application/npz", "application/octet-stream", "application/zip")
TIFF_TYPES = ("image/tiff", "image/geotiff", "application/geotiff")
QUERY = {"patch_size", "output", "format", "months", "modality"}

api = FastAPI(title="OlmoEarth embeddings", version="1")


def parse_multipart(body: bytes, content_type: str, max_parts: int = 8) -> tuple[dict[str, bytes], dict[str, str]]:
    """multipart/form-data -> (files {field: bytes}, text fields {field: str}) with the stdlib MIME parser;
    the parts are counted (one C-level scan) before any is parsed."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise BadRequest("Content-Type", "multipart/form-data without a boundary")
    parts = body.count(b"--" + m.group(1).encode("latin-1")) - 1
    if parts > max_parts:
        raise BadRequest("body", f"{parts} multipart parts, at most {max_parts}", status=413)
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


async def read_body(request: Request, limit: int, total_s: float, idle_s: float) -> bytes:
    """The request body, read as it streams in: 413 as soon as it passes `limit` bytes (declared or sent),
    408 if it takes over `total_s` or pauses over `idle_s` (a slow sender frees its request slot)."""
    length = request.headers.get("content-length")
    mb = f"{limit / 2**20:g} MB"
    if length is not None and (not length.isdigit() or len(length) > 15):
        raise BadRequest("Content-Length", "must be a number of bytes")
    if length is not None and int(length) > limit:
        raise BadRequest("body", f"request body over {mb}", status=413)
    loop = asyncio.get_running_loop()
    end, chunks, n = loop.time() + total_s, [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(idle_s, end - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BadRequest("body", f"not received in time (body_timeout_s {total_s:g}, body_idle_s {idle_s:g})",
                             status=408) from None  # fmt: skip
        except ClientDisconnect:
            raise BadRequest("body", "client disconnected before the body ended") from None
        n += len(chunk)
        if n > limit:
            raise BadRequest("body", f"request body over {mb}", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Ticket:
    """A request's standing while it waits for the encoder: past its deadline or cancelled (client gone),
    the forward drops its samples."""

    deadline: float  # time.monotonic()
    cancelled: bool = False

    def live(self) -> bool:
        return not self.cancelled and time.monotonic() < self.deadline


class Dropped(Exception):  # noqa: N818 - a request's result when its samples were dropped before their forward
    pass


def error(e: BadRequest) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@serve.deployment(name="OlmoEarthEncoder")
@serve.ingress(api)
class EncoderDeployment:
    def __init__(self, cfg: ServeConfig):
        from serve.embedder import Embedder

        self.cfg, self.limits = cfg, cfg.limits
        token = cfg.auth_token or os.environ.get(TOKEN_ENV, "")
        self.token = token_digest(token) if token else None
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        self.embedder = Embedder(cfg.model_uri, device=device, num_threads=cfg.torch_threads or None)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="forward")  # two batches take turns per forward
        self.embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    # ---- batched forward ---------------------------------------------------------------------------------

    def _forward(self, items: list[tuple[EmbedInput, int, Ticket]]) -> list:
        """Group compatible requests, each group in forwards of at most forward_tokens; a failing group fails
        only its requests."""
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (inp, p, _) in enumerate(items):
            groups.setdefault((inp.shape_key, p), []).append(i)
        for (_, p), idx in groups.items():
            try:
                for i, r in self._forward_group([items[i] for i in idx], p).items():
                    results[idx[i]] = r
            except Exception as e:  # noqa: BLE001 - reported to each caller, the replica keeps serving
                log.exception("encoder forward failed")
                for i in idx:
                    results[i] = e
        return results

    def _forward_group(self, group: list[tuple[EmbedInput, int, Ticket]], p: int) -> dict[int, object]:
        """Requests of one shape: their samples in runs of k = forward_tokens // tokens per sample, each
        run's dropped requests left out -> {index in group: (patches, pooled, requests in group) | Dropped}."""
        k = max(1, self.cfg.forward_tokens // group[0][0].tokens_per_sample(p))
        order = [(i, j) for i, (inp, _, _) in enumerate(group) for j in range(inp.batch)]
        parts: dict[int, list] = {i: [] for i in range(len(group))}
        for s in range(0, len(order), k):
            run = [(i, j) for i, j in order[s : s + k] if group[i][2].live()]
            if not run:
                continue
            mods = group[run[0][0]][0].x
            x = {m: np.stack([group[i][0].x[m][j] for i, j in run]) for m in mods}
            months = np.stack([group[i][0].months[j] for i, j in run])
            patches, pooled = self.embedder.embed(x, months, p)
            for r, (i, _) in enumerate(run):
                parts[i].append((patches[r], pooled[r]))
        out = {}
        for i, (inp, _, _) in enumerate(group):
            if len(parts[i]) < inp.batch:
                out[i] = Dropped()
            else:
                out[i] = (np.stack([a for a, _ in parts[i]]), np.stack([b for _, b in parts[i]]), len(group))
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=2)
    async def embed_batch(self, items: list[tuple[EmbedInput, int, Ticket]]) -> list:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._forward, items)

    # ---- routes ------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token_digest(value.strip()), self.token)):
            raise BadRequest("Authorization", "missing or wrong bearer token", status=401)

    @api.get("/info")
    def info(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except BadRequest as e:
            return error(e)
        out = self.embedder.describe()
        c = self.cfg
        out["limits"] = {"max_tile": c.max_tile, "max_samples": c.max_samples, "patch_size": [1, 8],
                         "default_patch_size": c.default_patch_size, "max_body_mb": c.max_body_mb,
                         "max_tokens": c.max_tokens, "max_tokens_per_sample": c.max_tokens_per_sample,
                         "max_decoded_mb": c.max_decoded_mb, "max_parts": c.max_parts,
                         "request_timeout_s": c.request_timeout_s}  # fmt: skip
        out["batching"] = {"max_batch_size": c.max_batch_size, "batch_wait_timeout_s": c.batch_wait_timeout_s,
                           "forward_tokens": c.forward_tokens}  # fmt: skip
        return JSONResponse(out)

    @api.post("/embed")
    async def embed(self, request: Request) -> Response:
        ticket = Ticket(time.monotonic() + self.cfg.request_timeout_s)
        try:
            self._authorize(request)
            inp, p, output, fmt = await self._parse(request)
            left = ticket.deadline - time.monotonic()
            result = await asyncio.wait_for(self.embed_batch((inp, p, ticket)), max(left, 0.001))
        except BadRequest as e:
            return error(e)
        except TimeoutError:
            result = Dropped()
        finally:
            # answered, past its deadline or cancelled by Serve because the client has gone (CancelledError):
            # nothing more is computed for it, its samples are left out of the coming forwards
            ticket.cancelled = True
        if isinstance(result, Dropped):
            return JSONResponse({"error": f"not answered within {self.cfg.request_timeout_s:g} s; retry later",
                                 "field": None}, status_code=503)  # fmt: skip
        if isinstance(result, Exception):  # inputs were validated: a failure here is the server's
            return JSONResponse({"error": "internal error while encoding", "field": None}, status_code=500)
        return self._answer(inp, p, output, fmt, result)

    def _answer(self, inp: EmbedInput, p: int, output: str, fmt: str, result: tuple) -> Response:
        patches, pooled, batch_size = result
        headers = {"X-Batch-Size": str(batch_size), "X-Patch-Size": str(p)}
        emb = patches if output == "patches" else pooled
        if fmt == "tif":
            from serve.mapping.geo import write_geotiff_bytes

            g = inp.georef
            a, b, c, d, e, f = g.transform
            transform = (a * p, b * p, c, d * p, e * p, f)  # same origin, pixels p times larger
            tags = {"patch_size": p, "model_size": self.embedder.info.get("size"), "units": "embedding"}
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
        unknown = sorted(set(q) - QUERY)
        if unknown:
            raise BadRequest(unknown[0][:40], f"unknown query parameter; known: {', '.join(sorted(QUERY))}")
        p = parse_patch_size(q.get("patch_size"), self.cfg.default_patch_size)
        output = q.get("output", "patches")
        if output not in ("patches", "pooled"):
            raise BadRequest("output", f"must be 'patches' or 'pooled', got {output[:40]!r}")
        ctype = request.headers.get("content-type", "")
        base = ctype.split(";")[0].strip().lower()
        if not (base == "multipart/form-data" or base in NPZ_TYPES or base in TIFF_TYPES):
            raise BadRequest("Content-Type", f"unsupported {base[:60]!r}; send multipart/form-data (GeoTIFF per "
                                             "modality), application/x-npz or image/tiff", status=415)  # fmt: skip
        c = self.cfg
        body = await read_body(request, int(c.max_body_mb * 2**20), c.body_timeout_s, c.body_idle_s)
        if not body:
            raise BadRequest("body", "empty request body")
        inp = await asyncio.to_thread(self._decode, base, ctype, body, dict(q), p)
        fmt = q.get("format") or ("tif" if inp.georef is not None and output == "patches" else "npy")
        if fmt not in ("npy", "npz", "tif"):
            raise BadRequest("format", f"must be npy, npz or tif, got {fmt[:40]!r}")
        if fmt == "tif" and (inp.georef is None or output != "patches"):
            raise BadRequest("format", "tif output needs GeoTIFF input and output=patches")
        return inp, p, output, fmt

    def _decode(self, base: str, ctype: str, body: bytes, q: dict, p: int) -> EmbedInput:
        """The body -> validated model input, in a worker thread (never on the event loop)."""
        try:
            if base == "multipart/form-data":
                files, fields = parse_multipart(body, ctype, self.cfg.max_parts)
                months = fields.pop("months", None) or q.get("months")
                for k in fields:
                    raise BadRequest(k[:40], "unexpected text field (send GeoTIFFs as file parts)")
                return parse_geotiffs(files, p, self.limits, months)
            if base in TIFF_TYPES:
                modality = q.get("modality")
                if not modality:
                    raise BadRequest("modality", "required with a single image/tiff body (e.g. ?modality=sentinel2_l2a)")
                return parse_geotiffs({modality: body}, p, self.limits, q.get("months"))
            return parse_npz(body, p, self.limits, q.get("months"))
        except BadRequest:
            raise
        except Exception:  # a parser failing on hostile input: the input's fault, told without internals
            log.warning("undecodable request body", exc_info=True)
            raise BadRequest("body", "could not be decoded") from None


@serve.deployment(name="OlmoEarthHealth", num_replicas=1, max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0})  # fmt: skip
class HealthDeployment:
    """GET <prefix>healthz, a deployment of its own: its slots are not the encoder's, so slow uploads or long
    forwards that hold every encoder slot do not make it time out. The encoder replicas' own liveness is
    Serve's replica health check (the controller restarts a replica that fails it)."""

    def __init__(self, app_name: str = "olmoearth"):
        self.app, self.started = app_name, time.time()

    async def __call__(self, request: Request) -> dict:
        return {"status": "ok", "application": self.app, "uptime_s": round(time.time() - self.started, 1)}


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


def health_prefix(route_prefix: str) -> str:
    return route_prefix.rstrip("/") + "/healthz"


def app_builder(args: dict):
    """Entry for `serve run serve.app:app_builder` / a Serve config YAML (configs/serve.yaml): args are
    ServeConfig fields."""
    from pipelines.common.config import from_dict

    return build_app(from_dict(ServeConfig, dict(args or {})))


def health_builder(args: dict | None = None):
    """Entry of the health application (configs/serve.yaml deploys it at <route_prefix>healthz); args:
    `app_name`, the encoder application it reports on."""
    return HealthDeployment.bind(**dict(args or {}))


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve on cfg.host:cfg.port and deploy the application and its health route; returns the
    encoder's handle. The driver's OLMOEARTH_SERVE_TOKEN reaches the replicas inside the config."""
    if not cfg.auth_token and os.environ.get(TOKEN_ENV):
        cfg = replace(cfg, auth_token=os.environ[TOKEN_ENV])
    # the proxy's own limit: a request it still holds after the replica's deadline is dropped there too
    from pipelines.common.logs import serve_logging_config

    logs = serve_logging_config()  # no access-log line per request unless OLMOEARTH_VERBOSE=1
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 30},
                logging_config=logs)  # fmt: skip
    serve.run(health_builder(), name=f"{cfg.name}-health", route_prefix=health_prefix(cfg.route_prefix),
              logging_config=logs)  # fmt: skip
    return serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=blocking,
                     logging_config=logs)  # fmt: skip
