"""Tests of several training steps per compiled call (`train.train_steps`).

A call of n steps must give what n calls of `train.train_step` give, run any
n up to its maximum without recompiling, and end wherever the host has work
to do (`train.call_lengths`).
"""

import jax
import numpy as np
import pytest

import engine_helpers
from configs import common
from ultraad_jax import train


@pytest.mark.parametrize(
    "start,total,max_steps,events,want",
    [
        # Events every 10 steps and after the first: 1, 9, 10, 10.
        (0, 30, 100, {1, 10, 20}, [1, 9, 10, 10]),
        # At most 4 a call between the same events.
        (0, 30, 4, {1, 10, 20}, [1, 4, 4, 1, 4, 4, 2, 4, 4, 2]),
        # Resumed at step 12: events before it are past.
        (12, 30, 100, {1, 10, 20}, [8, 10]),
        # Events at or beyond the end change nothing.
        (0, 5, 100, {5, 7, 50}, [5]),
        # One step a call.
        (3, 6, 1, set(), [1, 1, 1]),
        # Nothing left to run.
        (6, 6, 10, {1}, []),
    ],
)
def test_call_lengths(start, total, max_steps, events, want):
  got = train.call_lengths(start, total, max_steps, events)
  assert got == want
  assert sum(got) == total - start


@pytest.mark.parametrize(
    "overrides,start,validating,want",
    [
        # The base config: log every 10 steps, checkpoint every 50.
        ({}, 0, False, [1, 9, 10, 10]),
        # Capped at 4 steps a call.
        ({"train.steps_per_call": 4}, 0, False,
         [1, 4, 4, 1, 4, 4, 2, 4, 4, 2]),  # fmt: skip
        # Validation every 5 steps ends calls too, but only when validating.
        ({"train.val_every": 5}, 0, True, [1, 4, 5, 5, 5, 5, 5]),
        ({"train.val_every": 5}, 0, False, [1, 9, 10, 10]),
        # The profiled steps (after 2 warm-up steps) are a call each.
        ({"profile_steps": 3}, 0, False, [1, 1, 1, 1, 1, 5, 10, 10]),
        # Resumed at step 12, profiling steps 15 to 17.
        ({"profile_steps": 3}, 12, False, [2, 1, 1, 1, 3, 10]),
    ],
)
def test_call_plan_follows_the_run_config(overrides, start, validating, want):
  config = common.get_base_config()
  config.train.steps = 30
  for key, value in overrides.items():
    engine_helpers.set_key(config, key, value)
  got = train.call_plan(config, start, 30, validating=validating)
  assert got == want


def test_a_call_of_n_steps_equals_n_single_steps(step_inputs):
  state, *args = step_inputs["args"]
  step = engine_helpers.jit_engine_fn(train.train_step, step_inputs)
  want_state, want_rows = state, []
  for _ in range(3):
    want_state, metrics = step(want_state, *args)
    want_rows.append(metrics)

  before = dict(train.TRACE_COUNTS)
  steps = engine_helpers.jit_engine_fn(
      train.train_steps, step_inputs, max_steps=4
  )
  got_state, rows = steps(state, *args, np.int32(3))
  assert int(got_state["step"]) == 3
  for a, b, b0 in zip(jax.tree.leaves(got_state["params"]),
                      jax.tree.leaves(want_state["params"]),
                      jax.tree.leaves(state["params"])):  # fmt: skip
    # Not a no-op comparison: three steps moved every leaf that trains.
    update = float(np.max(np.abs(np.asarray(b) - np.asarray(b0))))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5 * update)
  assert set(rows) == set(want_rows[0])
  for name, got in rows.items():
    assert got.shape == (4,) + want_rows[0][name].shape, name
    for i in range(3):
      np.testing.assert_allclose(
          got[i],
          want_rows[i][name],
          rtol=1e-5,
          atol=1e-6,
          err_msg=f"{name} step {i}",
      )
    np.testing.assert_array_equal(got[3], 0)  # not run
  # The losses of successive steps differ: each row is its own step.
  assert not np.allclose(rows["loss"][0], rows["loss"][2])

  # Another call length reuses the compiled call.
  steps(state, *args, np.int32(1))
  assert train.TRACE_COUNTS["train_steps"] == before["train_steps"] + 1
