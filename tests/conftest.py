"""Suite-wide pytest hooks.

The longest tests run first: with ``-n 2`` pytest-xdist hands the first items out alternately to the two workers,
so the two longest (each minutes long, measured with ``pytest --durations``) start at once on different workers
instead of leaving one worker busy alone at the end. Only the order changes; every test still runs.

One persistent JAX compilation cache serves the whole run (a fresh temporary folder, removed at the end): the two
xdist workers and every subprocess a test starts (train/sample CLIs, kill-and-resume runs, multi-host processes)
compile each identical program once instead of once per process or per new ``Trainer``. The cache is keyed by the
program, its options and the XLA flags, so it changes no result, only compile time.
"""
import os
import shutil
import tempfile

CACHE_ENV = "SVI_TEST_JAX_CACHE"

# the modules of the longest single tests, longest first (pytest --durations=60 on this 2-core machine:
# test_multihost 360 s, test_drift_experiment 215 s)
LONGEST_FIRST = ("tests/test_multihost.py", "tests/test_drift_experiment.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)   # stable: every other test keeps its collection order


def pytest_configure(config):
    if CACHE_ENV not in os.environ:      # the controller (or a run without xdist): make the run's cache
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="svi_jax_test_cache_")
        config.svi_cache_owner = True    # workers inherit the variable and share the folder
    cache = os.environ[CACHE_ENV]
    settings = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.3",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for k, v in settings.items():        # subprocesses inherit these; a user's own cache setting wins
        os.environ.setdefault(k, v)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
    if getattr(config, "svi_cache_owner", False):
        shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True)
