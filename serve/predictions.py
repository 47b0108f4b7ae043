"""The /predict route's query, checks and answers (serve/app.py runs it; the body is decoded by serve/inputs.py
exactly as for /embed).

    POST /predict?output=class|probs|labels|value&format=npy|npz|tif[&months=..][&modality=..]
      output   class, probs (classification, segmentation), labels, probs (multilabel), value (regression,
               pixel_regression); default the first
      format   npy: the one array `output` (class / labels int64, -1 without input; probs / value float32, NaN
                    without input): (B,) / (B, K) for scene tasks, (B, H, W) / (B, K, H, W) for per-pixel tasks
               npz: every output of the task, plus `kind` and `class_names`
               tif: per-pixel tasks with GeoTIFF input (the default there): the input's grid, class -> uint8
                    with a colour table (255 nodata, class names in the tags), probs / value -> float32 K bands
      patch_size  the model's own; any other value is refused (400)
"""

from __future__ import annotations

import io
import json

import numpy as np
from fastapi.responses import Response

from serve.embedder import prediction_outputs
from serve.inputs import BadRequest, EmbedInput, parse_patch_size

QUERY = {"patch_size", "output", "format", "months", "modality"}


def parse_query(task, q) -> tuple[int, str]:
    """-> (the model's patch size, output) or a BadRequest naming the parameter."""
    unknown = sorted(set(q) - QUERY)
    if unknown:
        raise BadRequest(unknown[0][:40], f"unknown query parameter; known: {', '.join(sorted(QUERY))}")
    p = parse_patch_size(q.get("patch_size"), task.patch_size)
    if p != task.patch_size:
        raise BadRequest("patch_size", f"the model was fine-tuned with patch_size {task.patch_size}; got {p}")
    outputs = prediction_outputs(task.kind)
    output = q.get("output", outputs[0])
    if output not in outputs:
        raise BadRequest("output", f"a {task.kind} model answers {' or '.join(outputs)}, got {output[:40]!r}")
    return p, output


def check_input(task, inp: EmbedInput, output: str, fmt: str | None) -> str:
    """The decoded input against the model's modalities, and the answer's format -> format."""
    for m in inp.x:
        if m not in task.modalities:
            raise BadRequest(m, f"not an input of this model (it takes {', '.join(task.modalities)})")
    fmt = fmt or ("tif" if inp.georef is not None and task.per_pixel else "npy")
    if fmt not in ("npy", "npz", "tif"):
        raise BadRequest("format", f"must be npy, npz or tif, got {fmt[:40]!r}")
    if fmt == "tif" and (inp.georef is None or not task.per_pixel):
        raise BadRequest("format", "tif output needs GeoTIFF input and a per-pixel task (segmentation, "
                                   "pixel_regression)")  # fmt: skip
    return fmt


def answer(task, inp: EmbedInput, output: str, fmt: str, arrays: dict, batch_size: int) -> Response:
    headers = {"X-Batch-Size": str(batch_size), "X-Task-Kind": task.kind, "X-Output": output}
    buf = io.BytesIO()
    if fmt == "tif":
        return Response(geotiff_answer(task, inp, output, arrays[output][0]), media_type="image/tiff", headers=headers)
    if fmt == "npz":
        np.savez(buf, kind=np.array(task.kind), class_names=np.array(task.class_names), **arrays)
        return Response(buf.getvalue(), media_type="application/x-npz", headers=headers)
    np.save(buf, arrays[output])
    return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)


def geotiff_answer(task, inp: EmbedInput, output: str, a: np.ndarray) -> bytes:
    """One sample's per-pixel output on the input's grid: class (H, W) -> uint8 with a colour table, probs /
    value (K, H, W) -> float32, a band per class / target."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.io import MemoryFile

    from serve.mapping.classmap import NODATA_CLASS, class_colours

    g = inp.georef
    if output == "class":
        data, nodata = np.where(a < 0, NODATA_CLASS, a).astype(np.uint8)[None], NODATA_CLASS
        names = ["class"]
    else:
        data, nodata = a.astype(np.float32), float("nan")
        names = [f"p_{n}" for n in task.class_names] if output == "probs" else list(task.class_names)
    prof = dict(driver="GTiff", width=g.width, height=g.height, count=len(data), dtype=str(data.dtype),
                crs=CRS.from_wkt(g.crs_wkt), transform=Affine(*g.transform[:6]), nodata=nodata,
                compress="deflate")  # fmt: skip
    with MemoryFile() as mem:
        with mem.open(**prof) as ds:
            ds.write(data)
            ds.update_tags(task=task.kind, class_names=json.dumps(list(task.class_names)))
            for i, n in enumerate(names):
                ds.set_band_description(i + 1, n)
            if output == "class":
                colours = class_colours(task.num_outputs)
                ds.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colours)} | {NODATA_CLASS: (0, 0, 0, 0)})
        return bytes(mem.read())
