"""Records -> tokenized documents for one component: validation at scan time, encoding inside the Grain map."""
from __future__ import annotations

from typing import Any

import numpy as np

from data import sft
from data.config import Component
from data.records import BadRecord
from data.tokenize import TextEncoder


class DocumentEncoder:
    """check(record) validates a record at start-up; encoder(record) -> {"tokens", "weights", "doc_pos"}.

    tokens int32 [n], weights float32 [n] (target weights), doc_pos int32 [n] (position in the whole document;
    packing uses it to count documents, it never reaches the batch).
    """

    def __init__(self, component: Component, encoder: TextEncoder):
        self.component = component
        self.encoder = encoder
        if component.format != "text" and not encoder.chat_template:
            raise ValueError(f"component {component.name!r}: format={component.format!r} needs a chat template "
                             f"(tokenizer_config.json 'chat_template' or chat_template.jinja next to the tokenizer)")

    def check(self, record: dict) -> bool:
        """False for an empty document; raises BadRecord for an unusable one."""
        fmt = self.component.format
        if fmt == "text":
            field = self.component.text_field
            if field not in record:
                raise BadRecord(f"missing text field {field!r}")
            if not isinstance(record[field], str):
                raise BadRecord(f"text field {field!r} is {type(record[field]).__name__}, not a string")
            return bool(record[field].strip())
        messages = sft.messages_of(record, fmt)
        if not sft.has_assistant_text(messages):
            return False
        # Render now, so a record the template cannot split into trainable pieces is skipped and counted at start-up
        # rather than raised from inside the training loop.
        pieces = sft.render_pieces(messages, self.encoder.chat_template, bos_text=self.encoder.bos_text,
                                   eos_text=self.encoder.eos_text)
        return any(trainable and text.strip() for text, trainable in pieces)

    def __call__(self, record: dict) -> dict[str, Any]:
        c, enc = self.component, self.encoder
        if c.format == "text":
            pieces = [(c.prefix, False), (record[c.text_field], True)]
            out = enc.encode(pieces, weight=c.loss_weight, bos=True, eos=True)
        else:
            pieces = sft.render_pieces(sft.messages_of(record, c.format), enc.chat_template,
                                       bos_text=enc.bos_text, eos_text=enc.eos_text)
            if c.prefix:
                pieces = [(c.prefix, False)] + pieces
            out = enc.encode(pieces, weight=c.loss_weight, bos=True, eos=False)
        return {"tokens": out.tokens, "weights": out.weights, "doc_pos": np.arange(len(out.tokens), dtype=np.int32)}
