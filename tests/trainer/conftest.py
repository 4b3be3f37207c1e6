import pytest

from trainer import load_dataset


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_blas():
    # Small matrices gain nothing from BLAS threads, and on a busy 2-core machine spinning
    # BLAS threads make timings erratic; the service pins BLAS the same way.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def mnist1d():
    return load_dataset("mnist1d", seed=0)
