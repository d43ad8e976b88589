"""The fhe-bento HTTP service: `bentoml serve fhe_bento.service.app:FHEBento`.

Routes live on a FastAPI app mounted into the BentoML service (BentoML's own `@bentoml.api` routes are
POST-only and cannot carry path parameters): native v1 routes (`service/routes.py`, and the two prediction
routes as plain Starlette routes at the head of the route list, `service/prediction_routes.py`), Zama-compatible
routes (`service/compat.py`) and SageMaker's `/ping` + `/invocations` (`service/sagemaker.py`). All of
them call the one `Operations` object (`service/operations.py`) that `FHEBento` below builds, so each
behaviour exists once.

By default each worker of this service holds the FHE runner in process (`runners/runner.py`): it checks
every request, then hands the rows to its engine processes, the only ones where client bytes reach
concrete, so that a request costs one pipe hop besides its FHE. With `FHE_BENTO_RUNNER_URL` it calls a
runner served on its own instead (`service/remote_runner.py`); both are one `RunnerAPI`
(`contract/runner_api.py`) to the operations.

This module is the service's composition root. BentoML declares a service when its module is imported
(`bentoml serve` imports it in the arbiter and in every worker), so the settings are read here, once, and
passed down: routes reach them as `request.app.state.settings` and through `Operations`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import bentoml
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import RunnerAPI
from fhe_bento.models.repository import default_model, load_specs
from fhe_bento.runners.fhe_runner import FHERunner
from fhe_bento.runners.runner import Runner
from fhe_bento.runtime import staging
from fhe_bento.runtime.emf import start_exporter
from fhe_bento.runtime.lifecycle import exit_nonzero_if_stopped
from fhe_bento.service.admission import Admission
from fhe_bento.service.auth import parse_token_settings
from fhe_bento.service.compat import router as compat_router
from fhe_bento.service.drain import Drain, DrainMiddleware
from fhe_bento.service.limits import RequestLimits
from fhe_bento.service.operations import Operations
from fhe_bento.service.prediction_routes import prediction_routes
from fhe_bento.service.remote_runner import RemoteRunner
from fhe_bento.service.responses import error_response
from fhe_bento.service.routes import admin_router
from fhe_bento.service.routes import router as native_router
from fhe_bento.service.sagemaker import router as sagemaker_router
from fhe_bento.service.settings import ServiceSettings
from fhe_bento.service.training_routes import router as training_router

log = logging.getLogger("bentoml.fhe_bento.service")


async def _fhe_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FHEBentoError)
    return error_response(exc, request.method)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own answers in the service's error shape. (A path that no route serves never gets here:
    # BentoML's router answers it with its plain-text 404.)
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        return await _fhe_error(
            request, FHEBentoError("method_not_allowed", f"{request.method} is not allowed here")
        )
    return await _fhe_error(request, FHEBentoError("invalid_request", str(exc.detail)))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return await _fhe_error(
        request, FHEBentoError("invalid_request", f"{where}: {first.get('msg', 'invalid')}")
    )


# The FastAPI routers of the service, after the prediction routes.
# The training routes come before the native ones, whose last route is the catch-all `GET /{name:path}`.
ROUTERS = (sagemaker_router, training_router, native_router, admin_router, compat_router)


def build_app(settings: ServiceSettings, routers: Sequence[APIRouter] = ROUTERS) -> FastAPI:
    """The routes, their error shape and request limits. Token settings that would turn auth off by mistake
    raise here (`service/auth.py`), so the service does not start."""
    # The prediction routes come first: matched before the FastAPI routes, whose `{name:path}` would
    # otherwise be tried on every row's path.
    app = FastAPI(title="fhe-bento", version="1", docs_url=None, redoc_url=None, routes=prediction_routes())
    app.state.settings = settings
    app.state.auth = parse_token_settings(
        settings.predict_tokens.get_secret_value(), settings.admin_tokens.get_secret_value()
    )
    app.add_middleware(
        RequestLimits, max_header_bytes=settings.max_header_bytes, timeout=settings.request_timeout
    )
    # Outermost: a draining worker refuses a request before anything else reads it.
    app.state.drain = Drain(settings.drain_seconds)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_exception_handler(FHEBentoError, _fhe_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for router in routers:
        app.include_router(router)
    return app


def declare_service(settings: ServiceSettings, app: FastAPI) -> type:
    """The BentoML service serving `app`, with its FHE runner in process, or reached at
    `FHE_BENTO_RUNNER_URL`."""

    # BentoML's own deadline comes a little later than RequestLimits', so that the JSON 504 gets out first.
    # Each worker holds a runner in process: the workers are the runner's. With a remote runner, one worker
    # only relays.
    @bentoml.service(
        name="fhe_bento",
        workers=1 if settings.runner_url else settings.workers,
        traffic={"timeout": settings.request_timeout + 5},
    )
    @bentoml.asgi_app(app, path="/")
    class FHEBento:
        if settings.runner_url:  # `bentoml serve` of this service then starts no runner of its own
            remote = bentoml.depends(FHERunner, url=settings.runner_url)

        def __init__(self) -> None:
            specs = load_specs(settings)
            staging.clear_stale(settings)
            runner: RunnerAPI
            if settings.runner_url:
                runner = RemoteRunner(self.remote, settings.runner_url, settings.request_timeout)
            else:
                self.runner = runner = Runner(settings, specs)
            admission = Admission(
                settings.max_queue_rows,
                settings.request_timeout,
                parallelism=os.cpu_count() or 1,
                batch_parallelism=settings.row_threads,
            )
            drain: Drain = app.state.drain
            self.ops = Operations(runner, specs, default_model(settings, specs), settings, admission, drain)
            drain.install()
            self.emf = start_exporter(settings)  # CloudWatch EMF lines on stdout (SageMaker), in worker 1
            log.info(
                "serving models %s (default %s)%s",
                sorted(specs),
                self.ops.default.name,
                f" with the runner at {settings.runner_url}" if settings.runner_url else "",
            )

        async def __is_ready__(self) -> bool:
            """BentoML's `/readyz`: the same answer as `/ping` (`service/sagemaker.py`)."""
            return await self.ops.ready()

        @bentoml.on_shutdown
        def stop_engine(self) -> None:
            """The worker is stopping: its engine processes end now, on purpose. Left to the interpreter's
            exit, they would end under a running supervisor, which would take them for a crash."""
            if not settings.runner_url:
                self.runner.shutdown()
            if self.emf is not None:  # after the drain: its count goes out in the last lines
                self.emf.stop()

    return FHEBento


# The arbiter only imports this module (it never builds the service): registering the exit hook here is
# the one way to give a stopped server a non-zero exit status (runtime/lifecycle.py).
exit_nonzero_if_stopped()
_settings = ServiceSettings()
app = build_app(_settings)
FHEBento = declare_service(_settings, app)
