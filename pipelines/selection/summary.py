"""What the selection writes besides the cells: the per-category table (summary.csv and a printed copy), the
PNG map of the drawn cells over the extract's extent (cells.png), and report.json accounting for the input.

summary.csv: category, candidates, drawn; one line per category of the table, in its order, so a category
without candidates is listed with 0 (report.json also lists them under `empty_categories`)."""

from __future__ import annotations

import io
import math

from pipelines.common.storage import Storage


def summary_csv(candidates: dict, drawn: dict) -> str:
    lines = ["category,candidates,drawn"] + [f"{name},{candidates[name]},{drawn[name]}" for name in candidates]
    return "\n".join(lines) + "\n"


def summary_text(candidates: dict, drawn: dict) -> str:
    """The table as printed: categories with candidates first (most first), then the empty ones on one line."""
    width = max([len(n) for n in candidates] + [8])
    rows = sorted((n for n in candidates if candidates[n]), key=lambda n: (-candidates[n], n))
    out = [f"{'category':<{width}}  candidates  drawn"]
    out += [f"{n:<{width}}  {candidates[n]:>10}  {drawn[n]:>5}" for n in rows]
    empty = [n for n in candidates if not candidates[n]]
    if empty:
        out.append(f"no candidates ({len(empty)}): {', '.join(empty)}")
    return "\n".join(out)


def extract_extent(pbf_header: bytes) -> tuple[float, float, float, float] | None:
    """The extract's bounding box (lon/lat) from its OSMHeader blob, or None where the file has none."""
    import osmium

    reader = osmium.io.Reader(osmium.io.FileBuffer(pbf_header, "pbf"))
    try:
        box = reader.header().box()
        if not box.valid():
            return None
        return box.bottom_left.lon, box.bottom_left.lat, box.top_right.lon, box.top_right.lat
    finally:
        reader.close()


def cells_png(cells, extent, title: str) -> bytes:
    """The drawn cells (a GeoDataFrame in lon/lat), coloured by how many categories drew each, over the
    extract's extent (dashed) when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    if len(cells):
        n = cells["categories"].map(len)
        cells.assign(n=n).plot(  # a fixed 0..max scale: one cell, or all alike, still reads right
            ax=ax, column="n", cmap="viridis", vmin=0, vmax=max(int(n.max()), 1), edgecolor="black", linewidth=0.3,
            legend=True,
            legend_kwds={"label": "categories per cell", "shrink": 0.6})
    if extent is not None:
        x0, y0, x1, y1 = extent
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], "r--", linewidth=1, label="extract extent")
        ax.legend(loc="upper right")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title)
    y0, y1 = ax.get_ylim()
    ax.set_aspect(1.0 / max(math.cos(math.radians((y0 + y1) / 2)), 0.05), adjustable="datalim")  # metres square
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_cells(cells, uri: str, storage: Storage) -> None:
    """cells.parquet as GeoParquet (geopandas), written atomically through Storage."""
    buf = io.BytesIO()
    cells.to_parquet(buf, index=False)
    storage.write_bytes(uri, buf.getvalue())
