"""trainer.coordination's client comes from a private JAX API (the coordination service's key-value store, through
shims.jax_coordination_client): this fails loudly when a JAX upgrade moves or changes it, calling every method docmix
uses the way it uses it, on a real one-process service (in a subprocess: jax.distributed must start before JAX does
anything else)."""
import subprocess
import sys

from tests.multiproc import REPO, free_port, process_env

SCRIPT = """
import json
from trainer import coordination
coordination.initialize(30, coordinator_address="localhost:{port}", num_processes=1, process_id=0)
c = coordination.client()
c.key_value_set("docmix/t/0", "a")
c.key_value_set("docmix/t/0", "b", allow_overwrite=True)
c.key_value_set("docmix/t/1", json.dumps({{"code": 2}}))
c.wait_at_barrier("docmix/b", 10_000)
got = sorted(c.key_value_dir_get("docmix/t/"))
c.key_value_delete("docmix/t/1")
print(json.dumps([got, c.key_value_dir_get("docmix/t/")]))
"""


def test_the_coordination_service_client_docmix_uses():
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(port=free_port())], cwd=REPO, env=process_env(1),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == ('[[["docmix/t/0", "b"], ["docmix/t/1", "{\\"code\\": 2}"]], '
                                                   '[["docmix/t/0", "b"]]]')
