"""Training: the run description (RunConfig), the jitted step, optimizers, the
train() loop and what keeps a run alive (preemption, peer watchdog, XLA options),
and compiling the step ahead of time for a TPU slice."""
