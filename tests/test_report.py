"""The HTML report: files, contents, offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from regdial import Regularization, fit, report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("run")
    fit("wine", Regularization(dropout=0.2, l1=1e-3), epochs=6, run_dir=directory, progress=False)
    fit("wine", Regularization.off(), epochs=6, run_dir=directory / "baseline", progress=False)
    return directory


def test_report_writes_the_page_and_its_images(run_dir: Path) -> None:
    page = report(run_dir)
    assert page == run_dir / "report.html"
    text = page.read_text()
    images = re.findall(r"src='([^']+)'", text)
    assert set(images) == {"learning_curves.png", "gap.png", "weights.png", "sparsity.png"}
    for name in images:
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in text  # opens offline: nothing to fetch
    for needed in ("Scores", "unregularized (final)", "test accuracy", "dropout", "l1", "Generalization gap"):
        assert needed in text
    assert any(state in text for state in ("overfitting", "underfitting", "good fit", "still improving"))


def test_report_without_baseline_or_weights(tmp_path: Path) -> None:
    fit("wine", epochs=3, run_dir=tmp_path, progress=False)
    (tmp_path / "checkpoints" / "final.safetensors").unlink()
    text = report(tmp_path).read_text()
    assert "weights.png" not in text
    assert "unregularized" not in text
    assert "(every technique off)" in text


def test_report_needs_a_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^run_dir must be a regdial run directory \(with history.csv\)"):
        report(tmp_path)


def test_the_knobs_plot_draws_each_knob_from_its_start_to_the_runs_last_step(
    tmp_path: Path, monkeypatch
) -> None:
    import matplotlib.axes

    from regdial.reports.run import _knobs

    drawn: list[tuple[list[float], list[float]]] = []
    monkeypatch.setattr(matplotlib.axes.Axes, "step", lambda ax, x, y, **kw: drawn.append((list(x), list(y))))
    online = {"moves": [{"step": 64, "epoch": 4, "knob": "dropout", "value": 0.04}],
              "start": {"weight_decay": 0.05, "dropout": 0.1}, "last_step": 128}  # fmt: skip
    assert _knobs(online, tmp_path / "knobs.png")
    # weight decay never moved: flat from step 0; dropout from its start, held after its move
    assert drawn == [([0.0, 128.0], [0.05, 0.05]), ([0.0, 64.0, 128.0], [0.1, 0.04, 0.04])]


def test_a_loss_only_runs_report_claims_no_accuracy_and_no_standard_errors(tmp_path: Path) -> None:
    from regdial.integrations._common import write_record
    from regdial.training.history import History

    rows = [{"epoch": float(e), "train_loss": 3.0 / e, "val_loss": 3.2 / e + 0.01 * e} for e in range(1, 9)]
    write_record(tmp_path, History(None, rows), Regularization(label_smoothing=0.1))
    page = (tmp_path / "regdial_report.html").read_text()
    assert "this run logs no accuracy" in page and "compare runs by accuracy" not in page
    assert "one standard error" not in page
