import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from t5x_like import metrics


def test_tensorboard_events_read_back(tmp_path):
    writer = metrics.TensorBoardWriter(logdir=str(tmp_path))
    for step, loss in [(10, 5.5), (20, 4.25)]:
        writer.write_scalars(step, {"loss": loss, "learning_rate": 0.01})
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(10, 5.5), (20, 4.25)]
    assert math.isclose(acc.Scalars("learning_rate")[0].value, 0.01, rel_tol=1e-6)


def test_progress_line_has_eta_and_throughput():
    progress = metrics.Progress(total_steps=100, start_step=0)
    progress.add_tokens(1000)
    rates = progress.tick(10)
    assert rates["tokens_per_sec"] > 0 and rates["eta_s"] >= 0
    line = progress.line(10, {"loss": 3.0, "accuracy": 0.5, "learning_rate": 0.01}, rates)
    assert line.startswith("step  10/100 | loss 3.0000") and "ETA" in line
    assert metrics.format_duration(3725) == "1h02m"
