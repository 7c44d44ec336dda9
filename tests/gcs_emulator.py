"""The tests' GCS emulator is the package's (launch.emulator, also the bucket of `launch.tpu --rehearse`): a local
in-memory GCS server with the bucket `BUCKET`, whose requests tests can record and make fail."""
from launch.emulator import BUCKET, Served, client_env, emulator, failing, recording  # noqa: F401
