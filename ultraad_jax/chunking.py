"""Computing a vmapped function a few batch items at a time.

`jax.vmap(fn)` over many items makes every intermediate of `fn` that many
times larger. On CPU, once those intermediates reach tens of megabytes they
stream through main memory between XLA's kernels; computing a few items at a
time, in a loop inside the same compiled program, keeps them in cache
(docs/PERFORMANCE.md has the measurements).

* `map_in_chunks`: the caller picks the chunk (the train step's episode
  axis, `train.episode_chunk`).
* `chunked_vmap`: a function that picks its own chunk whenever it is vmapped
  over a large batch. The full-resolution map losses use it: they are by far
  the largest intermediates of the ViT training step, while the rest of the
  step runs fastest with all episodes at once.
"""

import jax
import jax.numpy as jnp


def map_in_chunks(fn, args, chunk):
  """`jax.vmap(fn)(*args)`, computed `chunk` items at a time.

  Args:
    fn: the function of one item.
    args: a tuple of pytrees, each with the batch axis leading.
    chunk: items at once (a divisor of the batch); 0, or the batch or more,
      is a plain vmap.

  Returns:
    What `jax.vmap(fn)(*args)` returns.

  Raises:
    ValueError: a chunk that does not divide the batch.
  """
  num = jax.tree.leaves(args)[0].shape[0]
  if chunk <= 0 or chunk >= num:
    return jax.vmap(fn)(*args)
  if num % chunk:
    raise ValueError(f"chunk {chunk} does not divide the batch of {num}.")
  loops = num // chunk
  # Item a * loops + b runs in iteration b. The chunk axis keeps the batch
  # axis's block sharding when the chunk is a multiple of the devices along
  # it: every device then works on its own items in every iteration, and
  # nothing crosses devices.
  split = lambda x: jnp.swapaxes(x.reshape((chunk, loops) + x.shape[1:]), 0, 1)
  merge = lambda x: jnp.swapaxes(x, 0, 1).reshape((num,) + x.shape[2:])
  out = jax.lax.map(lambda a: jax.vmap(fn)(*a), jax.tree.map(split, args))
  return jax.tree.map(merge, out)


def chunk_size(total, item_elements, target, multiple=1):
  """The largest chunk of `total` items whose elements fit `target`.

  Args:
    total: batch size.
    item_elements: elements of one item's largest intermediate.
    target: elements a chunk may hold.
    multiple: chunks must be multiples of this (devices along the batch
      axis); ignored when it does not divide `total`.

  Returns:
    A divisor of `total`: `total` itself when everything fits, else the
    largest fitting divisor (at least the smallest allowed one).
  """
  if total * item_elements <= target:
    return total
  if multiple < 1 or total % multiple:
    multiple = 1
  allowed = [d for d in range(multiple, total + 1, multiple) if total % d == 0]
  fitting = [d for d in allowed if d * item_elements <= target]
  return max(fitting) if fitting else allowed[0]


def chunked_vmap(fn, item_elements, target):
  """`fn`, which computes `chunk_size(...)` items at a time when vmapped.

  Unbatched, the result is `fn`. Under `jax.vmap` over B items it runs
  `map_in_chunks(fn, ..., chunk_size(B, item_elements, target, devices))`:
  the same values, with intermediates of at most about `target` elements.
  Only the innermost vmap chunks (an outer one batches the loop).

  Args:
    fn: a function of arrays (positional only), returning a pytree.
    item_elements: elements of `fn`'s largest intermediate for one item.
    target: elements a chunk may hold.

  Returns:
    The wrapped function. It is not differentiable: use it inside the
    forward or backward rule of a `jax.custom_vjp`.
  """
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    # Unbatched arguments are closed over rather than broadcast (no copies).
    def one(*items):
      items = iter(items)
      return fn(*(next(items) if b else a for a, b in zip(args, in_batched)))

    batched = tuple(a for a, b in zip(args, in_batched) if b)
    chunk = chunk_size(axis_size, item_elements, target, jax.device_count())
    out = map_in_chunks(one, batched, chunk)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped
