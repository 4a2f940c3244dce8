"""Prefect orchestration of the engine in ``pipeline/`` (which never imports Prefect)."""

from flows.settings import telemetry_off

telemetry_off()
