"""Elastic LLM serving on openYuanrong: ``from app import App, AppConfig``.

The heavy parts (the yr SDK, the actors) are imported on first use, so that the libraries in this
package (config, Router, weight plane) can be imported alone, by the actors and inside vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.app import App
    from app.config import AppConfig
    from app.scale_report import ScaleReport

__all__ = ["App", "AppConfig", "ScaleReport"]


def __getattr__(name: str) -> Any:
    if name == "App":
        from app.app import App

        return App
    if name == "AppConfig":
        from app.config import AppConfig

        return AppConfig
    if name == "ScaleReport":
        from app.scale_report import ScaleReport

        return ScaleReport
    raise AttributeError(f"module 'app' has no attribute {name!r}")
