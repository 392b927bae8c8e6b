"""ChatGLMTokenizer as a transformers PreTrainedTokenizer, so that AutoTokenizer.from_pretrained(folder) works
after `import model.hf` without trust_remote_code.

It is a thin face over the chat core's tokenizer (model/tokenizer.py, plain sentencepiece): pieces, ids,
text normalisation, special tokens, [gMASK] <sop> and decoding all come from there, so the two cannot
disagree. The class keeps upstream's name because AutoTokenizer finds a local class by the
`tokenizer_class` of tokenizer_config.json, and the released THUDM/visualglm-6b folder says
"ChatGLMTokenizer". Pads on the left, as ChatGLM does.
"""
import os
import shutil
from typing import List, Optional

from transformers import PreTrainedTokenizer

from ..tokenizer import TOKEN_KEYS, VOCAB_FILE, ChatGLMTokenizer as CoreTokenizer


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, num_image_tokens: int = 0, remove_space: bool = False,
                 do_lower_case: bool = False, padding_side: str = "left", **kwargs):
        tokens = {k: str(getattr(kwargs[k], "content", kwargs[k])) for k in TOKEN_KEYS if kwargs.get(k) is not None}
        for k in TOKEN_KEYS:                                 # strings or AddedTokens (a saved config)
            kwargs.pop(k, None)
        self.core = CoreTokenizer(vocab_file, num_image_tokens=num_image_tokens, remove_space=remove_space,
                                  do_lower_case=do_lower_case, **tokens)
        self.vocab_file = vocab_file
        names = {k: getattr(self.core, k) for k in TOKEN_KEYS}     # every special string, defaults filled in
        super().__init__(num_image_tokens=num_image_tokens, remove_space=remove_space, do_lower_case=do_lower_case,
                         padding_side=padding_side, **names, **kwargs)

    # the ids the chat core and the model config use
    @property
    def gmask_token_id(self) -> int:
        return self.core.gmask_token_id

    @property
    def sop_token_id(self) -> int:
        return self.core.sop_token_id

    @property
    def eop_token_id(self) -> int:
        return self.core.eop_token_id

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    def get_vocab(self) -> dict:
        return self.core.get_vocab()

    # text <-> pieces <-> ids, all by the core
    def tokenize(self, text: str, **kwargs) -> List[str]:
        return self.core.tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.core.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.core.convert_tokens_to_ids(token)

    def _convert_id_to_token(self, index: int) -> Optional[str]:
        return self.core.convert_ids_to_tokens(int(index))

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.core.decode(self.core.convert_tokens_to_ids(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self.core.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None) -> List[int]:
        return self.core.build_inputs_with_special_tokens(token_ids_0, token_ids_1)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
