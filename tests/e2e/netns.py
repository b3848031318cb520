"""Test hosts in network namespaces: the harness's helper (`nexusd.harness.netns`)."""

from __future__ import annotations

from nexusd.harness.netns import Namespaces as Namespaces
from nexusd.harness.netns import namespaces as namespaces
from nexusd.harness.netns import netns_available as netns_available
