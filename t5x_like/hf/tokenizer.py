"""The tokenizer of a Hugging Face checkpoint directory, for text in and out.

`load(directory)` returns an object with `encode(text) -> ids` (no special tokens
added) and `decode(ids) -> text`, from the directory's SentencePiece model
(`tokenizer.model`: Llama 2; `spiece.model`: T5) or, failing that, its
`tokenizer.json` (the `tokenizers` package: Llama 3); None when it has none of them
(prompts must then be given as token ids). A missing package is a ValueError that
says which to install.
"""

from __future__ import annotations

import os
from typing import Protocol

from t5x_like import storage


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _SentencePiece:
    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError as e:
            raise ValueError(f"{path} is a SentencePiece model, which needs the "
                             "sentencepiece package — pip install sentencepiece") from e
        self._model = sentencepiece.SentencePieceProcessor(
            model_proto=storage.path(path).read_bytes())     # local or in a bucket

    def encode(self, text: str) -> list[int]:
        return list(self._model.encode(text))

    def decode(self, ids: list[int]) -> str:
        """Ids past the model's pieces are T5's sentinels, 100 of them counted down
        from the top (<extra_id_0> is the highest id), as T5's tokenizer writes them."""
        pieces = self._model.get_piece_size()
        text, run = [], []
        for i in ids:
            if i < pieces:
                run.append(int(i))
                continue
            text.append(self._model.decode(run))
            run = []
            text.append(f"<extra_id_{pieces + 99 - int(i)}>")
        return "".join(text + [self._model.decode(run)])


class _TokenizersJson:
    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as e:
            raise ValueError(f"{os.path.dirname(path)} has only tokenizer.json, which needs "
                             "the tokenizers package — pip install tokenizers, or give "
                             "prompts as input_ids") from e
        self._tokenizer = tokenizers.Tokenizer.from_str(storage.read_text(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids))


def load(directory: str) -> Tokenizer | None:
    for name in ("tokenizer.model", "spiece.model"):
        if storage.exists(storage.join(directory, name)):
            return _SentencePiece(storage.join(directory, name))
    tokenizer_json = storage.join(directory, "tokenizer.json")
    if storage.exists(tokenizer_json):
        return _TokenizersJson(tokenizer_json)
    return None
