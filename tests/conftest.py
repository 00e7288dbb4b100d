"""Shared fixtures; the environment (8 CPU devices) is set in the root conftest.py."""

import jax
import pytest


@pytest.fixture(scope="session")
def mesh8():
  return jax.make_mesh((8,), ("data",))


@pytest.fixture(scope="session")
def mesh2x4():
  return jax.make_mesh((2, 4), ("node", "local"))


@pytest.fixture
def standard_promotion():
  """optax's adam mixes int32 counts with float32 under the hood (not strict-clean)."""
  with jax.numpy_dtype_promotion("standard"):
    yield


# Scripts that tests launch in other processes, not test modules.
collect_ignore = ["mp_scripts"]
