"""The online endpoint: a Ray Serve application with one model deployment (an encoder, or a fine-tuned model)
behind FastAPI.

    POST /embed?patch_size=4&output=patches|pooled&format=npy|npz|tif
        body .npz (Content-Type application/x-npz or application/octet-stream): arrays named by modality,
             (B, H, W, T, C) raw units, NaN missing, plus optional `months` (B, T) or (T,)
        body multipart/form-data: one multi-band GeoTIFF per modality (field name = modality, T*C bands
             time-major), optional text field `months` ("0,1,2"); the answer may be a GeoTIFF on the same grid
        body image/tiff with ?modality=NAME: one GeoTIFF
      -> .npy (default for arrays), .npz {"embeddings"}, or GeoTIFF (default for GeoTIFF input with
         output=patches) with one band per embedding dimension, the input's CRS, and pixels of p x 10 m.
      Header X-Batch-Size: how many requests shared the encoder forward that answered this one. With the request
      header X-Timing: 1 the answer carries Server-Timing: ms spent reading the body, decoding, queued (batch
      window included), in the forward, encoding the answer, and in the replica in all.
    POST /predict?output=class|probs|labels|value&format=npy|npz|tif  (a fine-tuned model file only)
        the same bodies -> the fine-tuned model's class ids, probabilities, labels or values
        (serve/predictions.py); /embed keeps embedding with the same file's encoder
    GET /info (model size, modalities and bands, embedding dim, limits; the task of a fine-tuned model)
    GET /healthz[?ready=1]: liveness, or readiness (200 only once a model replica is loaded), from a deployment
        of its own (serve/health.py), so that it answers whatever the model's load

Requests go through `@serve.batch`: those of equal shape (modalities, H, W, T) and patch size within one
batch window are concatenated and run in forwards of at most `forward_tokens` tokens, each forward of samples
with one visible-token count, so no forward pads and an answer has the same bytes whatever shared its forward.
Batch clients inside the cluster may skip HTTP: the handle method `embed_arrays` takes numpy arrays. Bad requests get a
4xx JSON {"error", "field"}. Hostile input is bounded before it costs anything: the body is read as a
stream under a size limit and two timeouts, every declared size (zip members, .npy headers, GeoTIFF
headers, the encoder tokens) is checked before decoding, decoding runs off the event loop, and a request
whose client left or whose deadline passed is dropped between forwards. Optional bearer-token auth.
"""

import asyncio
import hashlib
import hmac
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve.health import health_builder, health_prefix  # noqa: F401 - configs/serve.yaml: serve.app:health_builder
from serve.inputs import (
    NPZ_TYPES,
    TIFF_TYPES,
    BadRequest,
    EmbedInput,
    Limits,
    parse_geotiffs,
    parse_multipart,  # noqa: F401 - where the tests (and users) found it before
    parse_npz,
    parse_patch_size,
    read_body,
)

log = logging.getLogger(__name__)
TOKEN_ENV = "OLMOEARTH_SERVE_TOKEN"  # the bearer token, when the config gives none


@dataclass
class ServeConfig:
    """The endpoint: model, batching, autoscaling, request limits and access."""

    # any source olmoearth.load takes: exported .safetensors, checkpoint folder, random:<size>[:<seed>]; a
    # fine-tuned model file (olmoearth export of a fine-tuning run) also answers /predict
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
    precision: str = "auto"  # encoder precision: auto (bf16 on GPU, fp32 on CPU) | bf16 (autocast) | fp32
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


QUERY = {"patch_size", "output", "format", "months", "modality"}

api = FastAPI(title="OlmoEarth embeddings", version="1")


@dataclass
class Ticket:
    """A request's standing while it waits for the encoder: past its deadline or cancelled (client gone),
    the forward drops its samples."""

    deadline: float  # time.monotonic()
    cancelled: bool = False
    # time.perf_counter() when each stage of the request ended (start, body, decode, forward_start, forward_end,
    # encode): the X-Timing answer header (serve/timing.py)
    marks: dict = field(default_factory=dict)

    def live(self) -> bool:
        return not self.cancelled and time.monotonic() < self.deadline


class Dropped(Exception):  # noqa: N818 - a request's result when its samples were dropped before their forward
    pass


