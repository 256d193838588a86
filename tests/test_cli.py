"""The main job runs end to end: `mechgpu demo` trains with every optimizer beside torch's."""

import os
import re
import subprocess
import sys


def test_demo_runs_and_matches_torch():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "mechgpu", "demo", "--steps", "4", "--batch", "8"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines()
            if re.match(r"^(Adam|AdamW amsgrad|RMSprop centered|SGD nesterov) ", line)]
    assert len(rows) == 4, out.stdout
    for row in rows:
        ours_loss, torch_loss, diff = (float(x) for x in row.split()[-5:-2])
        assert abs(ours_loss - torch_loss) < 1e-4 and diff < 1e-5, row
