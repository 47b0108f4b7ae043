"""How loud the jobs are, set in one place: quiet by default (one progress bar per stage and the jobs' own
summary lines), everything back on request with OLMOEARTH_VERBOSE=1 (`olmoearth demo --verbose true` sets it).

Quiet means: Ray workers' stdout / stderr stay in Ray's session logs (/tmp/ray/session_latest/logs) instead of
the driver's terminal; Ray Data shows one bar per dataset, not one per operator, and no execution-plan or
stats lines on the console (ray-data.log keeps them); Serve writes no access-log line per request and only
warnings. A failing worker still surfaces: its exception is raised in the driver with its traceback."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "OLMOEARTH_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """For this process and what it starts (Ray workers inherit the variable through the job's env)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def ray_init_options() -> dict:
    """ray.init's log settings (a caller's explicit options win over these)."""
    on = verbose()
    return {"log_to_driver": on, "logging_level": logging.INFO if on else logging.WARNING}


# third-party warnings that repeat on every run and say nothing to act on (shown when verbose)
NOISE_WARNINGS = (
    (r".*RunConfig\((verbose|callbacks)", "Ray Train V1's deprecation of what this project's pretraining uses"),
    (r"Consolidated metadata is currently not part", "zarr v3: the mosaic writes it on purpose"),
)


class _DropMessages(logging.Filter):
    """Drops console records that only say a quiet setting is on (Ray Data announces each one)."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_driver() -> None:
    """Everything this driver process prints by itself: Ray Data, Ray Train's console reporter, warnings."""
    import warnings

    quiet_ray_data()
    # Tune's controller warns whenever its bookkeeping of a report takes over 0.5 s ("... may be a performance
    # bottleneck"), which on a loaded 2-core machine is most reports: one line per report on the console
    logging.getLogger("ray.tune.utils.util").setLevel(logging.WARNING if verbose() else logging.ERROR)
    if verbose():
        return
    for message, _why in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # Ray Train V1's console reporter ("View detailed results here", trial tables); our own bar stays
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def quiet_ray_data() -> None:
    """Ray Data's console output for datasets this driver executes (DataContext travels with each dataset)."""
    import ray.data

    on = verbose()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = on
    ctx.print_on_execution_start = on
    ctx.verbose_stats_logs = on
    ctx.enable_auto_log_stats = on
    level = logging.INFO if on else logging.WARNING
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(level)  # the console only: ray-data.log keeps every line
            if not on and not any(isinstance(f, _DropMessages) for f in handler.filters):
                handler.addFilter(_DropMessages(("Progress bars for operators disabled", "Progress bars disabled")))


def serve_logging_config():
    """Serve's LoggingConfig: no access-log line per request and warnings only, unless verbose."""
    from ray.serve.schema import LoggingConfig

    on = verbose()
    logging.getLogger("ray.serve").setLevel(logging.INFO if on else logging.WARNING)  # this driver's Serve lines
    return LoggingConfig(enable_access_log=on, log_level="INFO" if on else "WARNING")
