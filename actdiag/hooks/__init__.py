"""Attaching to modules and tensors, and the on-device statistic kernels. Nothing else lives here.

Design (sync-free by construction)
----------------------------------
* **Only recorded steps are hooked.** `Recorder.begin(step)` registers a forward hook on each selected module and a
  post-accumulate-grad hook on each parameter; `Recorder.end()` removes them all. Steps that are not recorded run
  with no hook registered, so no extra kernel, no Python call and no synchronisation happens on them.
* **Gradients of activations come from tensor hooks**: the forward hook calls `output.register_hook(...)`. Full
  backward module hooks break on `ReLU(inplace=True)` and `x += y` (pytorch#61519); a tensor hook registered before
  an in-place op receives the gradient with respect to the tensor as it was when the hook was registered, which is
  exactly the module's output.
* **Statistics are computed in the hook, on the tensor's device** (`stats.tensor_stats`): a handful of reductions
  produce one small float64 vector per tensor (moments, min/max, zero count, a linear histogram and an exponent
  histogram). Computing inside the hook matters: an in-place op later in the forward pass would change the values.
  Small CPU tensors (at most `sample_cap` elements: biases, norm weights and their gradients) are copied in the
  hook instead and measured all together in `end()` (`stats.StepBatch`): dozens of them per step cost more in
  per-call overhead than in arithmetic. So are the samples of large CPU tensors when statistics are estimated
  (below): the hook makes the one pass over the tensor and copies its sample, `end()` does the rest for all of them.
  On CUDA (`stats.DeviceBatch`) the same holds with device ops: each small tensor is copied into a row of one
  buffer, each large one's sample too (with its finite count and sum from every element when estimated), and
  `end()` measures all rows with one set of ops: 6-10 kernel launches per tensor instead of ~66 when recording
  often, which for hundreds of tensors would otherwise set a recorded step's cost (`bench/count_ops.py`). Large
  tensors with exact statistics are measured alone in the hook. No `.item()`, no `.cpu()`: on CUDA the masked,
  branch-free path is used and binning uses `histc` with constant bounds (CUDA `bincount` reads its maximum back
  to the host).
* **One read-back per recorded step.** The vectors are kept in a dict for the step; `end()` concatenates them per
  device and copies once to the host, where numpy splits and decodes them into frozen `TensorStats`. No tensor is
  kept past its step: the dict is emptied, the weight snapshots for the update ratio are dropped.
* **Purity.** Hooks return None (outputs and gradients are untouched), nothing draws from the user's RNG (the
  histogram sample index comes from a private generator), autocast is switched off inside the kernels (so half
  precision inputs are reduced in float32 and our ops do not change the user's autocast cache), and stale tensor
  hooks from an earlier step are ignored.
* **Large tensors**: histograms use at most `sample_cap` elements (8192; 4096 when `watch` records more often than
  every 10 steps) chosen by a fixed pseudo-random index and say so (`sampled`). With exact statistics (the default
  when recording every 10 steps or less often, and always in `inspect`), moments, min/max, zero and non-finite
  counts use every element. Recording more often, the CPU path reads every element once (count, mean, non-finite
  detection; a non-finite value sends the tensor to the exact path) and estimates the spread, extremes and zeros
  from the same sample, flagged `estimated`: five passes over every element of every tensor were most of a
  recorded step's cost on a CPU (BENCHMARKS.md). The CUDA path does the same without a read-back: the finite count
  and their sum from every element (two reads and one write of it, where its exact statistics move ~4x the bytes),
  the rest from the sample.

The submodules are imported by name (`actdiag.hooks.stats`, `actdiag.hooks.recorder`); this package imports none of
them itself, so importing the kernels never drags in the recorder (and its import of `actdiag.distributed`, which
needs the kernels' layout: a cycle otherwise).
"""
