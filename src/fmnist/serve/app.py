"""The web application: JSON API, the page, limits. Build it with :func:`create_app`.

Request path of ``POST /api/predict``: the body-size middleware counts bytes as they arrive (413 past the
limit); the route checks the content type (415) and takes an in-flight slot (503 + Retry-After when all are
taken) *before* FastAPI parses the multipart body; decoding and inference then run off the event loop on
``threads`` worker threads, each running PyTorch single-threaded, and requests that arrive while the workers
are busy are served together by one model call (:mod:`fmnist.serve.batching`).
"""
import functools
import gc
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import torch
from fastapi import APIRouter, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

import fmnist
from fmnist.images import MAX_PIXELS
from fmnist.serve.batching import Batcher
from fmnist.serve.inference import UploadError, jsonable, single_threaded_compute
from fmnist.serve.limits import BodySizeLimit, Gate
from fmnist.serve.texts import GENERIC_REASON, REASON_TEXTS, class_info

log = logging.getLogger("fmnist.serve")

STATIC_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; the policy makes the browser enforce it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Settings:
    run_dir: Path
    max_body: int
    max_pixels: int
    max_concurrency: int
    threshold: float | None
    ood_threshold: float | None
    threads: int
    max_batch: int
    backend: str = "auto"


# --- response schemas (for the OpenAPI page; responses are not re-validated, to keep requests cheap) ------

