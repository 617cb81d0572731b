"""The suite's own scheduling helper (tests/conftest.py): long tests spread over the workers' shares."""

from types import SimpleNamespace

from conftest import EXPECTED_S, RECOVERY, SHARED_TMS_5_2, _key, balanced_order


def _items(names: list[str]) -> list:
    return [SimpleNamespace(nodeid=f"tests/{n}") for n in names]


def test_long_tests_are_spread_over_the_shares_and_lead_them():
    shorts = [f"test_x.py::test_{i}" for i in range(40)]
    names = shorts[:20] + list(EXPECTED_S) + ["test_ablate.py::test_forgetting_each_feature_of_a_decomposed_tms"]
    names += shorts[20:]
    items = _items(names)
    order = balanced_order(items, 2)
    assert sorted(id(it) for it in order) == sorted(id(it) for it in items)  # a permutation
    half = len(order) // 2  # xdist's worksteal hands worker 0 the first len // 2 tests
    shares = [order[:half], order[half:]]
    load = [sum(EXPECTED_S.get(_key(it), 0.0) for it in share) for share in shares]
    assert abs(load[0] - load[1]) <= 0.15 * sum(load)
    for share in shares:  # each share's long tests come first, where stealing (from the back) leaves them
        long_flags = [_key(it) in {*EXPECTED_S, *SHARED_TMS_5_2} for it in share]
        assert long_flags == sorted(long_flags, reverse=True)
    # the readers of the shared TMS 5-2 run are in one share, the one that trains it first
    keys = [_key(it) for it in order]
    pos = [keys.index(k) for k in SHARED_TMS_5_2]
    assert pos == sorted(pos) and len({p < half for p in pos}) == 1
    assert keys[pos[0]] == f"{RECOVERY}[tms_5-2]"


def test_too_few_tests_keep_the_collected_order():
    items = _items(SHARED_TMS_5_2)  # one unit of 3 tests; the two shares hold 1 and 2
    assert balanced_order(items, 2) is items
