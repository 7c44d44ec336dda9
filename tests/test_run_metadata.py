"""The run's tokenizer copy is the configured file, whatever its name."""
from data import tokenize
from trainer import run_metadata


def test_copy_tokenizer_uses_the_configured_file_not_a_neighbour(tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "my_tokenizer.json").write_text('{"configured": true}')
    (src / "tokenizer.json").write_text('{"decoy": true}')  # a different tokenizer next to it must not be shipped
    (src / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    out = run_metadata.copy_tokenizer(src / "my_tokenizer.json", tmp_path / "run")
    assert (out / "tokenizer.json").read_text() == '{"configured": true}'
    assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "</s>"}'
    assert tokenize.tokenizer_sha256(out) == tokenize.tokenizer_sha256(src / "my_tokenizer.json")
