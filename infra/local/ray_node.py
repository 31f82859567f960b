"""`ray start`, but every node of the local stack stays on the loopback interface.

Ray maps 127.0.0.1 to the machine's network address and binds its servers on all
interfaces, and it refuses extra nodes on a host in loopback mode. For a test stack
that must listen on 127.0.0.1 only, this wrapper keeps the node address literal and
makes every process it spawns (raylet, GCS, workers, job drivers) resolve "localhost"
to 127.0.0.1. Production clusters use plain `ray start`.

    python -m infra.local.ray_node start --head --node-ip-address=127.0.0.1 ...
"""

import os
import sys

# Read by ray_constants at import: allows joining a head from the same host.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"

from ray._private import services  # noqa: E402
from ray.scripts.scripts import main  # noqa: E402

# Children read it afresh, and then resolve every local address to 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    sys.exit(main())
