"""The web application: JSON API, the page, limits. Build it with :func:`create_app`.

Request path of ``POST /api/predict``: the connection's own limits (header size, timeouts: see
:mod:`fmnist.apps.serve.protocol`); the Host allow-list (400); the body-size middleware, which counts bytes as they
arrive (413 past the limit); the route checks the content type (415) and takes an upload slot (503 when all
are taken) while FastAPI receives and parses the multipart body (400 if it never closes); only then, with the
body in, does the request take an in-flight slot (503 + Retry-After when all are taken), so that slow uploads
hold no inference slot. Decoding and inference run off the event loop on ``threads`` worker threads, each
running the model (PyTorch or ONNX Runtime, ``--backend``) on one thread, one upload at a time, and images ready while the workers are busy are served
together by one model call (:mod:`fmnist.apps.serve.batching`). Every error, from any layer, is JSON.
"""
import asyncio
import functools
import gc
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import fmnist
from fmnist.apps.serve.batching import Batcher
from fmnist.apps.serve.inference import UploadError, jsonable, single_threaded_compute
from fmnist.apps.serve.limits import (
    BodySizeLimit,
    BodyWatch,
    ClientGate,
    Gate,
    HostAllowList,
    JsonErrors,
    client_address,
    multipart_boundary,
)
from fmnist.apps.serve.settings import Settings
from fmnist.apps.serve.texts import GENERIC_REASON, REASON_TEXTS, VERDICT_TEXTS, class_info

log = logging.getLogger("fmnist.apps.serve")

STATIC_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; the policy makes the browser enforce it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# --- response schemas: the OpenAPI document's, and checked on every answer (_answer) ---------------------------

