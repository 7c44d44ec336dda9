"""The tests' GCS emulator is the package's (launch.emulator, also the bucket of `launch.tpu --rehearse`): a local
in-memory GCS server with the bucket `BUCKET`."""
from launch.emulator import BUCKET, client_env, emulator  # noqa: F401
