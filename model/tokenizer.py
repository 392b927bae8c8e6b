"""ChatGLM-6B tokenizer rebuilt on plain `sentencepiece` (spec section 5).

Loads the folder users already have from THUDM/chatglm-6b or THUDM/visualglm-6b
(`ice_text.model` + `tokenizer_config.json`) without transformers or remote code.
Every special id is looked up in the SentencePiece model by its piece string taken
from the config, so the class also works with the tiny models made by
`train_tokenizer` (used by the tests) where the ids are small.
"""
import io
import json
import os
import re
from typing import Iterable, List, Optional, Sequence, Union

import sentencepiece as spm

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_BLANK = 80  # longest `<|blank_N|>` piece in ChatGLM's vocabulary
NEWLINE, TAB = "<n>", "<|tab|>"
BLANKS = [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]
# The class-level special list of ChatGLM, in vocabulary order ([MASK] first).
SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
# tokenizer_config.json keys holding special-token strings, with ChatGLM's defaults.
TOKEN_KEYS = {"bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "mask_token": "[MASK]",
              "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>"}
_SPACE_RUN = re.compile(" {2,}")
_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")
_LONGEST_PIECE = len(f"<|blank_{MAX_BLANK}|>")   # longest text postprocess replaces (all start with "<")


def _spaces_to_blanks(match):
    # Longest piece first: a run of 100 spaces -> <|blank_80|><|blank_20|>; a lone
    # leftover space stays a plain space (SentencePiece's "▁").
    n, out = len(match.group(0)), []
    while n >= 2:
        take = min(n, MAX_BLANK)
        out.append(f"<|blank_{take}|>")
        n -= take
    return "".join(out) + " " * n


def preprocess(text: str) -> str:
    """ChatGLM's text normalisation before SentencePiece (spec 5.2)."""
    text = text.replace("\n", NEWLINE).replace("\t", TAB)
    return _SPACE_RUN.sub(_spaces_to_blanks, text)


def postprocess(text: str) -> str:
    """Inverse of `preprocess` on decoded text."""
    text = text.replace(NEWLINE, "\n").replace(TAB, "\t")
    return _BLANK_PIECE.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= MAX_BLANK
                            else m.group(0), text)


