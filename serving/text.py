"""Token ids -> text deltas that are never taken back, for streaming.

The text of an answer is `engine.decode(all_ids)`, which post-processes the whole string
(process_response: strip, full-width punctuation next to Chinese characters, "[[训练时间]]").
A later token can therefore still change the end of the text decoded so far: a half-width mark
becomes full-width when a Chinese character follows it, a partial "[[训练时间]]" is replaced once
complete, and a stop string is cut away. TextAssembler holds back such a tail until it is settled,
so that the concatenated deltas equal the final text. Servers pass `engine.streaming_decode()`, which
gives the same text as engine.decode without decoding the whole answer again for every chunk.
"""
from typing import Callable, List, Optional, Sequence

from model.prompts import FULL_WIDTH, PLACEHOLDERS

_MARKS = set(FULL_WIDTH)                  # converted by process_response when a CJK character follows
_PLACEHOLDERS = tuple(PLACEHOLDERS)       # replaced by process_response once complete


def _partial_suffix(text: str, targets: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `targets`."""
    best = 0
    for t in targets:
        for n in range(min(len(t) - 1, len(text)), best, -1):
            if text.endswith(t[:n]):
                best = n
                break
    return best


class TextAssembler:
    def __init__(self, decode: Callable[..., str], stop: Optional[Sequence[str]] = None):
        """decode(ids, final=bool) -> text, like ChatEngine.decode. stop: strings that end the answer
        (not included in it)."""
        self._decode = decode
        self.stop = [s for s in (stop or []) if s]
        self.ids: List[int] = []
        self.sent = ""           # text handed out so far
        self.stopped = False     # a stop string was found: the caller should end generation

    def _cut_stop(self, text: str) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        return text

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""            # an earlier part changed after all: wait until it settles again
        delta, self.sent = text[len(self.sent):], text
        return delta

    def add(self, ids: Sequence[int]) -> str:
        """Add new token ids; return the newly settled text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._cut_stop(self._decode(self.ids, final=False))
        if self.stopped:
            return self._delta(text)
        hold = _partial_suffix(text, list(_PLACEHOLDERS) + self.stop)
        if text and text[-1] in _MARKS:
            hold = max(hold, 1)
        return self._delta(text[:len(text) - hold])

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        text = self._cut_stop(self._decode(self.ids, final=True))
        if text.startswith(self.sent):
            delta = text[len(self.sent):]
        else:  # cannot happen with the holdback rules above; never lose text if it does
            common = 0
            while common < min(len(text), len(self.sent)) and text[common] == self.sent[common]:
                common += 1
            delta = text[common:]
        self.sent += delta
        self.final = text
        return delta

    @property
    def text(self) -> str:
        """The whole answer: final after finish(), the settled part before."""
        return getattr(self, "final", self.sent)
