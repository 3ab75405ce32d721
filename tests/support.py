"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations


def start_local_ray(**kwargs) -> None:
    """ray.init for a test module, tried twice: on a loaded 2-core machine the raylet can miss
    Ray's fixed 30 s registration window ("The current node timed out during startup")."""
    import ray

    for attempt in (1, 2):
        try:
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            return
        except Exception as err:
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            ray.shutdown()
