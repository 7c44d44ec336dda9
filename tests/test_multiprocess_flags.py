"""train.py's flags for joining a multi-process run: refused without --distributed, and a bad process layout is a
one-line error (exit 2) before any training."""
import threading

import pytest

import train


def test_cluster_flags_need_distributed(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--process_id=1", "--num_processes=2"])
    assert e.value.code == 2
    assert "--num_processes, --process_id: only with --distributed" in capsys.readouterr().err


def test_bad_process_layout_exits_2(capsys):
    # Validated by jax.distributed.initialize before it connects to anything.
    code = train.main(["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--distributed",
                       "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "jax.distributed.initialize" in err and "process_id" in err
    # Nothing of the failed join outlives it: its give-up timer would end this process (os._exit) later.
    joining = [t for t in threading.enumerate() if t.name == "docmix-pod-join"]
    for t in joining:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in joining)
