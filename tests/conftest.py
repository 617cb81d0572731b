"""Shared fixtures. jaxtyping's import hook checks the shape annotations of spd/ at run time in tests.

spd.ci is left out: its networks are torch.compile'd, and dynamo cannot trace through beartype's wrappers.

The hook decorates nested functions too, and decorating costs ~1 ms (beartype compiles a checker) each time the
enclosing function runs. Closures made on every call of a hot path (the patched forwards of every model pass) are
therefore marked `@typing.no_type_check`, which the hook skips; they carry no shape annotations to check. Without
that the checks made the toy end-to-end tests ~4x slower than the same runs outside pytest
(tests/test_model.py::test_passes_build_no_checkers_per_call guards it).
"""

from jaxtyping import install_import_hook

CHECKED = [
    "spd.ablate",
    "spd.adversarial",
    "spd.apd",
    "spd.cluster",
    "spd.components",
    "spd.ground_truth",
    "spd.lm_metrics",
    "spd.losses",
    "spd.masks",
    "spd.mechanisms",
    "spd.model",
    "spd.sigmoids",
    "spd.unlearning",
]

with install_import_hook(CHECKED, "beartype.beartype"):
    import spd.ablate  # noqa: F401
    import spd.adversarial  # noqa: F401
    import spd.apd  # noqa: F401
    import spd.cluster  # noqa: F401
    import spd.components  # noqa: F401
    import spd.ground_truth  # noqa: F401
    import spd.lm_metrics  # noqa: F401
    import spd.losses  # noqa: F401
    import spd.masks  # noqa: F401
    import spd.mechanisms  # noqa: F401
    import spd.model  # noqa: F401
    import spd.sigmoids  # noqa: F401
    import spd.unlearning  # noqa: F401

import os

import pytest
import torch
from torch import nn

# Under pytest-xdist (`make test`: one worker per core) each worker gets its share of the cores. Toy-sized steps
# gain only ~1.4x from a second torch thread, so two 1-thread workers do a little more: the whole suite took
# 1047-1156 s that way against 1265 s serially on a 2-core CPU (each long test runs ~1.6-2x slower beside another).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from spd.ci import CIConfig
from spd.model import ComponentModel, ModuleSpec


class TwoLayer(nn.Module):
    """x -> fc1 (3 -> 4) -> ReLU -> fc2 (4 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def two_layer() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()


@pytest.fixture
def cm(two_layer: TwoLayer) -> ComponentModel:
    torch.manual_seed(1)
    return ComponentModel(two_layer, [ModuleSpec(pattern="fc*", C=5)], CIConfig(type="mlp", hidden=[4]))


@pytest.fixture(scope="session")
def tms_5_2_fast(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """TMS 5-2 decomposed once per session on its reduced schedule, into a run directory, logging every 20 steps:
    (run, results). The recovery, diagnostics and ablation tests read this one run instead of training three
    (~90 s each on a 2-core CPU); none of them changes it (ablations edit copies of the target).

    Under pytest-xdist the run lives in the directory all workers share: the first worker to ask trains it
    (holding a file lock), the others wait and load it (`load_run` and its eval.json). xdist's loadgroup would keep
    the three tests on one worker instead, but it does not group under pytest 9.2 (pytest-xdist issue 1386)."""
    import json

    from filelock import FileLock

    from spd import io
    from spd.config import load_config
    from spd.run import decompose, load_run
    from toy_models import TOYS

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above every worker's own
    run_dir = root / "tms_5_2_fast" / "run"
    with FileLock(str(root / "tms_5_2_fast.lock")):
        if (run_dir / io.EVAL).is_file():
            return load_run(run_dir), json.loads((run_dir / io.EVAL).read_text())
        toy = TOYS["tms_5-2"]
        cfg = load_config(toy.config_path, [*toy.fast, "train.log_every=20"])
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        return decompose(cfg, run_dir, progress=False)


# ---- test order under pytest-xdist ------------------------------------------------------------------------
# With `--dist worksteal` each of k workers is first given a contiguous k-th of the collected tests, and a worker
# that runs dry steals the back half of the longest remaining queue. In file order the long recovery tests all sat
# in the second half, so one worker ran most of them (and waited on the shared TMS 5-2 run's lock) while the other
# finished its share and stole short tests. `balanced_order` spreads the long tests over the k shares (longest
# first, each to the least loaded share) and puts each share's long tests at its front, where stealing, which
# takes from the back, leaves them. Seconds: what each took under `make test` on the 2-core CPU (2026-12-04);
# every other test takes under 12 s and counts as SHORT_S.
RECOVERY = "test_recovery.py::test_recovers_ground_truth_on_the_reduced_schedule"
EXPECTED_S = {
    f"{RECOVERY}[tms_40-10-id]": 234.0,
    f"{RECOVERY}[tms_40-10]": 167.0,
    f"{RECOVERY}[resid_mlp1]": 111.0,
    f"{RECOVERY}[induction]": 75.0,
    f"{RECOVERY}[tms_5-2-id]": 58.0,
    f"{RECOVERY}[tms_5-2]": 47.0,  # trains the shared TMS 5-2 run (the fixture tms_5_2_fast)
    "test_apd.py::test_apd_recovers_tms_5_2_with_the_papers_shrinkage": 42.0,
    f"{RECOVERY}[cyclic]": 40.0,
    "test_diagnostics.py::test_diagnostics_on_real_tiny_runs": 23.0,
}
# The readers of the shared TMS 5-2 run go to one share, in this order, so that none waits on another's lock.
SHARED_TMS_5_2 = [
    f"{RECOVERY}[tms_5-2]",
    "test_ablate.py::test_forgetting_each_feature_of_a_decomposed_tms",
    "test_diagnostics.py::test_diagnostics_on_real_tiny_runs",
]
SHORT_S = 0.3


def _key(item: pytest.Item) -> str:
    return item.nodeid.rsplit("/", 1)[-1]


def balanced_order(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """`items` reordered so that the i-th contiguous share handed to worker i (sizes as xdist's scheduler makes
    them: remaining // workers left) holds about 1/workers of the expected seconds, its long tests first."""
    sizes, left = [], len(items)
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    shared = [it for k in SHARED_TMS_5_2 for it in items if _key(it) == k]
    units = [shared] if shared else []
    units += [[it] for it in items if _key(it) in EXPECTED_S and it not in shared]
    cost = lambda unit: sum(EXPECTED_S.get(_key(it), SHORT_S) for it in unit)  # noqa: E731
    shares: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for unit in sorted(units, key=cost, reverse=True):
        fits = [i for i in range(workers) if len(shares[i]) + len(unit) <= sizes[i]]
        if not fits:  # too few tests for the shares' sizes: keep the collected order
            return items
        i = min(fits, key=lambda j: load[j])
        shares[i] += unit
        load[i] += cost(unit)
    placed = {id(it) for share in shares for it in share}
    rest = iter(it for it in items if id(it) not in placed)
    for i in sorted(range(workers), key=lambda j: load[j]):  # short tests fill the shares, least loaded first
        shares[i] += [next(rest) for _ in range(sizes[i] - len(shares[i]))]
    return [it for share in shares for it in share]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist worksteal` (`make test`), collect the tests in `balanced_order`. Only the workers collect; they
    do not see the controller's --dist option (it reads "no" there), so the controller's command line is read."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    main_argv = getattr(config, "workerinput", {}).get("mainargv", [])
    if workers > 1 and any("worksteal" in arg for arg in main_argv):
        items[:] = balanced_order(items, workers)
