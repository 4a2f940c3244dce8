"""Old module names as aliases of their new homes: ``import pipeline.sources`` still works, and warns."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# the flat layout before the subpackages -> where each module lives now (kept for a while)
MOVED = {
    "pipeline.sources": "pipeline.io.sources",
    "pipeline.slides": "pipeline.io.slides",
    "pipeline.tissue": "pipeline.io.tissue",
    "pipeline.publish": "pipeline.io.cog",
    "pipeline.slide_publish": "pipeline.io.ome",
    "pipeline.vectorize": "pipeline.io.vectorize",
    "pipeline.regrid": "pipeline.io.regrid",
    "pipeline.areas": "pipeline.io.areas",
    "pipeline.grid": "pipeline.engine.grid",
    "pipeline.preflight": "pipeline.engine.preflight",
    "pipeline.stage": "pipeline.engine.stage",
    "pipeline.ledger": "pipeline.engine.ledger",
    "pipeline.manifest": "pipeline.engine.manifest",
    "pipeline.engine.crf": "pipeline.crf",
    "pipeline.workers": "pipeline.engine.workers",
    "pipeline.segment": "pipeline.engine.segment",
    "pipeline.ray_engine": "pipeline.ray.scheduler",
    "pipeline.actor_pools": "pipeline.ray.actor_pools",
    "pipeline.warm_actors": "pipeline.ray.warm_actors",
    "pipeline.cluster_storage": "pipeline.ray.storage",
    "pipeline.local_cluster": "pipeline.ray.local_cluster",
    "pipeline.evaluate": "pipeline.tools.evaluate",
    "pipeline.tune_crf": "pipeline.tools.tune_crf",
    "pipeline.tune_tiling": "pipeline.tools.tune_tiling",
    "pipeline.slide_chips": "pipeline.tools.slide_chips",
    "pipeline.progress": "pipeline.cli.progress",
    "flows.discover": "pipeline.io.discover",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the new module itself (one module object under two names)."""

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {MOVED[spec.name]}; the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        return None  # the new module is executed already


def install_aliases() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
