"""Every case of the correctness database (mechgpu.testing: configs, inputs, float64 or torch
oracles, per-dtype tolerances), run by pytest at full size, one test per case.

`mechgpu check` runs the same cases on a user's device; the other test files keep the
behaviour the database does not cover (errors, state_dict, caching, layouts, distributed).
On CPU the kernels run in triton's interpreter; with a GPU the cases run on it.
"""

from __future__ import annotations

import pytest
from conftest import KERNEL_DEVICE

from mechgpu.testing import check

SEED = check.fresh_seed()  # fresh inputs every run; a failure names the seed that repeats it

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf inputs


@pytest.mark.parametrize("case", list(check.CASES))
def test_case(case):
    rows = check.run_checks(KERNEL_DEVICE, quick=False, only=[case], seed=SEED, exact=True)
    assert rows and {r.case for r in rows} == {case}
    failed = [f"{r.check} / {r.dtype}: {r.note or f'err/tol {r.err_over_tol:.3g}'}" for r in rows if not r.passed]
    assert not failed, (f"{case} (seed {SEED}; repeat with `mechgpu check --only {case} --seed {SEED}`):\n"
                        + "\n".join(failed))
