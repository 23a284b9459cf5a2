"""Test configuration in the spirit of equinox's: strict dtype promotion, rank promotion raises,
fixed keys, and the hypothesis seed printed so failures can be replayed."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
  """A fixed PRNG key: tests are deterministic."""
  return jax.random.key(0)
