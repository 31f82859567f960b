"""Bad samples: one warning per skipped sample, naming its key and shard, up to a cap per
process (a shard full of damage should not bury the job's log); every one is still counted
through the `valid` column (see vit_core.data.loader)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vit_core.data")

# Per process (each Ray worker decodes many shards); VIT_DATA_MAX_BAD_LOGS changes it.
MAX_LOGGED = int(os.environ.get("VIT_DATA_MAX_BAD_LOGS", "200"))
_logged = 0


def report_bad_sample(key: str, shard: str, reason: str) -> None:
    global _logged
    _logged += 1
    if _logged <= MAX_LOGGED:
        logger.warning("skipping sample %s in shard %s: %s", key, shard, reason)
    if _logged == MAX_LOGGED:
        logger.warning(
            "%d bad samples logged by this process; further ones are counted, not logged",
            MAX_LOGGED,
        )
