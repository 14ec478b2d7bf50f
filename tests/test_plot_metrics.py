"""tools/plot_metrics.py: a PNG from a run's metrics.jsonl, a clear error without one."""
import importlib.util
import json
import os

import pytest

TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "plot_metrics.py")


@pytest.fixture(scope="module")
def plot_metrics():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_metrics(run_dir, with_eval=True):
    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "time": 1.0} for s in range(1, 41)]
    if with_eval:
        lines += [{"step": s, "zeroshot_top1": s / 100, "zeroshot_top5": 0.5} for s in (10, 20, 40)]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        f.write('{"step": 41, "lo')  # a partial last line, as a run killed mid-write leaves


def test_series_pairs_steps_with_values(plot_metrics):
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "zeroshot_top1": 0.3}, {"loss": 9.0}, {"step": 3, "loss": 1.0}]
    assert plot_metrics.series(records, "loss") == ([1, 3], [2.0, 1.0])
    assert plot_metrics.series(records, "zeroshot_top1") == ([2], [0.3])


@pytest.mark.parametrize("with_eval", [True, False])
def test_writes_png_default_path(plot_metrics, tmp_path, capsys, with_eval):
    _write_metrics(tmp_path, with_eval)
    assert plot_metrics.main([str(tmp_path)]) == 0
    png = tmp_path / "metrics.png"
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_out_option(plot_metrics, tmp_path):
    _write_metrics(tmp_path)
    out = tmp_path / "sub.png"
    assert plot_metrics.main([str(tmp_path), "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and not (tmp_path / "metrics.png").exists()


def test_missing_metrics_file_is_clear(plot_metrics, tmp_path, capsys):
    assert plot_metrics.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no metrics file" in err and "metrics.jsonl" in err
