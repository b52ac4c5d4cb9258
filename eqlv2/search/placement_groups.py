"""Releases the placement groups that trials stopped early leave behind.

When Tune stops a trial early (ASHA), it kills the trial's actor, and with it the Ray Train
controller the trial started. The controller's placement group (the CPUs of its workers) is not
owned by the controller but by the job, so it stays reserved: the next trial's workers then wait
forever. Ray Train V2 has a ``PlacementGroupCleaner`` for this, but it watches the controller
through the State API, which needs the Ray dashboard; the search runs Ray without it.

:class:`PlacementGroupJanitor` (a Tune callback on the driver) therefore removes, after each trial
and every few seconds, the placement groups whose creator actor is dead (and that are not
detached): by definition nobody can use them any more. It reads the placement-group table from
Ray's GCS (``creator_actor_dead``), which works without the dashboard.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)

__all__ = ["PlacementGroupJanitor", "orphaned_placement_groups", "release_orphaned_placement_groups"]


def orphaned_placement_groups() -> list[str]:
    """Hex ids of the live placement groups whose creator actor is dead (not detached ones)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not ray.is_initialized():
        return []
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    orphans = []
    accessor = state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # A group made by a driver (e.g. Tune's own trial groups) has the nil actor id: all 0xff.
        created_by_actor = any(byte != 0xFF for byte in data.creator_actor_id)
        if data.state != removed and created_by_actor and data.creator_actor_dead and not data.is_detached:
            orphans.append(data.placement_group_id.hex())
    return orphans


def release_orphaned_placement_groups() -> int:
    """Removes the placement groups of :func:`orphaned_placement_groups`; returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    released = 0
    for group_id in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            released += 1
        except Exception as error:  # already removed meanwhile, or GCS busy: next round
            logger.debug("Could not remove placement group %s: %s", group_id, error)
    if released:
        logger.info("Released %d placement group(s) left by stopped trials", released)
    return released


class PlacementGroupJanitor(Callback):
    """Tune callback: releases orphaned placement groups after trials end and periodically.

    Args:
        period_s: seconds between two periodic checks.
    """

    def __init__(self, period_s: float = 5.0) -> None:
        self._period = period_s
        self._last = 0.0
        self._warned = False

    def _sweep(self) -> None:
        self._last = time.monotonic()
        try:
            release_orphaned_placement_groups()
        except Exception as error:  # a private Ray API: never break the search over it
            if not self._warned:
                logger.warning("Cannot check for orphaned placement groups: %s", error)
                self._warned = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self._period:
            self._sweep()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._sweep()

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._sweep()
