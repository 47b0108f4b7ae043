"""The services a bench measures against, started the way the demo and tests start them: a SeaweedFS S3 server
in a temporary folder (its AWS_* variables exported, so every client and Ray worker reaches it like AWS S3) and
a local Ray cluster through the product's `init_ray`; the load average printed before and after, everything
stopped at the end.

    with local_services(num_cpus=2) as storage:
        run(args, storage)
"""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def local_services(num_cpus: int):
    import ray

    from pipelines.common.local_s3 import SeaweedServer
    from pipelines.common.ray_start import init_ray
    from pipelines.common.storage import Storage

    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(os.path.join(tmp, "weed")) as s3:
        os.environ.update(s3.env())
        init_ray(num_cpus=num_cpus, address="local", log_to_driver=False, configure_logging=False)
        try:
            print(f"load_average_before: {os.getloadavg()[0]:.2f}")
            yield Storage()
            print(f"load_average_after: {os.getloadavg()[0]:.2f}")
        finally:
            ray.shutdown()
