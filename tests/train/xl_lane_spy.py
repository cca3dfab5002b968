"""`slm train` with a spy on the Transformer-XL step function that appends, for every micro-batch a process
reads, its lanes, each row's first input and last label, the loss and the memory after the pass to
$XL_LANE_LOG/rank<RANK>.jsonl. The real step runs unchanged. Used by test_xl_memory_parallel.py, directly and
under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/xl_lane_spy.py train --data ...
"""

import json
import os
import sys
from pathlib import Path

from slmkit.train import segments


def install_spy(log_dir: Path) -> None:
    real = segments.XLLMStep.__call__
    log = log_dir / f"rank{os.environ.get('RANK', '0')}.jsonl"

    def spy(self, model, batch):
        loss, metrics = real(self, model, batch)
        lanes = tuple(int(i) for i in batch["lanes"].tolist())
        memory = self.memories[lanes]
        record = {"lanes": lanes, "first": batch["input_ids"][:, 0].tolist(),
                  "last_label": batch["labels"][:, -1].tolist(), "loss": loss.item(),
                  "offset": memory.offset, "length": memory.length,
                  "keys_held": [k is not None for k in memory.keys]}
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
        return loss, metrics

    segments.XLLMStep.__call__ = spy


if __name__ == "__main__":
    install_spy(Path(os.environ["XL_LANE_LOG"]))
    from slmkit.cli import main

    sys.argv = ["slm", *sys.argv[1:]]
    main()
