"""The launcher of the multi-process tests: a hung torchrun worker fails its test with its stack; it
never hangs CI."""

import time

import psutil
import pytest

from tests.conftest import launch


def test_a_hung_worker_fails_the_test_and_is_killed(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, time\n\ndef wait_forever():\n    print('started', os.getpid(), flush=True)\n"
                      "    time.sleep(3600)\n\nwait_forever()\n")
    start = time.time()
    with pytest.raises(pytest.fail.Exception, match="ran past 15 s") as failure:  # torchrun starts in ~3 s idle,
        launch(str(script), [], nproc=2, timeout=15)                            # over 5 s on a busy 2-core machine
    assert time.time() - start < 45
    pids = [int(line.split()[-1]) for line in str(failure.value).splitlines() if line.startswith("started")]
    assert len(pids) == 2  # both workers had started, and their output came back
    assert str(failure.value).count("in wait_forever") >= 2  # and each one's stack, where it hung
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
