"""Runs Mosaic GPU kernels (the Hopper flash kernels) on a CPU: jax's Mosaic GPU interpreter, with three gaps filled.

jax 0.11 ships an interpreter for Mosaic GPU kernels (`plgpu.InterpretGPUParams`): it runs each warpgroup as a
thread over simulated shared memory, TMA copies and mbarriers. FlashAttention-3's kernels use three things it does
not handle yet; `install(monkeypatch)` teaches it them for one test:
  * `pl.run_state` (a WGMMA accumulator carried through a loop, as in `acc = run_state(pv)(ACC.init(acc))`): the
    interpreter has no rule for it (its own TODO) and fails to lower the kernel. It is rewritten into the
    `run_scoped` the interpreter knows: each value goes into a scoped register buffer, the body runs on the
    buffers, and the buffers' final values are the results.
  * `wgmma` with its A operand in registers (P @ V, P being the softmax in registers): the interpreter reads A from
    a buffer only, so the value is staged in a register buffer for the multiply.
  * a producer warpgroup that stops waiting on a barrier before its last phases (FA3's producer does not wait for
    the consumers' final "slot consumed" arrivals): the interpreter refuses to free such a barrier; a GPU frees it.
Written against jax 0.11.2's interpreter (`jax._src.pallas.mosaic_gpu.interpret`, private API); on jax 0.10.2
there is no interpreter and `available()` is False.
"""

from jax.experimental.pallas import mosaic_gpu as plgpu


def available() -> bool:
  return hasattr(plgpu, "InterpretGPUParams")


def install(monkeypatch) -> None:
  """Patches the interpreter for the calling test (`monkeypatch` undoes it)."""
  from jax._src import api_util, config
  from jax._src import core as jax_core
  from jax._src import linear_util as lu
  from jax._src.interpreters import partial_eval as pe
  from jax._src.pallas import primitives as pallas_primitives
  from jax._src.pallas.mosaic_gpu import core as mgpu_core
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory
  from jax._src.state import discharge
  from jax._src.state import primitives as state_primitives
  from jax._src.state import types as state_types

  interpreter = jaxpr_interpret.JaxprInterpreter
  registers = mgpu_core.MemorySpace.REGS

  class _Registers:  # a scoped allocation type: a register buffer of the aval's shape (an accumulator stays one)
    def __init__(self, aval):
      self.aval = aval

    def get_ref_aval(self):
      if isinstance(self.aval, mgpu_core.WGMMAAbstractAccumulatorRef):
        return mgpu_core.WGMMAAbstractAccumulatorRef(self.aval.inner_aval, registers)
      return state_types.AbstractRef(self.aval.inner_aval, registers)

  def as_run_scoped(eqn):
    """The equations of a run_scoped that computes what `eqn`, a run_state, does."""
    body = eqn.params["jaxpr"]
    in_avals = [v.aval for v in eqn.invars]
    is_ref = [isinstance(a, state_types.AbstractRef) for a in in_avals]  # refs of the enclosing scope pass through
    types = [_Registers(v.aval) for v, ref in zip(body.invars, is_ref) if not ref]

    def replacement(*args):
      values = [a for a, ref in zip(args, is_ref) if not ref]

      def scoped(*buffers):
        it = iter(buffers)
        refs = [a if ref else next(it) for a, ref in zip(args, is_ref)]
        for buffer, value in zip(buffers, values):
          state_primitives.ref_set(buffer, (), value)
        jax_core.eval_jaxpr(body, [], *refs)
        return [state_primitives.ref_get(buffer, ()) for buffer in buffers]

      finals = iter(pallas_primitives.run_scoped(scoped, *types))
      return [a if ref else next(finals) for a, ref in zip(args, is_ref)]

    debug = api_util.debug_info("run_state as run_scoped", replacement, tuple(in_avals), {})
    with config.mutable_array_checks(False):
      jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(lu.wrap_init(replacement, debug_info=debug), in_avals)
    assert not consts and not jaxpr.constvars
    inputs = dict(zip(jaxpr.invars, eqn.invars))
    outputs = {inner: outer for inner, outer in zip(jaxpr.outvars, eqn.outvars) if isinstance(inner, jax_core.Var)
               and inner not in inputs}
    return [e.replace(invars=[inputs.get(v, v) if isinstance(v, jax_core.Var) else v for v in e.invars],
                      outvars=[outputs.get(v, v) for v in e.outvars]) for e in jaxpr.eqns]

  interpret = interpreter.interpret

  def interpret_with_run_state(self, jaxpr, token, *args):
    if any(e.primitive is discharge.run_state_p for e in jaxpr.eqns):
      eqns = [new for e in jaxpr.eqns
              for new in (as_run_scoped(e) if e.primitive is discharge.run_state_p else [e])]
      jaxpr = jaxpr.replace(eqns=eqns)
    return interpret(self, jaxpr, token, *args)

  wgmma = interpreter._interpret_wgmma_ref_p

  def wgmma_with_a_in_registers(self, eqn, token, get_invals):
    if isinstance(eqn.invars[1].aval, state_types.AbstractRef):
      return wgmma(self, eqn, token, get_invals)
    invals = list(get_invals())
    token, request = gpu_callbacks.call_make_allocation_request_array(
        token=token, compute_unit=self.thread, memory_space_id=shared_memory.get_memory_space_idx(registers))
    token, key = gpu_callbacks.call_allocate_buffer(token=token, mesh_location=self.mesh_location, thread=self.thread,
                                                    allocation_request_as_array=request, value=invals[1],
                                                    source_info=eqn.source_info)
    staged = eqn.replace(invars=[eqn.invars[0], jax_core.Var(state_types.AbstractRef(eqn.invars[1].aval, registers)),
                                 *eqn.invars[2:]])
    invals[1] = key
    token, out = wgmma(self, staged, token, lambda: invals)
    token = gpu_callbacks.call_deallocate_buffer(token=token, mesh_location=self.mesh_location, thread=self.thread,
                                                 allocation_key_as_array=key, source_info=eqn.source_info)
    return token, out

  deallocate = shared_memory.Barrier.deallocate

  def deallocate_like_a_gpu(self):
    with self.cv:
      if self.ref_count == 1:  # the last reference: phases a thread did not wait for are no error on a GPU
        for thread in self.last_observed_phase_by_thread:
          self.last_observed_phase_by_thread[thread] = self.phase
    return deallocate(self)

  monkeypatch.setattr(interpreter, "interpret", interpret_with_run_state)
  monkeypatch.setattr(interpreter, "_interpret_wgmma_ref_p", wgmma_with_a_in_registers)
  monkeypatch.setattr(shared_memory.Barrier, "deallocate", deallocate_like_a_gpu)


def interpreting():
  """The context under which Mosaic GPU kernels traced in it run in the interpreter."""
  return plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams())

