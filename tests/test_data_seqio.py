"""Optional-extra sources: TFDS through tfds.data_source (a tiny ArrayRecord dataset written here) and seqio.

These need the seqio extra (requirements-seqio.txt, with TensorFlow): tests/extras.py.
"""
from __future__ import annotations

import functools
import importlib

from tests import extras

pytestmark = extras.require("seqio")
from data.config import Component, MixtureConfig
from data.pipeline import build
from tests.test_data_util import word_tokenizer

TEXTS = ["a b c", "d e", "", "f g h i"]


def texts_of(tok, comp, seq_len):
    p = build(MixtureConfig(components=(comp,), weights={comp.name: 1.0}, tokenizer=str(tok), seq_len=seq_len,
                            batch_size=1, block_size=4))
    b = next(p.iterator)
    return p.encoder.decode(b["tokens"][0][b["segment_ids"][0] > 0]), p


def test_tfds_array_record_data_source(tmp_path):
    tfds = importlib.import_module("tensorflow_datasets")

    class TinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(TEXTS):
                yield i, {"text": t}

    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    tok = word_tokenizer(tmp_path / "tok")
    comp = Component("tf", kind="tfds", dataset="tiny_text", data_dir=str(tmp_path), shuffle=False)
    text, p = texts_of(tok, comp, 15)
    docs = sorted(d.strip() for d in text.split("</s>") if d.strip())  # TFDS orders examples by key hash
    assert docs == sorted(f"<s> {t}" for t in TEXTS if t)
    assert p.reports["tf"].empty == 1


def test_seqio_task_and_mixture_adapter(tmp_path):
    tf = importlib.import_module("tensorflow")
    seqio = importlib.import_module("seqio")

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"text": TEXTS})

    vocab = seqio.ByteVocabulary()
    features = {"targets": seqio.Feature(vocabulary=vocab, add_eos=False)}
    for name in ("docmix_test_a", "docmix_test_b"):
        if name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                               preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                                              seqio.preprocessors.tokenize], output_features=features)
    if "docmix_test_mix" in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove("docmix_test_mix")
    seqio.MixtureRegistry.add("docmix_test_mix", [("docmix_test_a", 1), ("docmix_test_b", 3)])
    tok = word_tokenizer(tmp_path / "tok")
    comp = Component("s", kind="seqio", dataset="docmix_test_a", text_field="targets", shuffle=False)
    text, p = texts_of(tok, comp, 15)
    assert text == "<s> a b c </s> <s> d e </s> <s> f g h i </s>"
    assert p.reports["s"].empty == 1
    mix = Component("m", kind="seqio", dataset="docmix_test_mix", text_field="targets", shuffle=False)
    _, p = texts_of(tok, mix, 15)
    assert p.documents_per_epoch["m"] == 6  # both tasks' 3 non-empty examples
