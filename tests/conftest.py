"""Test-run hygiene.

Every compiled XLA program maps its code and data into the process. One
pytest process running the whole suite kept ~65k such mappings alive, the
Linux default `vm.max_map_count`, and XLA's next compile then segfaulted
(seen in `test_window_attention`, the suite's last module). The programs of
each test module are released when it ends; modules whose every test compiles
a grid of decodes (batch invariance, the block cache) release them after each
test (`release_after_each_test`), since one such module alone went past the limit.
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def release_after_each_test():
    """Use as `pytestmark = pytest.mark.usefixtures("release_after_each_test")` in a module whose
    tests each compile many programs."""
    yield
    jax.clear_caches()
    gc.collect()
