"""Elastic LLM serving on openYuanrong: ``from app import App, AppConfig``.

The package is laid out by plane (``README.md``, "Layout"): ``control`` (the App), ``router``,
``engine``, ``weights`` and ``runtime``, with the types they share (``config``, ``replica``) at the top.
The App is imported on first use, so that the planes can be imported alone: by the actors and inside
vLLM's processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import AppConfig, AutoscaleConfig
    from app.control.app import App
    from app.control.scale_report import ScaleReport

__all__ = ["App", "AppConfig", "AutoscaleConfig", "ScaleReport"]


def __getattr__(name: str) -> Any:
    if name == "App":
        from app.control.app import App

        return App
    if name in ("AppConfig", "AutoscaleConfig"):
        from app import config

        return getattr(config, name)
    if name == "ScaleReport":
        from app.control.scale_report import ScaleReport

        return ScaleReport
    raise AttributeError(f"module 'app' has no attribute {name!r}")