class BatchEncoding(dict):
    """The few bits of HF's BatchEncoding that chat/fine-tune code touches."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class ChatGLMTokenizer:
    def __init__(self, vocab_file: str, num_image_tokens: int = 0, remove_space: bool = False,
                 do_lower_case: bool = False, eop_token: Optional[str] = None, **tokens):
        unknown = set(tokens) - set(TOKEN_KEYS)
        if unknown:
            raise TypeError(f"unknown tokenizer options: {sorted(unknown)}")
        self.vocab_file = str(vocab_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        # Old releases put 20000 icetk image ids in front of the text ids; current configs say 0.
        self.num_image_tokens = int(num_image_tokens)
        self.remove_space, self.do_lower_case = bool(remove_space), bool(do_lower_case)
        for key, default in TOKEN_KEYS.items():
            setattr(self, key, tokens.get(key) or default)
        self.eop_token = eop_token or self.eos_token
        for key in list(TOKEN_KEYS) + ["eop_token"]:
            setattr(self, key + "_id", self._require_id(key, getattr(self, key)))
        self.sop_token_id = self.bos_token_id  # `<sop>` starts the answer block
        # Ids of every special piece this vocabulary has (for skip_special_tokens), and the
        # literal strings that are cut out of user text before SentencePiece sees it.
        known = [getattr(self, k) for k in TOKEN_KEYS] + [self.eop_token]
        self.special_tokens = list(dict.fromkeys(known + [p for p in SPECIAL_PIECES if self._has(p)]))
        self.all_special_ids = sorted({self._piece_id(p) for p in self.special_tokens})
        alternatives = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._special_re = re.compile(f"({alternatives})")
        self._require_id("newline piece", NEWLINE)  # needed by preprocess and the no-prefix trick

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "ChatGLMTokenizer":
        folder = os.fspath(path)
        missing = [f for f in (VOCAB_FILE, CONFIG_FILE) if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"tokenizer folder {folder!r} must contain {VOCAB_FILE} and "
                                    f"{CONFIG_FILE}; missing: {', '.join(missing)}")
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        keys = set(TOKEN_KEYS) | {"eop_token", "num_image_tokens", "remove_space", "do_lower_case"}
        kwargs = {k: v for k, v in config.items() if k in keys}
        kwargs.update(overrides)
        return cls(os.path.join(folder, VOCAB_FILE), **kwargs)

    # ---- piece <-> id -------------------------------------------------------------
    def _has(self, piece):
        return self.sp.piece_to_id(piece) != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id())

    def _piece_id(self, piece):
        return self.sp.piece_to_id(piece) + self.num_image_tokens

    def _require_id(self, what, piece):
        # SentencePiece answers unk for unknown pieces; a silent 0 would corrupt prompts.
        if not isinstance(piece, str) or not self._has(piece):
            raise ValueError(f"{what} {piece!r} is not a piece of {self.vocab_file}")
        return self._piece_id(piece)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            m = re.fullmatch(r"<image_(\d+)>", tokens)
            if m and int(m.group(1)) < self.num_image_tokens:
                return int(m.group(1))
            return self._piece_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            if ids < self.num_image_tokens:
                return f"<image_{ids}>"
            return self.sp.id_to_piece(ids - self.num_image_tokens) if ids < len(self) else None
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def __len__(self):
        return self.vocab_size

    def get_vocab(self) -> dict:
        return {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}

    # ---- encoding ----------------------------------------------------------------
    def _segments(self, text):
        """Split user text into plain-text chunks and literal special tokens."""
        for chunk in self._special_re.split(text):
            if chunk:
                yield chunk, chunk in self.special_tokens

    def _sp_encode(self, chunk, out_type, add_dummy_prefix):
        if self.remove_space:
            chunk = " ".join(chunk.strip().split())
        if self.do_lower_case:
            chunk = chunk.lower()
        chunk = preprocess(chunk)
        if add_dummy_prefix:
            return self.sp.encode(chunk, out_type=out_type)
        # SentencePiece has no per-call switch for its dummy "▁": encode "<n>" + text, which
        # always starts with the pieces "▁", "<n>", and drop those two (ChatGLM's own trick).
        out = self.sp.encode(NEWLINE + chunk, out_type=out_type)
        return out[2:]

    def _encode_plain(self, text, add_dummy_prefix=True) -> List[int]:
        ids = []
        for chunk, special in self._segments(text):
            if special:
                ids.append(self._piece_id(chunk))
            else:
                ids.extend(i + self.num_image_tokens for i in self._sp_encode(chunk, int, add_dummy_prefix))
        return ids

    def tokenize(self, text: str, add_dummy_prefix: bool = True) -> List[str]:
        pieces = []
        for chunk, special in self._segments(text):
            pieces.extend([chunk] if special else self._sp_encode(chunk, str, add_dummy_prefix))
        return pieces

    def build_inputs_with_special_tokens(self, ids_a: Sequence[int], ids_b: Optional[Sequence[int]] = None):
        # GLM: no bos up front; [gMASK] marks the blank to fill, <sop> starts the answer.
        out = list(ids_a) + [self.gmask_token_id, self.bos_token_id]
        if ids_b is not None:
            out += list(ids_b) + [self.eop_token_id]
        return out

    def encode(self, text: str, add_special_tokens: bool = True, add_dummy_prefix: bool = True) -> List[int]:
        ids = self._encode_plain(text, add_dummy_prefix)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text: Union[str, Sequence[str]], return_tensors: Optional[str] = None,
                 add_special_tokens: bool = True, padding: Union[bool, str] = False) -> BatchEncoding:
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        if padding in (True, "longest"):
            # Left padding (ChatGLM's padding_side): the last position stays the <sop> slot.
            width = max((len(r) for r in rows), default=0)
            rows = [[self.pad_token_id] * (width - len(r)) + r for r in rows]
        elif padding not in (False, None, "do_not_pad"):
            raise ValueError(f"padding={padding!r} is not supported (use True/'longest' or False)")
        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("sequences differ in length; pass padding=True to batch them")
            import torch
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (None or 'pt')")
        return BatchEncoding(input_ids=rows[0] if single else rows)

    # ---- decoding ----------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return postprocess(self.sp.decode(self._pieces(ids, skip_special_tokens)))

    def _pieces(self, ids, skip_special_tokens: bool = False) -> List[int]:
        """Token ids -> the SentencePiece ids that carry their text. The model has more rows (130528) than
        the vocabulary (130344): such ids, image ids and pads carry no text, so they are dropped instead of
        failing in SentencePiece."""
        drop = set(self.all_special_ids) if skip_special_tokens else {self.pad_token_id}
        size = self.sp.get_piece_size()
        raw = [i - self.num_image_tokens for i in map(int, ids) if i not in drop]
        return [i for i in raw if 0 <= i < size]

    def streaming_decoder(self) -> "StreamingDecoder":
        """decode() for one answer while it grows (see StreamingDecoder)."""
        return StreamingDecoder(self)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> List[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def train_tokenizer(texts: Iterable[str], out_dir: Union[str, os.PathLike], vocab_size: int = 1000,
                    model_type: str = "unigram", seed: int = 0) -> ChatGLMTokenizer:
    """Train a small SentencePiece model with ChatGLM's conventions and write
    `ice_text.model` + `tokenizer_config.json` to `out_dir` (for tests and toy runs).

    Layout: <unk>=0, <s>=1, </s>=2, <pad>=3, then <n>, <|tab|>, <|blank_2..80|>, the
    eight GLM specials, the 256 byte pieces, then learned pieces. Byte fallback plus
    full character coverage make any UTF-8 text encodable (unseen characters as bytes).
    `vocab_size` is an upper bound (hard_vocab_limit off) so tiny corpora still train.
    """
    # Train on the text exactly as encode() will present it to SentencePiece.
    sentences = [preprocess(t) for t in texts]
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # with one thread, training is then reproducible
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type=model_type,
        vocab_size=vocab_size, hard_vocab_limit=False, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        user_defined_symbols=[NEWLINE, TAB] + BLANKS + SPECIAL_PIECES,
        byte_fallback=True, character_coverage=1.0,
        # identity: NFKC would turn "？" into "?" and break round trips of Chinese text;
        # keep spaces as they are (runs are already blank pieces).
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=False, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, VOCAB_FILE), "wb") as f:
        f.write(model.getvalue())
    config = dict(TOKEN_KEYS, remove_space=False, do_lower_case=False, num_image_tokens=0,
                  tokenizer_class="ChatGLMTokenizer")
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return ChatGLMTokenizer.from_pretrained(out_dir)


class StreamingDecoder:
    """tokenizer.decode(ids) for one list of ids that only grows (a streamed answer: each call passes the
    whole list so far), at a cost per call that does not grow with the list. A server decoding every
    answer in full for every chunk spent most of its event loop there (docs/serving.md).

    The SentencePiece text of all but the last few pieces is kept (extended every SETTLE pieces by the
    text of the pieces it adds, joined as below, or decoded in full where they cannot be joined, so what
    is kept is exact), and only the pieces after it are decoded, behind the last kept piece: SentencePiece
    drops the space in front of the first piece of a text, and the piece in front keeps the newer ones
    from being first. The join is taken only where it is safe: behind a
    plain piece (no byte, control or unknown piece) whose text ends in a whole character, and when the
    decoded continuation starts with that piece's own text; anywhere else the whole list is decoded.
    Postprocessing (newlines, runs of blanks) of the kept text is done once up to a cut with no "<" just
    before it (every replaced text starts with one, so none crosses the cut); the rest is postprocessed
    with each call."""

    SETTLE = 16         # pieces decoded behind the kept text before it is extended
    KEEP = 4            # pieces left out of the kept text when it is extended (a byte sequence may go on)
    LAG = 64            # characters of kept text left behind the postprocessing cut

    def __init__(self, tokenizer: ChatGLMTokenizer):
        self.tok = tokenizer
        self._pieces: List[int] = []      # SentencePiece ids of the ids seen so far
        self._seen = 0                    # how many ids those are
        self._kept = 0                    # leading pieces whose text is kept ...
        self._text = ""                   # ... and that text (SentencePiece's, before postprocess)
        self._retry = 0                   # no new try to extend it before this many pieces
        self._cut = 0                     # characters of the kept text whose postprocessed text ...
        self._head = ""                   # ... this is

    def decode(self, ids: Sequence[int]) -> str:
        if len(ids) < self._seen:         # not the same growing list: start over
            self.__init__(self.tok)
        self._pieces += self.tok._pieces(ids[self._seen:])
        self._seen = len(ids)
        if len(self._pieces) - self._kept > self.SETTLE and len(self._pieces) >= self._retry:
            self._settle()
        rest = self._continuation(self._pieces[self._kept:])
        if rest is None:
            return postprocess(self.tok.sp.decode(self._pieces))
        text = self._text
        if len(text) - self._cut >= 2 * self.LAG:
            cut = len(text) - self.LAG
            while cut > self._cut and "<" in text[max(0, cut - _LONGEST_PIECE):cut]:
                cut = text.rindex("<", max(0, cut - _LONGEST_PIECE), cut)
            if cut > self._cut:
                self._head += postprocess(text[self._cut:cut])
                self._cut = cut
        return self._head + postprocess(text[self._cut:] + rest)

    def _continuation(self, pieces: List[int]) -> Optional[str]:
        """The text `pieces` add after the kept text, or None when they cannot be joined there."""
        sp = self.tok.sp
        if not self._kept:
            return sp.decode(pieces)
        anchor = self._pieces[self._kept - 1]
        head = sp.decode([anchor])
        both = sp.decode([anchor] + pieces)
        return both[len(head):] if both.startswith(head) else None

    def _settle(self) -> None:
        """Keep the text of the pieces up to the last plain one before the final KEEP, when it ends in a
        whole character; otherwise try again KEEP pieces later."""
        sp = self.tok.sp
        self._retry = len(self._pieces) + self.KEEP
        upto = len(self._pieces) - self.KEEP
        while upto > self._kept and any(f(self._pieces[upto - 1]) for f in (sp.is_byte, sp.is_control, sp.is_unknown)):
            upto -= 1
        if upto <= self._kept:
            return
        joined = self._continuation(self._pieces[self._kept:upto])       # the kept text decoded once only
        text = self._text + joined if joined is not None else sp.decode(self._pieces[:upto])
        head = sp.decode([self._pieces[upto - 1]])
        if head and not text.endswith("\ufffd") and not head.endswith("\ufffd"):
            if not text.startswith(self._text[:self._cut]):     # not expected: postprocess it all again
                self._cut, self._head = 0, ""
            self._kept, self._text = upto, text
