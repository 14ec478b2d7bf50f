"""metrics.jsonl and TensorBoard after a resume: what the interrupted process logged past the
checkpoint is dropped from both, so every step appears once."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlp.metrics import MetricsLogger


def test_resume_at_drops_records_past_the_checkpoint(tmp_path):
    first = MetricsLogger(str(tmp_path), enabled=True)
    first.resume_at(0)
    for step in range(1, 6):  # the process dies after logging step 5, its checkpoint at step 3
        first.log({"step": step, "loss": float(step)}, step=step)
    first.close()
    second = MetricsLogger(str(tmp_path), enabled=True)
    second.resume_at(3)
    for step in (4, 5, 6):
        second.log({"step": step, "loss": 10.0 * step}, step=step)
    second.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, v) for s, v in
                                                                  [(r["step"], r["loss"]) for r in records]]
