"""Progress bars for what takes long (an evaluation, reading or writing a multi-GB checkpoint): tqdm on
stderr, so that what a command prints on stdout stays machine-readable, with a rate and an ETA."""
import sys

# Checkpoints smaller than this load and save in a few seconds: no bar (the bundled model, tests).
LARGE_CHECKPOINT_BYTES = 1 << 30


def bar(total=None, desc: str = "", unit: str = "it", disable: bool = False, **kw):
    """A tqdm bar on stderr. Redrawn at most twice a second, which also keeps a log file small."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                disable=disable, **kw)


def byte_bar(total: int, desc: str):
    return bar(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


class CountingWriter:
    """A binary file that advances `progress` by every byte written through it: torch.save writes a
    checkpoint through this, so its bar moves with the data actually written."""

    def __init__(self, f, progress):
        self.f, self.progress = f, progress

    def write(self, data) -> int:
        written = self.f.write(data)
        self.progress.update(len(data))
        return written

    def flush(self) -> None:
        self.f.flush()