class TopK(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")  # later keys (e.g. "ood_score") pass through
    label: str
    class_id: int
    score: float
    accepted: bool
    reason: str | None
    top_k: list[TopK]
    input_png: str


class Error(BaseModel):
    detail: str


ERRORS = {
    400: {"model": Error, "description": "undecodable or unsupported image, or a malformed multipart body"},
    413: {"model": Error, "description": "body over the size limit, image over the pixel limit, or too many "
                                         "files"},
    415: {"model": Error, "description": "the request is not multipart/form-data"},
    422: {"model": Error, "description": "the 'file' field is missing"},
    503: {"model": Error, "description": "too many predictions in progress; retry after Retry-After seconds"},
}


def create_app(run_dir, *, max_body: int = 8_000_000, max_pixels: int = MAX_PIXELS, max_concurrency: int = 32,
               threshold: float | None = None, ood_threshold: float | None = None, threads: int = 1,
               max_batch: int = 32, backend: str = "auto") -> FastAPI:
    """The application serving the model of ``run_dir`` (loaded at start-up, in the lifespan).

    ``max_body``: bytes per request body; ``max_pixels``: width*height per image, checked before decoding;
    ``max_concurrency``: predict requests in flight before 503; ``threshold``: confidence under which
    answers are refused (None: the run's own); ``ood_threshold``: out-of-distribution score above which
    images are refused, for runs with a detector (None: the run's own); ``threads``: inference worker threads;
    ``max_batch``: images per batch request.
    """
    checks = [(max_body > 0, "max_body must be > 0"), (max_pixels > 0, "max_pixels must be > 0"),
              (max_concurrency >= 1, "max_concurrency must be >= 1"), (threads >= 1, "threads must be >= 1"),
              (max_batch >= 1, "max_batch must be >= 1"),
              (threshold is None or 0.0 <= threshold <= 1.0, "threshold must be between 0 and 1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    settings = Settings(Path(run_dir), int(max_body), int(max_pixels), int(max_concurrency), threshold,
                        ood_threshold, int(threads), int(max_batch), backend)

    app = FastAPI(title="fmnist", version=fmnist.__version__, lifespan=_lifespan,
                  description="Classify garment images into the 10 Fashion-MNIST classes. Answers under the "
                              "confidence threshold, and blank images, are refused (`accepted: false`) but "
                              "still carry the best guess.")
    app.state.settings = settings
    app.state.gate = Gate(settings.max_concurrency)
    app.add_middleware(BodySizeLimit, max_body=settings.max_body)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(_predict_router())
    app.include_router(_info_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    s: Settings = app.state.settings
    from fmnist.predict import Predictor

    # Bounded threads: `threads` workers, each running PyTorch and NumPy on one thread.
    single_threaded_compute()
    torch.set_flush_denormal(True)  # denormal floats can slow CPU kernels many times over
    # Starlette's own blocking work (static files, large uploads spooled to disk) uses anyio's default
    # pool of 40 threads; a few are plenty here.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 8
    extra = {} if s.ood_threshold is None else {"ood_threshold": s.ood_threshold}
    # BatchNorm folded into the convolutions: the same function with fewer layers (about a quarter less time).
    # One intra-op thread per inference worker, no spinning (ONNX Runtime): the cores are shared with the event loop.
    load = functools.partial(Predictor.from_run, s.run_dir, backend=s.backend, fold_bn=True, threads=1,
                             confidence_threshold=s.threshold, **extra)
    predictor = await anyio.to_thread.run_sync(load)
    await anyio.to_thread.run_sync(_warm_up, predictor)  # first calls allocate; keep that off requests
    # Everything allocated so far (PyTorch, the model, FastAPI) lives as long as the server: move it out of the
    # garbage collector's reach, so that its full collections no longer walk it in the middle of requests.
    gc.collect()
    gc.freeze()
    app.state.predictor = predictor
    app.state.batcher = Batcher(predictor, s.max_pixels, workers=s.threads, max_images=max(64, s.max_batch))
    app.state.model_info = json.dumps(jsonable(_model_info(predictor, s))).encode()
    log.info("serving %s (%s, %d BatchNorm layers folded), threshold %.2f, %d worker thread(s)", s.run_dir,
             predictor.run.model_name, predictor.backend.folded, predictor.confidence_threshold, s.threads)
    yield


def _warm_up(predictor) -> None:
    import numpy as np

    with torch.inference_mode():
        predictor.predict_batch([np.zeros((28, 28), np.uint8)])


def _model_info(predictor, s: Settings) -> dict:
    info = predictor.info()
    info.update(
        name=s.run_dir.resolve().name,
        classes=class_info(predictor.class_names),
        reasons=REASON_TEXTS,
        generic_reason=GENERIC_REASON,
        limits={"max_body_bytes": s.max_body, "max_pixels": s.max_pixels, "max_batch": s.max_batch,
                "max_concurrency": s.max_concurrency, "threads": s.threads},
    )
    return info


# --- prediction routes -------------------------------------------------------------------------------------

class _PredictRoute(APIRoute):
    """Checks the content type and takes an in-flight slot *before* FastAPI reads the body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() != "multipart/form-data":
                shown = repr(ctype[:80]) if ctype else "none"
                raise HTTPException(415, f"unsupported content type ({shown}): send the image as "
                                         "multipart/form-data in a field named 'file'")
            gate: Gate = request.app.state.gate
            gate.enter()
            try:
                return await handler(request)
            finally:
                gate.leave()

        return guarded


IMAGE_FIELD = "an image: PNG, JPEG, BMP, GIF, WebP or TIFF (first frame of animations)"


def _predict_router() -> APIRouter:
    router = APIRouter(prefix="/api", route_class=_PredictRoute, tags=["predict"])

    @router.post("/predict", response_model=None, responses={200: {"model": Prediction}, **ERRORS},
                 summary="Classify one image")
    async def predict(request: Request, file: Annotated[UploadFile, File(description=IMAGE_FIELD)]) -> Response:
        """The best guess (`label`, `score`), whether it is `accepted` and, if not, the `reason`; the top
        classes; and `input_png`, the 28x28 image the model saw (base64 PNG)."""
        results = await _classify(request.app, [file])
        return _json(results[0])

    @router.post("/predict/batch", response_model=None, responses={200: {"model": list[Prediction]}, **ERRORS},
                 summary="Classify several images")
    async def predict_batch(request: Request,
                            file: Annotated[list[UploadFile], File(description=IMAGE_FIELD + "; repeat the "
                                                                               "field once per image")]
                            ) -> Response:
        """One result per `file` field, in order. One bad image fails the whole request (the message names
        it)."""
        limit = request.app.state.settings.max_batch
        if len(file) > limit:
            raise HTTPException(413, f"too many images: {len(file)} (the limit is {limit} per request)")
        return _json(await _classify(request.app, file))

    return router


async def _classify(app: FastAPI, files: list[UploadFile]) -> list[dict]:
    uploads = [((f.filename or "upload")[:100], await f.read()) for f in files]
    try:
        return await app.state.batcher.submit(uploads)
    except UploadError as e:
        raise HTTPException(e.status, e.detail) from None


def _json(data) -> Response:
    # json.dumps directly: FastAPI's generic encoder costs more than the model on small results.
    return Response(json.dumps(data, allow_nan=False), media_type="application/json")


# --- information routes and the page ------------------------------------------------------------------------

def _info_router() -> APIRouter:
    router = APIRouter()

    @router.get("/api/health", tags=["info"], summary="Liveness check", responses={200: {"content": {
        "application/json": {"example": {"status": "ok"}}}}})
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/api/model", tags=["info"], summary="The model served", response_model=None)
    async def model(request: Request) -> Response:
        """Name, architecture, parameters, validation and test metrics, thresholds, classes with
        descriptions, refusal reasons in words, and the server's limits."""
        return Response(request.app.state.model_info, media_type="application/json")

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    return router


# --- errors: always JSON {"detail": "..."} -----------------------------------------------------------------

async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts, missing_file = [], False
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        missing_file |= loc[:1] == ["file"] and err.get("type") == "missing"
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid value')}")
    detail = "invalid request: " + "; ".join(parts)
    if missing_file:
        detail += " (send the image as multipart/form-data in a field named 'file')"
    return JSONResponse({"detail": detail}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)
