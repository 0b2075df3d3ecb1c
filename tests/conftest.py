"""Every test process sees 8 CPU devices, so the sharding tests can build a (2, 2, 2) mesh.

Set before JAX starts; unsharded code still runs on the first device, as on a one-device host.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}".strip()
