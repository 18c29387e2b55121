"""Every `web.AppKey` shared by handlers and the factory, in one leaf module."""

from __future__ import annotations

from aiohttp import web

from gateway.admission import Admission
from gateway.config import Settings
from gateway.feed import Feed
from gateway.metrics import Metrics
from gateway.relay import Relay
from gateway.spool import Spool
from gateway.state import Lifecycle

SETTINGS = web.AppKey("settings", Settings)
RELAY = web.AppKey("relay", Relay)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
SPOOL = web.AppKey("spool", Spool)  # queue mode only
METRICS = web.AppKey("metrics", Metrics)
ADMISSION = web.AppKey("admission", Admission)
FEED = web.AppKey("feed", Feed)
