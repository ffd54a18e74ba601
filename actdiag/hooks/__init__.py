"""Attaching to modules and tensors, and the on-device statistic kernels. Nothing else lives here.

Design (sync-free by construction)
----------------------------------
* **Only recorded steps are hooked.** `Recorder.begin(step)` registers torch's global module forward hooks (two for
  the process, passing over modules of other models; `functional.ForwardTracker.install`) and a post-accumulate-grad
  hook on each parameter (a small float32 CPU parameter's only notes it: a callback queued on that backward pass
  copies all of them, weights and gradients, a size at a time when it ends); `Recorder.end()` removes them all (or
  keeps them, inert, when the next step is recorded too: every=1). Steps that are not recorded run with no hook
  registered, so no extra kernel, no Python call and no synchronisation happens on them.
* **Gradients of activations come from tensor hooks**: the forward hook calls `output.register_hook(...)`. Full
  backward module hooks break on `ReLU(inplace=True)` and `x += y` (pytorch#61519); a tensor hook registered before
  an in-place op receives the gradient with respect to the tensor as it was when the hook was registered, which is
  exactly the module's output.
* **Statistics are computed in the hook, on the tensor's device** (`stats.tensor_stats`): a handful of reductions
  produce one small float64 vector per tensor, laid out by `layout.STATS` (named slots: moments, min/max, zero
  count; then a linear and an exponent histogram). Computing inside the hook matters: an in-place op later in the
  forward pass would change the values. Two kernel paths compute it, each exact or estimated: the host path
  (`host.py`, numpy on the CPU) and the device path (`device.py`, branch-free device ops: CUDA's). Small tensors
  (at most `sample_cap` elements: biases, norm weights and their gradients) are copied in the hook instead and
  measured all together in `end()` (`host.HostBatch`, `device.DeviceBatch`): dozens of them per step cost more in
  per-call overhead (or kernel launches) than in arithmetic. So are the samples of large tensors when statistics
  are estimated (below): the hook reads the tensor once for its exact parts and copies its sample, `end()` does
  the rest for all of them (`bench/count_ops.py` counts the launches). No `.item()`, no `.cpu()`: on CUDA binning
  uses `histc` with constant bounds (CUDA `bincount` reads its maximum back to the host).
* **One read-back per recorded step.** The vectors are kept in a dict for the step; `end()` concatenates them per
  device and copies once to the host, where numpy splits and decodes them into frozen `TensorStats`. No tensor is
  kept past its step: the dict is emptied, the weight snapshots for the update ratio are dropped.
* **Purity.** Hooks return None (outputs and gradients are untouched), nothing draws from the user's RNG (the
  histogram sample index comes from a private generator), autocast is switched off inside the kernels (so half
  precision inputs are reduced in float32 and our ops do not change the user's autocast cache), and stale tensor
  hooks from an earlier step are ignored.
* **Large tensors**: histograms use at most `sample_cap` elements (8192; 4096 when `watch` records more often than
  every 10 steps) chosen by a fixed pseudo-random index and say so (`sampled`). Count, mean, min, max and the
  non-finite count always use every element. With exact statistics (the default when recording every 10 steps or
  less often, and always in `inspect`), so do the spread, the zeros and the update ratios. Recording more often,
  those come from the same sample and the record names them (`TensorStats.estimated`): passes over every element
  of every tensor were most of a recorded step's cost (BENCHMARKS.md). A CPU tensor with a non-finite value takes
  the exact path.
* **Across ranks** (`merge.StepMerger`): one collective per recorded step gathers every rank's vectors, merged slot
  by slot by the rule beside each slot in `layout.STATS`.

The submodules are imported by name (`actdiag.hooks.stats`, `actdiag.hooks.recorder`); this package imports none of
them itself, so importing the kernels never drags in the recorder. Imports point down: recorder -> merge, updates,
stats -> host, device -> layout, sampling.
"""
