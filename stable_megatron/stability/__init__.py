"""Stability decisions, apart from the measuring (`stable_megatron.metrics`, which measures and
reduces only):

- `spikes`: the running loss / grad-norm statistics that call a step a spike (plain Python);
- `guard`: the spike guard, the step hook that acts on that verdict at the update decision
  (`stability.on_spike`: skip or roll back);
- `warning`: the early-warning rules over the stability metrics (plain Python, replayable from
  a run's records);
- `divergence`: the rule that stops a run that has diverged (`stability.stop_on_divergence`).

Nothing is imported here, so that the plain-Python rules load without torch.
"""