class TopK(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    score: float | None = Field(description="calibrated probability; null only if the model's scores are not "
                                            "finite (reason invalid_scores)")


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")  # keys a later fmnist adds pass through, as the document says
    label: str = Field(description="the best guess, whatever the verdict")
    class_id: int
    score: float | None = Field(description="calibrated probability of the best guess; null only if the model's "
                                            "scores are not finite (reason invalid_scores)")
    accepted: bool = Field(description="true for a confident single answer (verdict 'answer')")
    reason: Literal["blank", "out_of_distribution", "invalid_scores", "low_confidence"] | None = Field(
        description="why there is no single answer; null when answered")
    verdict: Literal["answer", "uncertain", "refused"] = Field(
        description="'answer' (one confident label), 'uncertain' (below the confidence threshold: see "
                    "candidates) or 'refused' (blank, or not a garment)")
    candidates: list[TopK] | None = Field(
        description="the labels the garment could be (a conformal candidate set), most likely first, with "
                    "their scores: two or three when uncertain, usually the answer alone when answered; null "
                    "for refusals and for runs fitted before candidate sets existed")
    ood_score: float | None = Field(description="the OOD detector's score (above the threshold GET /api/model "
                                                "shows: not a garment); null for a run without a detector")
    top_k: list[TopK]
    input_png: str = Field(description="the 28x28 image the model saw, a base64 PNG")


PREDICTIONS = TypeAdapter(list[Prediction])


def _answer(results: list[dict]) -> list[dict]:
    """``results``, once they are what the OpenAPI document says (:class:`Prediction`): an answer that is not
    is a fault of the server (500, logged), never sent."""
    PREDICTIONS.validate_python(results)
    return results


class Error(BaseModel):
    detail: str


ERRORS = {
    400: {"model": Error, "description": "undecodable or unsupported image, a malformed multipart body, two "
                                         "'file' fields on /api/predict, or a Host this server does not serve"},
    408: {"model": Error, "description": "the request's headers or body did not arrive in time"},
    413: {"model": Error, "description": "body over the size limit, image over the pixel limit, or too many "
                                         "files"},
    415: {"model": Error, "description": "the request is not multipart/form-data"},
    431: {"model": Error, "description": "request line and headers too large, or too many header fields"},
    422: {"model": Error, "description": "the 'file' field is missing"},
    500: {"model": Error, "description": "a fault of the server on this request (logged); other requests are "
                                         "not affected"},
    503: {"model": Error, "description": "too many predictions or uploads in progress; retry after Retry-After "
                                         "seconds"},
}


def create_app(run_dir, **settings) -> FastAPI:
    """The application serving the model of ``run_dir`` (loaded at start-up, in the lifespan).

    ``settings``: any field of :class:`~fmnist.apps.serve.settings.Settings` (its defaults are the server's;
    each is the command-line flag of the same name), e.g. ``max_body`` (bytes per request body),
    ``max_pixels`` (width*height per image, checked before decoding), ``max_concurrency`` (predict requests
    in flight before 503), ``threshold``, ``ood_threshold`` (None: the run's own), ``threads``, ``max_batch``,
    ``allowed_hosts``, ``docs``. Bad values raise ``ValueError``.
    """
    s = Settings(run_dir=Path(run_dir), **settings)
    app = FastAPI(title="fmnist", version=fmnist.__version__, lifespan=_lifespan,
                  docs_url="/docs" if s.docs else None, redoc_url=None,
                  description="Classify garment images into the 10 Fashion-MNIST classes. Each answer has a "
                              "`verdict`: `answer` (one confident label, `accepted: true`), `uncertain` (under "
                              "the confidence threshold: `candidates`, the two or three labels it could be) or "
                              "`refused` (blank, or not a garment). Every answer still carries the best guess.")
    app.state.settings = s
    app.state.gate = Gate(s.max_concurrency, "predictions")
    app.state.uploads = Gate(s.max_uploads, "uploads")
    app.state.client_uploads = ClientGate(s.max_uploads_per_client, "uploads")
    # Outermost last: JsonErrors, then the Host check, then the body limit.
    app.add_middleware(BodySizeLimit, max_body=s.max_body)
    app.add_middleware(HostAllowList, hosts=s.allowed_hosts)
    app.add_middleware(JsonErrors)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(_predict_router())
    app.include_router(_info_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    s: Settings = app.state.settings
    from fmnist.core.predict import Predictor

    # Starlette's own blocking work (static files, large uploads spooled to disk) uses anyio's default
    # pool of 40 threads; a few are plenty here.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 8
    extra = {} if s.ood_threshold is None else {"ood_threshold": s.ood_threshold}
    # BatchNorm folded into the convolutions (PyTorch): the same function with fewer layers, a quarter faster.
    # One intra-op thread per inference worker, no spinning (ONNX Runtime): the cores are shared with the
    # event loop.
    load = functools.partial(Predictor.from_run, s.run_dir, backend=s.backend, fold_bn=True, threads=1,
                             confidence_threshold=s.threshold, **extra)
    predictor = await anyio.to_thread.run_sync(load)
    # Bounded threads: `threads` workers, each running the model and NumPy on one thread.
    single_threaded_compute()
    await anyio.to_thread.run_sync(_warm_up, predictor)  # first calls allocate; keep that off requests
    # Everything allocated so far (PyTorch, the model, FastAPI) lives as long as the server: move it out of the
    # garbage collector's reach, so that its full collections no longer walk it in the middle of requests.
    gc.collect()
    gc.freeze()
    app.state.predictor = predictor
    decoder = large = None
    if s.decode_workers:
        from fmnist.apps.serve.decoding import DecodePool

        limits = (s.decode_timeout, s.max_pixels, s.max_decode_work, s.max_frames, s.max_request_pixels)
        decoder = DecodePool(s.decode_workers, *limits, defer_above=s.large_image_work)
        large = DecodePool(1, *limits, niceness=10)
        decoder.start()
        large.start()
    app.state.decoder, app.state.large_decoder = decoder, large
    app.state.batcher = Batcher(predictor, s.max_pixels, workers=s.threads, max_images=max(64, s.max_batch),
                                decoder=decoder, large_decoder=large, max_request_pixels=s.max_request_pixels,
                                max_decode_work=s.max_decode_work, max_frames=s.max_frames)
    app.state.model_info = json.dumps(jsonable(_model_info(predictor, s))).encode()
    log.info("serving %s (%s on %s), threshold %.2f, %d worker thread(s), %d decoding process(es)", s.run_dir,
             predictor.run.model_name, predictor.backend.name, predictor.confidence_threshold, s.threads,
             s.decode_workers)
    try:
        yield
    finally:
        for pool in (decoder, large):
            if pool is not None:
                pool.close()


def _warm_up(predictor) -> None:
    import numpy as np

    predictor.predict_batch([np.zeros((28, 28), np.uint8)])


def _model_info(predictor, s: Settings) -> dict:
    info = predictor.info()
    info.update(
        name=s.run_dir.resolve().name,
        classes=class_info(predictor.class_names, getattr(predictor, "dataset", None)),
        reasons=REASON_TEXTS,
        generic_reason=GENERIC_REASON,
        verdicts=VERDICT_TEXTS,
        candidate_sets=_candidate_sets_info(predictor.run.conformal),
        limits={"max_body_bytes": s.max_body, "max_pixels": s.max_pixels, "max_batch": s.max_batch,
                "max_concurrency": s.max_concurrency, "max_uploads": s.max_uploads, "threads": s.threads,
                "max_decode_work": s.max_decode_work, "max_frames": s.max_frames,
                "max_request_pixels": s.max_request_pixels, "decode_timeout_s": s.decode_timeout,
                "max_uploads_per_client": s.max_uploads_per_client,
                "max_connections_per_client": s.max_connections_per_client},
    )
    return info


def _candidate_sets_info(params: dict | None) -> dict | None:
    """How the run's candidate sets were fitted and, when measured (`fmnist calibrate`), their test figures."""
    if params is None:
        return None
    info = {k: params.get(k) for k in ("method", "coverage", "k_reg", "lam", "n")}
    test = params.get("test")
    if isinstance(test, dict):
        info["test"] = {k: test.get(k) for k in ("n", "coverage", "mean_size", "singleton_share")}
    return info


# --- prediction routes -------------------------------------------------------------------------------------

class _PredictRoute(APIRoute):
    """Checks the content type and takes an upload slot *before* FastAPI reads the body; watches the body
    arrive (:class:`~fmnist.apps.serve.limits.BodyWatch`)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() != "multipart/form-data":
                shown = repr(ctype[:80]) if ctype else "none"
                raise HTTPException(415, f"unsupported content type ({shown}): send the image as "
                                         "multipart/form-data in a field named 'file'")
            uploads: Gate = request.app.state.uploads
            mine: ClientGate = request.app.state.client_uploads
            client = client_address(request.scope, request.app.state.settings.trusted_proxies)
            mine.enter(client)  # first: a client over its own share does not take a slot of the others'
            try:
                uploads.enter()
            except HTTPException:
                mine.leave(client)
                raise

            def leave():
                uploads.leave()
                mine.leave(client)

            watch = BodyWatch(request.receive, multipart_boundary(ctype), leave)
            try:
                return await handler(Request(request.scope, watch.receive))
            except HTTPException as e:
                if isinstance(e.__cause__, ClientDisconnect):  # nobody left to answer
                    return Response(status_code=400)
                if isinstance(e.__cause__, OSError):  # storing the upload failed: the server's fault
                    log.error("cannot store an upload", exc_info=e.__cause__)
                    raise HTTPException(503, "the server cannot store uploads at the moment (disk full?); "
                                             "retry later", headers={"Retry-After": "10"}) from None
                if isinstance(e.__cause__, MemoryError):
                    raise HTTPException(413, "the upload is too large to receive") from None
                if e.__cause__ is not None:
                    # FastAPI answers 400 "error parsing the body" to *any* exception while it reads the form;
                    # malformed multipart bodies come as HTTPExceptions of their own, so this is a fault of ours.
                    log.error("error while receiving an upload", exc_info=e.__cause__)
                    raise HTTPException(500, "internal server error") from None
                raise
            finally:
                watch.end()

        return guarded


IMAGE_FIELD = "an image: PNG, JPEG, BMP, GIF, WebP or TIFF (first frame of animations)"


def _predict_router() -> APIRouter:
    router = APIRouter(prefix="/api", route_class=_PredictRoute, tags=["predict"])

    @router.post("/predict", response_model=Prediction, responses=ERRORS,
                 summary="Classify one image")
    async def predict(request: Request, file: Annotated[UploadFile, File(description=IMAGE_FIELD)]) -> Response:
        """The best guess (`label`, `score`), whether it is `accepted` and, if not, the `reason`; the top
        classes; and `input_png`, the 28x28 image the model saw (base64 PNG)."""
        count = len((await request.form()).getlist("file"))  # parsed already: FastAPI's copy
        if count > 1:
            raise HTTPException(400, f"{count} 'file' fields: /api/predict classifies one image; send several "
                                     "to /api/predict/batch")
        results = await _classify(request, [file])
        return _json(_answer(results)[0])

    @router.post("/predict/batch", response_model=list[Prediction], responses=ERRORS,
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
        return _json(_answer(await _classify(request, file)))

    return router


async def _classify(request: Request, files: list[UploadFile]) -> list[dict]:
    """The results for a request whose body is in: it takes an in-flight slot now (503 when none is free).
    If the client goes away meanwhile, its work is cancelled (a decoding in progress is killed)."""
    app = request.app
    gate: Gate = app.state.gate
    gate.enter()
    try:
        uploads = []
        for f in files:
            uploads.append(((f.filename or "upload")[:100], await f.read()))
            await f.close()  # its spooled copy is no longer needed: free it now, not after the answer
        work = asyncio.ensure_future(app.state.batcher.submit(uploads))
        gone = asyncio.ensure_future(_client_gone(request.receive))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client has gone (or this request was cancelled): stop its work
                work.cancel()
        if not work.done() or work.cancelled():
            raise ClientGone
        return work.result()
    except UploadError as e:
        raise HTTPException(e.status, e.detail) from None
    finally:
        gate.leave()


class ClientGone(HTTPException):
    def __init__(self):
        super().__init__(400, "the client has gone")


async def _client_gone(receive) -> None:
    """Returns when the client disconnects (the body is in: receive() now waits for that alone)."""
    while (await receive())["type"] != "http.disconnect":
        pass


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
