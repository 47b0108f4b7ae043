"""GET <prefix>healthz: liveness and readiness of the endpoint, from a deployment of its own.

    GET /healthz           liveness: 200 whenever this route answers, with the model's state in the body
    GET /healthz?ready=1   readiness: 200 only when a model replica is loaded and passing Serve's health checks,
                           else 503 (what a load balancer or Kubernetes readinessProbe should ask)

    body {"status": "ok" | "starting" | "degraded", "model_ready": bool, "application": name,
          "replicas": {"RUNNING": n, "STARTING": m, ...}, "app_status": "RUNNING", "checked_s_ago": s, "uptime_s": s}

    ok        the model application is RUNNING and its encoder deployment healthy, >= 1 replica running
    starting  the application is not deployed yet or deploying, no replica running yet (the model is loading)
    degraded  the application or deployment is unhealthy or failed to deploy (some replicas may still answer:
              model_ready says whether any does)

The state comes from the Serve controller (`serve.status()`), which starts a replica only once its constructor
(the model load) has returned and restarts one that fails its periodic `check_health`; a background task asks
it every `POLL_S` seconds from a thread and the route answers from that, so it never waits on the controller or on the
model's request slots: slow uploads and long forwards that hold every encoder slot do not delay it.
"""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

POLL_S = 1.0  # seconds between two questions to the Serve controller
STARTING_POLL_S = 0.2  # seconds between looks while the model is not ok
ENCODER_DEPLOYMENT = "OlmoEarthEncoder"  # the model deployment of serve/app.py
HEALTHY = ("HEALTHY", "UPSCALING", "DOWNSCALING")


def model_state(status, app_name: str) -> dict:
    """serve.status() -> {"status", "model_ready", "replicas", "app_status"} of application `app_name`."""
    app = status.applications.get(app_name)
    if app is None:
        return {"status": "starting", "model_ready": False, "replicas": {}, "app_status": "NOT_DEPLOYED"}
    dep = app.deployments.get(ENCODER_DEPLOYMENT)
    replicas = {str(getattr(k, "value", k)): int(v) for k, v in (dep.replica_states if dep else {}).items()}
    running = replicas.get("RUNNING", 0)
    app_status = str(getattr(app.status, "value", app.status))
    dep_status = str(getattr(dep.status, "value", dep.status)) if dep else ""
    if app_status == "RUNNING" and dep_status in HEALTHY and running:
        state = "ok"
    elif app_status in ("NOT_STARTED", "DEPLOYING") and not running:
        state = "starting"
    else:
        state = "degraded"
    return {"status": state, "model_ready": running > 0, "replicas": replicas, "app_status": app_status}


@serve.deployment(name="OlmoEarthHealth", num_replicas=1, max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0})  # fmt: skip
class HealthDeployment:
    """Its slots are not the encoder's, and it answers from the last state the controller gave."""

    def __init__(self, app_name: str = "olmoearth"):
        self.app, self.started = app_name, time.time()
        self.state = {"status": "starting", "model_ready": False, "replicas": {}, "app_status": "UNKNOWN"}
        self.checked = 0.0
        threading.Thread(target=self._poll, name="health-poll", daemon=True).start()

    def _poll(self) -> None:
        """In its own thread: ask the controller every POLL_S seconds (a blocking call, never on the loop)."""
        while True:
            try:
                self.state, self.checked = model_state(serve.status(), self.app), time.time()
            except Exception as e:  # noqa: BLE001 - the controller unreachable: report it, keep polling
                self.state = {**self.state, "status": "degraded", "error": f"controller: {type(e).__name__}"}
            # not ok yet (deploying, restarting): look again soon, so that "ok" is seen within a moment
            time.sleep(POLL_S if self.state.get("status") == "ok" else STARTING_POLL_S)

    async def __call__(self, request: Request) -> JSONResponse:
        # a request right after start waits for the first look (at most 2 s); a not-ok answer is never older
        # than the request (at most 1 s more), so "starting" is not told after the model became ready
        arrived = time.time()
        for _ in range(30):
            if self.checked and (self.state.get("status") == "ok" or self.checked >= arrived or _ >= 20):
                break
            await asyncio.sleep(0.1)
        now = time.time()
        body = {**self.state, "application": self.app, "uptime_s": round(now - self.started, 1),
                "checked_s_ago": round(now - self.checked, 1) if self.checked else None}  # fmt: skip
        ready = request.query_params.get("ready", "").lower() in ("1", "true", "yes")
        return JSONResponse(body, status_code=503 if ready and not body["model_ready"] else 200)


def health_builder(args: dict | None = None):
    """Entry of the health application (configs/serve.yaml deploys it at <route_prefix>healthz); args:
    `app_name`, the model application it reports on."""
    return HealthDeployment.bind(**dict(args or {}))


def health_prefix(route_prefix: str) -> str:
    return route_prefix.rstrip("/") + "/healthz"
