"""Suite-wide pytest hooks.

The longest tests run first: with ``-n 2`` pytest-xdist hands the first items out alternately to the two workers,
so the two longest (each minutes long, measured with ``pytest --durations``) start at once on different workers
instead of leaving one worker busy alone at the end. Only the order changes; every test still runs.
"""

# the modules of the longest single tests, longest first (pytest --durations=60 on this 2-core machine:
# test_multihost 360 s, test_drift_experiment 215 s)
LONGEST_FIRST = ("tests/test_multihost.py", "tests/test_drift_experiment.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)   # stable: every other test keeps its collection order
