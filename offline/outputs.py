"""The output file: JSON lines, appended to and never rewritten, so a run can always be resumed.

Opening it reads the ids already answered (a rerun skips them). A crash in the middle of a write can
leave an incomplete last line: that torn tail is cut off (the ids on it were never counted as done, so
they are answered again); every complete line stays as it is. Each write is flushed and fsynced, so a
crash or Ctrl-C loses at most the batch that was being generated.
"""
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Set


class OutputFile:
    def __init__(self, path, say=print):
        self.path = Path(path).expanduser()
        self.say = say                     # where warnings go (the runner passes the progress bar's writer)
        self._f = None

    def done_ids(self) -> Set[str]:
        """Ids of the records already in the file (answers and error records alike)."""
        if not self.path.exists():
            return set()
        self._repair_tail()
        done, unreadable = set(), 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                rid = _id_of(raw)
                if rid is None:
                    unreadable += 1
                else:
                    done.add(rid)
        if unreadable:
            self.say(f"warning: {unreadable} line(s) of {self.path} are not output records; they are left as they are")
        return done

    def _repair_tail(self) -> None:
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            start = _last_line_start(f, size)
            f.seek(start)
            tail = f.read()
            if _id_of(tail) is not None:    # a whole record that only lacks its newline: keep it
                f.write(b"\n")
                return
            f.truncate(start)
            self.say(f"warning: {self.path} ended in an incomplete line (an interrupted write); "
                     f"removed its {size - start} byte(s), the ids on it will be answered again")

    def write(self, records: Iterable[dict]) -> None:
        """Append records (one JSON line each) and make them durable before returning."""
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if text:
            self._f.write(text)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _id_of(raw: bytes) -> Optional[str]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return str(obj["id"]) if isinstance(obj, dict) and obj.get("id") is not None else None


def _last_line_start(f, size: int, chunk: int = 1 << 16) -> int:
    """Offset just after the last b"\\n" of the file (0 if none), reading backwards in chunks."""
    end = size
    while end > 0:
        begin = max(0, end - chunk)
        f.seek(begin)
        at = f.read(end - begin).rfind(b"\n")
        if at >= 0:
            return begin + at + 1
        end = begin
    return 0
