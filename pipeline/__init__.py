"""The engine: scenes in, masks out. It never imports Prefect (``flows`` orchestrates it).

- ``pipeline.io``: readers of scenes and slides, discovery, publishers of masks, polygons and pictures;
- ``pipeline.engine``: the options, the plan and grid, staging, the ledger and manifest, the CRF, the workers,
  the per-scene stages, the report and the one batch driver;
- ``pipeline.ray``: the Ray session, scheduling, actor pools, warm actors, shared-storage checks, a local
  multi-node cluster;
- ``pipeline.tools``: evaluation and tuning;
- ``pipeline.cli``: the ``deeplab`` command line, thin over all of these.
"""
