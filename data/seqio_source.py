"""Adapter for existing seqio registries: a Task's (or a Mixture's tasks') examples become documents.

seqio and TensorFlow are an optional extra (requirements-seqio.txt). The adapter reads the task's split once, without
shuffling, through the task's own preprocessors, and takes `Component.text_field` (for seqio usually "targets"):
a string feature is used as is; a token-id feature is decoded with the task's vocabulary, then re-tokenized with the
mixture's tokenizer. A Mixture contributes the union of its tasks' examples: its seqio rates are not used, mix with
docmix weights instead (one component per task for exact shares).
"""
from __future__ import annotations

import numpy as np

from data.config import Component


def seqio_records(component: Component) -> list[dict]:
    """[{text_field: str or UTF-8 bytes}, ...] for every example of the task(s), in order."""
    try:
        import seqio
    except ImportError as e:
        raise ImportError(f"component {component.name!r}: kind='seqio' needs the optional extra: "
                          "pip install -r requirements-seqio.txt") from e
    provider = seqio.get_mixture_or_task(component.dataset)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    field = component.text_field
    records = []
    for task in tasks:
        ds = task.get_dataset(sequence_length=None, split=component.split, shuffle=False, num_epochs=1,
                              use_cached=False)
        feature = task.output_features.get(field)
        for example in ds.as_numpy_iterator():
            if field not in example:
                raise ValueError(f"component {component.name!r}: seqio task {task.name!r} has no feature {field!r}; "
                                 f"features: {sorted(example)}")
            value = example[field]
            if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
                if feature is None:
                    raise ValueError(f"component {component.name!r}: feature {field!r} of task {task.name!r} holds "
                                     "token ids but the task declares no vocabulary to decode them")
                value = feature.vocabulary.decode(value.tolist())
            records.append({field: value})
    return records
