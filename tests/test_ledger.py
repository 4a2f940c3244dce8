from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.engine.ledger import Ledger, result_key
from pipeline.io.labels import NODATA_LABEL


def test_cores_are_recorded_and_survive_a_reopen(tmp_path: Path) -> None:
    key = result_key(model="a", tile=4)
    ledger = Ledger(tmp_path, key, (10, 7), tile=4)
    ledger.write_core(0, 1, np.ones((4, 3), np.uint8), seconds=0.1)
    ledger.write_core(2, 0, np.full((2, 4), 2, np.uint8))
    with open(ledger.log_path, "a") as handle:
        handle.write('{"row": 1, "co')  # a record cut short by a kill
    again = Ledger(tmp_path, key, (10, 7), tile=4)
    assert again.done_count == 2 and again.is_done(0, 1) and again.is_done(2, 0) and not again.is_done(1, 0)
    labels = again.labels()[:]
    assert (labels[0:4, 4:7] == 1).all() and (labels[8:10, 0:4] == 2).all()
    assert (labels[4:8] == NODATA_LABEL).all()


def test_a_changed_key_starts_afresh(tmp_path: Path) -> None:
    Ledger(tmp_path, result_key(model="a"), (8, 8), tile=4).write_core(0, 0, np.zeros((4, 4), np.uint8))
    fresh = Ledger(tmp_path, result_key(model="b"), (8, 8), tile=4)
    assert fresh.done_count == 0
    assert (fresh.labels()[:] == NODATA_LABEL).all()
    assert result_key(a=1, b=2) == result_key(b=2, a=1)
