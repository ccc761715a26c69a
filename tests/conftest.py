"""Shared pytest configuration: hypothesis profiles and markers.

HYPOTHESIS_PROFILE=ci (the default in the README's test script) runs tens of examples per
property with no deadline, so a slow runner cannot flake; "dev" runs more.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
