"""The engine core: options, plan and grid, staging, ledger, manifest, CRF, workers, scene stages, driver."""
