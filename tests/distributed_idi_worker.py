"""One process of ``python -m training.idi`` under torchrun, launched by tests/test_training_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_idi_worker.py \
        <record folder> --config training/configs/emojidiff_idi_smoke.yaml --set ...

Runs training.idi's own command line (its process split comes from torchrun's RANK and WORLD_SIZE) with the
test swapper of tests/support/training_helpers.py instead of inswapper, and writes ``rank-<r>.json``: the rows this
process rendered and filtered, and the report it printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.training_helpers import FakeSwapper  # noqa: E402
from training import idi  # noqa: E402


def main() -> None:
    record_dir, *argv = sys.argv[1:]
    rows: list[int] = []
    row = idi.IDI.row

    def recording_row(self, index):
        rows.append(index)
        return row(self, index)

    idi.IDI.row = recording_row
    idi.build_swapper = lambda settings: FakeSwapper()
    result = idi.main(argv)
    rank = int(os.environ.get("RANK", 0))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "rows": rows, "result": result}
    Path(record_dir, f"rank-{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
