"""Test support: run finetune_visualglm.py with torch.save made to stop half-way through one file, so that
a test can kill the process in the middle of a checkpoint save at a known point.

    PAUSE_SAVE_MATCH=optim_states PAUSE_SAVE_SKIP=1 PAUSE_SAVE_FLAG=/tmp/paused \\
        python tests/pausing_finetune.py <finetune_visualglm.py flags>

The (SKIP+1)-th torch.save to a path containing MATCH writes the first half of its bytes, creates FLAG
and sleeps until killed. Without PAUSE_SAVE_MATCH it is finetune_visualglm.py unchanged.
"""
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import finetune_visualglm  # noqa: E402


def pause_in_save(match: str, skip: int, flag: Path) -> None:
    real_save = torch.save
    seen = [0]

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or match not in str(f):
            return real_save(obj, f, *args, **kwargs)
        seen[0] += 1
        if seen[0] <= skip:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:       # what a kill in the middle of the write leaves behind
            out.write(data[:len(data) // 2])
        flag.write_text(str(f))
        while True:
            time.sleep(1)

    torch.save = save   # DeepSpeed and model/sat/checkpoint.py both call torch.save through the module


if __name__ == "__main__":
    if os.environ.get("PAUSE_SAVE_MATCH"):
        pause_in_save(os.environ["PAUSE_SAVE_MATCH"], int(os.environ.get("PAUSE_SAVE_SKIP", "0")),
                      Path(os.environ["PAUSE_SAVE_FLAG"]))
    sys.exit(finetune_visualglm.main(sys.argv[1:]))