def forward_runs(order: list[tuple[int, int]], visible: list, k: int) -> list[list[tuple[int, int]]]:
    """Cut the samples (request i, sample j) of one shape into forwards of at most k samples, each of one
    visible-token count (visible[i][j]; None: not counted, all alike): a forward then never pads, and the
    encoder's path (no key mask) and bytes are those of each sample alone. Equal counts stay in arrival order."""
    def count(ij):
        v = visible[ij[0]]
        return -1 if v is None else int(v[ij[1]])

    runs: list[list[tuple[int, int]]] = []
    for ij in sorted(order, key=count):  # stable
        if not runs or len(runs[-1]) == k or count(runs[-1][0]) != count(ij):
            runs.append([])
        runs[-1].append(ij)
    return runs


def error(e: BadRequest) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


TIMING_STAGES = (("body", "start", "body"), ("decode", "body", "decode"), ("queue", "decode", "forward_start"),
                 ("forward", "forward_start", "forward_end"), ("encode", "forward_end", "encode"),
                 ("replica", "start", "encode"))  # fmt: skip


def server_timing(marks: dict) -> str:
    """Stage marks (perf_counter seconds) -> a Server-Timing header value, ms per stage that ran:
    "body;dur=0.41, decode;dur=1.20, queue;dur=9.8, forward;dur=20.1, encode;dur=0.3, replica;dur=31.8";
    queue includes the batch window, forward the whole batch's forward(s) this request was part of."""
    return ", ".join(f"{name};dur={(marks[b] - marks[a]) * 1000:.3f}" for name, a, b in TIMING_STAGES
                     if a in marks and b in marks)  # fmt: skip


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
        self.embedder = Embedder(cfg.model_uri, device=device, num_threads=cfg.torch_threads or None,
                                 precision=cfg.precision)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="forward")  # two batches take turns per forward
        self.embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    # ---- batched forward ---------------------------------------------------------------------------------

    def _forward(self, items: list[tuple[EmbedInput, int, Ticket, str]]) -> list:
        """Group compatible requests (same shape, patch size and route), each group in forwards of at most
        forward_tokens; a failing group fails only its requests."""
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (inp, p, _, route) in enumerate(items):
            groups.setdefault((inp.shape_key, p, route), []).append(i)
        for (_, p, route), idx in groups.items():
            try:
                for i, r in self._forward_group([items[i] for i in idx], p, route).items():
                    results[idx[i]] = r
            except Exception as e:  # noqa: BLE001 - reported to each caller, the replica keeps serving
                log.exception("encoder forward failed")
                for i in idx:
                    results[i] = e
        return results

    def _forward_group(self, group: list[tuple[EmbedInput, int, Ticket, str]], p: int, route: str) -> dict[int, object]:
        """Requests of one shape: their samples in runs of k = forward_tokens // tokens per sample, each
        run's dropped requests left out -> {index in group: ({name: (B, ...) array}, requests in group) |
        Dropped}; names: patches, pooled (/embed) or the task's outputs (/predict)."""
        k = max(1, self.cfg.forward_tokens // group[0][0].tokens_per_sample(p))
        order = [(i, j) for i, (inp, *_) in enumerate(group) for j in range(inp.batch)]
        parts: dict[int, dict[int, dict]] = {i: {} for i in range(len(group))}  # request -> sample -> result
        for run in forward_runs(order, [inp.visible for inp, *_ in group], k):
            run = [(i, j) for i, j in run if group[i][2].live()]
            if not run:
                continue
            t_run = time.perf_counter()
            for i, _ in run:
                group[i][2].marks.setdefault("forward_start", t_run)
            mods = group[run[0][0]][0].x
            x = {m: np.stack([group[i][0].x[m][j] for i, j in run]) for m in mods}
            months = np.stack([group[i][0].months[j] for i, j in run])
            if route == "predict":
                res = self.embedder.predict(x, months)
            else:
                res = dict(zip(("patches", "pooled"), self.embedder.embed(x, months, p), strict=True))
            t_done = time.perf_counter()
            for r, (i, j) in enumerate(run):
                parts[i][j] = {name: a[r] for name, a in res.items()}
                group[i][2].marks["forward_end"] = t_done
        out = {}
        for i, (inp, *_) in enumerate(group):
            if len(parts[i]) < inp.batch:
                out[i] = Dropped()
            else:
                got = [parts[i][j] for j in range(inp.batch)]
                out[i] = ({name: np.stack([d[name] for d in got]) for name in got[0]}, len(group))
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=2)
    async def embed_batch(self, items: list[tuple[EmbedInput, int, Ticket, str]]) -> list:
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
        return await self._handle(request, "embed")

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        """A fine-tuned model's class ids / probabilities / values (serve/predictions.py)."""
        return await self._handle(request, "predict")

    async def embed_arrays(self, x: dict, months=None, patch_size: int | None = None,
                           output: str = "patches") -> np.ndarray:
        """The handle ingress, for batch clients inside the cluster (a Ray job, the area job): no HTTP, no
        body to encode or decode, the same validation and batching as /embed, so the same values:
            serve.get_app_handle(name).embed_arrays.remote({"sentinel2_l2a": x}, months, 4).result()
        x {m: (B, H, W, T, C)} raw units, NaN missing; months (B, T) | (T,) | None -> patches (B, H/p, W/p, D)
        or pooled (B, D). Raises BadRequest (bad input), TimeoutError (past request_timeout_s) or RuntimeError.
        Needs no token: a caller that reaches the handle is already inside the cluster."""
        from serve.inputs import validate

        ticket = Ticket(time.monotonic() + self.cfg.request_timeout_s)
        p = parse_patch_size(patch_size, self.cfg.default_patch_size)
        if output not in ("patches", "pooled"):
            raise BadRequest("output", f"must be 'patches' or 'pooled', got {str(output)[:40]!r}")
        if not isinstance(x, dict) or not all(isinstance(a, np.ndarray) for a in x.values()):
            raise BadRequest("x", "must be a dict {modality: numpy array (B, H, W, T, C)}")
        xs, mo = await asyncio.to_thread(validate, x, months, p, self.limits)
        inp = EmbedInput(xs, mo, fields=sorted(xs)).with_visible(p)
        try:
            result = await asyncio.wait_for(self.embed_batch((inp, p, ticket, "embed")), self.cfg.request_timeout_s)
        except TimeoutError:
            result = Dropped()
        finally:
            ticket.cancelled = True
        if isinstance(result, Dropped):
            raise TimeoutError(f"not answered within {self.cfg.request_timeout_s:g} s")
        if isinstance(result, Exception):
            raise RuntimeError("internal error while encoding") from result
        return result[0][output]

    def check_health(self) -> None:
        """Serve's periodic replica health check (a failing replica is restarted; /healthz reports it)."""
        if self.embedder is None or self.embedder.encoder is None:
            raise RuntimeError("model not loaded")

    async def _handle(self, request: Request, route: str) -> Response:
        """The request's answer; with the request header `X-Timing: 1` it carries `Server-Timing` (where the
        replica's time went: body, decode, queue, forward, encode; bench/serve.py splits latency with it)."""
        ticket = Ticket(time.monotonic() + self.cfg.request_timeout_s, marks={"start": time.perf_counter()})
        response = await self._respond(request, route, ticket)
        if request.headers.get("x-timing"):
            ticket.marks["encode"] = time.perf_counter()
            response.headers["Server-Timing"] = server_timing(ticket.marks)
        return response

    async def _respond(self, request: Request, route: str, ticket: Ticket) -> Response:
        try:
            self._authorize(request)
            if route == "predict" and self.embedder.task is None:
                raise BadRequest("route", "this endpoint serves an encoder: /predict needs a fine-tuned model "
                                          "file (olmoearth export of a fine-tuning run)", status=404)  # fmt: skip
            inp, p, output, fmt = await self._parse(request, route, ticket.marks)
            left = ticket.deadline - time.monotonic()
            result = await asyncio.wait_for(self.embed_batch((inp, p, ticket, route)), max(left, 0.001))
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
        if route == "predict":
            from serve.predictions import answer

            return answer(self.embedder.task, inp, output, fmt, *result)
        return self._answer(inp, p, output, fmt, result)

    def _answer(self, inp: EmbedInput, p: int, output: str, fmt: str, result: tuple) -> Response:
        arrays, batch_size = result
        patches = arrays["patches"]
        headers = {"X-Batch-Size": str(batch_size), "X-Patch-Size": str(p)}
        emb = patches if output == "patches" else arrays["pooled"]
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

    async def _parse(self, request: Request, route: str, marks: dict) -> tuple[EmbedInput, int, str, str]:
        """-> (validated input, patch size, output, format); the query first, then the body. `marks` gets the
        times the body was read and decoded."""
        from serve import predictions

        q = request.query_params
        if route == "predict":
            p, output = predictions.parse_query(self.embedder.task, q)
        else:
            p, output = self._embed_query(q)
        ctype = request.headers.get("content-type", "")
        base = ctype.split(";")[0].strip().lower()
        if not (base == "multipart/form-data" or base in NPZ_TYPES or base in TIFF_TYPES):
            raise BadRequest("Content-Type", f"unsupported {base[:60]!r}; send multipart/form-data (GeoTIFF per "
                                             "modality), application/x-npz or image/tiff", status=415)  # fmt: skip
        c = self.cfg
        body = await read_body(request, int(c.max_body_mb * 2**20), c.body_timeout_s, c.body_idle_s)
        if not body:
            raise BadRequest("body", "empty request body")
        marks["body"] = time.perf_counter()
        inp = await asyncio.to_thread(lambda: self._decode(base, ctype, body, dict(q), p).with_visible(p))
        marks["decode"] = time.perf_counter()
        if route == "predict":
            return inp, p, output, predictions.check_input(self.embedder.task, inp, output, q.get("format"))
        fmt = q.get("format") or ("tif" if inp.georef is not None and output == "patches" else "npy")
        if fmt not in ("npy", "npz", "tif"):
            raise BadRequest("format", f"must be npy, npz or tif, got {fmt[:40]!r}")
        if fmt == "tif" and (inp.georef is None or output != "patches"):
            raise BadRequest("format", "tif output needs GeoTIFF input and output=patches")
        return inp, p, output, fmt

    def _embed_query(self, q) -> tuple[int, str]:
        unknown = sorted(set(q) - QUERY)
        if unknown:
            raise BadRequest(unknown[0][:40], f"unknown query parameter; known: {', '.join(sorted(QUERY))}")
        p = parse_patch_size(q.get("patch_size"), self.cfg.default_patch_size)
        output = q.get("output", "patches")
        if output not in ("patches", "pooled"):
            raise BadRequest("output", f"must be 'patches' or 'pooled', got {output[:40]!r}")
        return p, output

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
                    raise BadRequest("modality", "required with a single image/tiff body "
                                                 "(e.g. ?modality=sentinel2_l2a)")  # fmt: skip
                return parse_geotiffs({modality: body}, p, self.limits, q.get("months"))
            return parse_npz(body, p, self.limits, q.get("months"))
        except BadRequest:
            raise
        except Exception:  # a parser failing on hostile input: the input's fault, told without internals
            log.warning("undecodable request body", exc_info=True)
            raise BadRequest("body", "could not be decoded") from None


