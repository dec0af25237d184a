"""benchmarks/cpu_step.py's arithmetic: the timed window and the launcher check."""

import math

from benchmarks import cpu_step


def test_the_window_starts_at_the_first_point_at_or_after_step_5():
    every_step = {step: 2.0 * step for step in range(1, 21)}      # 2 s per step
    every_step[3] = 100.0                                          # outside the window
    assert cpu_step._window_mean(every_step, 6) == (6, 2.0)
    every_10 = {10: 50.0, 20: 80.0, 25: 95.0}                      # log_every 10, 25 steps
    first, mean = cpu_step._window_mean(every_10, 6)
    assert first == 11 and math.isclose(mean, (95.0 - 50.0) / 15)


def test_the_check_compares_the_launcher_at_log_every_10_with_the_step():
    def results(launch_s, step_s):
        return {'base': {'launch@1': {'this': {'mean_step_s': 9.0}},
                         'launch@10': {'this': {'mean_step_s': launch_s}},
                         'step': {'this': {'mean_step_s': step_s}}}}
    assert math.isclose(cpu_step.launch_overhead(results(1.05, 1.0)), 1.05)
    assert cpu_step.launch_overhead(results(1.2, 1.0)) > 1 + cpu_step.MAX_LAUNCH_OVERHEAD
    assert cpu_step.launch_overhead({'1dev': {}}) is None      # not run: no verdict
