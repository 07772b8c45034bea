"""``causalimg explore``: a local page to move one slider per structure and region and watch x~ change.

The standard library's ``http.server`` serves one self-contained page (``page.html``: no external
scripts, styles or fonts, so it works without internet) and a small JSON API over a
``CounterfactualModel``:

  GET  /                      the page
  GET  /api/info              model, variables with their supports, the images on offer
  POST /api/counterfactual    {"image": i, "do": {variable: value}, "scale": s} -> pictures (PNG data
                              URLs) of x, x~ and x~ - x (regions dashed, +-s on the 0-255 scale), pa~,
                              and the evaluation segmentor's areas on x and x~

Each image is abducted once (its exogenous state is kept); a slider move is one prediction and one
segmentation. Requests are served one at a time (the model is shared).
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from causalimg.api.images import Reader, find_inputs
from causalimg.api.model import CounterfactualModel, Factual
from causalimg.api.pictures import png_bytes, rgb_difference, rgb_grey, to_255
from causalimg.errors import CausalImgError, ConfigError

MAX_BODY = 64 * 1024  # bytes of one request
PAGE_WIDTH = 768  # pixels the pictures are scaled up to (at least)


@dataclass
class Offered:
    """An image on offer: from a file (masks when it has them) or the run's data (its parents)."""

    label: str
    image: torch.Tensor  # (H, W)
    masks: torch.Tensor | None
    parents: torch.Tensor | None
    regions: torch.Tensor  # (1, K, H, W)


def run_images(model: CounterfactualModel, limit: int) -> list[Offered]:
    """The first ``limit`` test images of the run's own data."""
    from causalimg.core.data import split_size

    data = model.data_source().split("test")
    return [
        Offered(f"test #{i}", item["image"][0], item["masks"], item["parents"], item["regions"][None])
        for i in range(min(limit, split_size(data)))
        for item in (data[i],)
    ]


def folder_images(model: CounterfactualModel, folder: str, limit: int) -> list[Offered]:
    reader = Reader(model.schema, model.image_shape, model.inputs)
    offered = []
    for path in find_inputs(folder)[:limit]:
        f = reader.read(path)
        offered.append(Offered(path.name, f.image, f.masks, None, model.regions([{**f.metadata, "source": str(path)}])))
    return offered


class Explorer:
    """The page's model side: one abduction per image, then a prediction per request."""

    def __init__(self, model: CounterfactualModel, images: Sequence[Offered]):
        if not images:
            raise ConfigError("no images to explore")
        self.model, self.images = model, list(images)
        self.factor = max(1, math.ceil(PAGE_WIDTH / model.image_shape[1]))
        self._factual: dict[int, Factual] = {}
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        schema, support = self.model.schema, self.model.support
        variables = []
        for v in schema.variables:
            low, high = support[v.name]
            variables.append(
                {
                    "name": v.name,
                    "display": schema.display(v.name),
                    "title": v.title,
                    "unit": v.unit,
                    "structure": v.structure,
                    "region": v.region,
                    "low": low,
                    "high": high,
                }
            )
        return {
            "model": str(self.model.files.root),
            "strategy": self.model.strategy,
            "image_shape": list(self.model.image_shape),
            "regions": list(schema.regions),
            "structures": [{"name": s.name, "title": s.title or s.name, "short": s.short} for s in schema.structures],
            "variables": variables,
            "images": [image.label for image in self.images],
        }

    def factual(self, index: int) -> Factual:
        if index not in self._factual:
            offered = self.images[index]
            self._factual[index] = self.model.factual(
                offered.image[None],
                parents=None if offered.parents is None else offered.parents[None],
                masks=None if offered.masks is None else offered.masks[None],
                regions=offered.regions,
            )
        return self._factual[index]

    def counterfactual(self, index: int, do: dict[str, float], scale: float) -> dict[str, Any]:
        """Pictures and numbers of image ``index`` under ``do`` (empty: the factual parents)."""
        if not 0 <= index < len(self.images):
            raise ConfigError(f"image {index} is not on offer (0..{len(self.images) - 1})")
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"scale {scale!r} must be a positive number")
        with self.lock:
            factual = self.factual(index)
            names = self.model.names
            wanted = do or {
                names[0]: float(factual.parents[0, 0])
            }  # no change asked: predict under the factual parents
            result = self.model.counterfactual(factual, wanted)
        diff = to_255(result.images[0]) - to_255(result.factual_images[0])
        regions = result.regions[0]
        areas = self.model.schema.area_names
        return {
            "image": index,
            "factual": _data_url(rgb_grey(result.factual_images[0], self.factor)),
            "counterfactual": _data_url(rgb_grey(result.images[0], self.factor)),
            "difference": _data_url(rgb_difference(diff, regions, scale, self.factor)),
            "max_difference": float(abs(diff).max()),
            "factual_parents": dict(zip(names, result.factual_parents[0].tolist())),
            "parents": dict(zip(names, result.parents[0].tolist())),
            "measured_factual": dict(zip(areas, result.measured_factual[0].tolist())),
            "measured": dict(zip(areas, result.measured[0].tolist())),
            "parents_source": result.parents_source,
        }


def _data_url(rgb: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()


def page() -> bytes:
    return (importlib.resources.files("causalimg.explore") / "page.html").read_bytes()


def make_handler(explorer: Explorer) -> type[BaseHTTPRequestHandler]:
    html = page()

    class Handler(BaseHTTPRequestHandler):
        server_version = "causalimg-explore"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the terminal shows the URL, not every slider move

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, value: Any) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, html, "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self._json(HTTPStatus.OK, explorer.info())
            elif self.path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/api/counterfactual":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ConfigError(f"request body of {length} bytes (at most {MAX_BODY})")
                request = json.loads(self.rfile.read(length))
                do = {str(k): float(v) for k, v in dict(request.get("do", {})).items()}
                answer = explorer.counterfactual(int(request["image"]), do, float(request.get("scale", 32)))
            except CausalImgError as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
            except (ValueError, TypeError, KeyError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"malformed request: {type(err).__name__}: {err}"})
                return
            self._json(HTTPStatus.OK, answer)

    return Handler


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: a free one); call ``serve_forever`` on it."""
    try:
        return ThreadingHTTPServer((host, port), make_handler(explorer))
    except OSError as err:
        raise ConfigError(f"cannot serve on {host}:{port}: {err.strerror or err}; choose another --port") from None


def explore_command(
    run: str,
    strategy: str | None,
    images: str | None,
    limit: int,
    host: str,
    port: int,
    *,
    device: str,
    check_versions: bool,
) -> int:
    model = CounterfactualModel.from_pretrained(run, strategy, device, check_versions=check_versions)
    offered = folder_images(model, images, limit) if images is not None else run_images(model, limit)
    server = serve(Explorer(model, offered), host, port)
    bound_host, bound_port = server.server_address[:2]
    bound_host = bound_host.decode() if isinstance(bound_host, bytes) else bound_host
    print(
        f"causalimg explore: {model.strategy} of {Path(run)} on http://{bound_host}:{bound_port}/ (Ctrl-C ends)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