def build_app(cfg: ServeConfig):
    """The bound Serve application for `cfg` (autoscaling, batching and resources applied)."""
    from olmoearth.precision import resolve_precision

    if cfg.max_ongoing_requests < cfg.max_batch_size:
        raise ValueError(f"max_ongoing_requests ({cfg.max_ongoing_requests}) must be >= max_batch_size "
                         f"({cfg.max_batch_size}), else batches never fill")  # fmt: skip
    if not 1 <= cfg.min_replicas <= cfg.max_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {cfg.min_replicas}, {cfg.max_replicas}")
    resolve_precision(cfg.precision, "cpu")  # the field's check, before any replica starts
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
    """Start Serve on cfg.host:cfg.port and deploy the application and its health route; returns the
    encoder's handle. The driver's OLMOEARTH_SERVE_TOKEN reaches the replicas inside the config."""
    if not cfg.auth_token and os.environ.get(TOKEN_ENV):
        cfg = replace(cfg, auth_token=os.environ[TOKEN_ENV])
    # the proxy's own limit: a request it still holds after the replica's deadline is dropped there too
    from pipelines.common.logs import serve_logging_config

    logs = serve_logging_config()  # no access-log line per request unless OLMOEARTH_VERBOSE=1
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 30},
                logging_config=logs)  # fmt: skip
    serve.run(health_builder({"app_name": cfg.name}), name=f"{cfg.name}-health",
              route_prefix=health_prefix(cfg.route_prefix),
              logging_config=logs)  # fmt: skip
    return serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=blocking,
                     logging_config=logs)  # fmt: skip
