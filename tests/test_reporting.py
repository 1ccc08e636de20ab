"""Report store, HTML renderer, figures and logger media."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import struct
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_influence.reporting import ReportStore, render_report, to_jsonable
from lightning_influence.reporting.html import verdict


def _strict_load(path: Path) -> dict:
    def refuse(const: str) -> None:
        raise AssertionError(f"non-JSON constant {const} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def _full_report_sections(gen: torch.Generator) -> dict[str, dict]:
    images = torch.rand(12, 8, 8, generator=gen)
    return {
        "curvature": {
            "history": [
                {
                    "step": 10 * i,
                    "curvature/trace": 5.0 / (i + 1),
                    "curvature/trace_stderr": 0.1,
                    "curvature/lambda_max": 1.0 / (i + 1),
                    "curvature/critical_batch_size": 5.0,
                    "lissa/eta": 0.9,
                }
                for i in range(4)
            ],
            "config": {"every_n_steps": 10},
        },
        "influence": {
            "solver": {
                "method": "cg",
                "iterations": 7,
                "relative_residual": 3e-7,
                "converged": True,
                "diverged": False,
                "history": [1.0, 0.1, 1e-3, 3e-7],
                "info": {"damping": 1e-3},
            },
            "queries": [
                {
                    "index": q,
                    "label": 1,
                    "prediction": 1,
                    "proponents": [{"index": j, "score": -float(j), "label": 0} for j in range(3)],
                    "opponents": [{"index": 3 + j, "score": float(j), "label": 1} for j in range(3)],
                }
                for q in range(2)
            ],
            "query_images": [images[10], images[11]],
            "train_images": {str(j): images[j] for j in range(6)},
            "self_influence": {"values": torch.rand(40, generator=gen), "flagged": [3, 7]},
            "summary": {"recall@5%": 0.5},
        },
        "cv": {
            "estimate": {"approx": 0.31, "exact": 0.30},
            "folds": [{"fold": k, "size": 8, "approx": 0.3 + 0.01 * k, "exact": 0.3} for k in range(3)],
            "curve": {"x": [1e-3, 1e-2, 1e-1], "xlabel": "lambda", "series": {"approx": [0.4, 0.3, 0.35]}},
        },
        "pbrf": {
            "correlations": [
                {"estimator": "cg", "pearson": 0.95, "spearman": 0.93, "n": 20},
                {"estimator": "lissa", "pearson": 0.5, "spearman": 0.4, "n": 20},
            ],
            "scatter": [{"estimator": "cg", "pbrf": [0.0, 1.0, 2.0], "estimate": [0.1, 1.1, 1.9]}],
        },
        "my_extra": {"answer": 42, "rows": [{"a": 1, "b": 2}]},
    }


# ------------------------------------------------------------------------------------------------ store
def test_store_merges_sections_and_survives_reupdates(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "influence", render=False)
    store.update("curvature", {"history": [{"step": 0, "trace": 1.0}], "config": {"a": 1, "b": {"c": 2}}})
    store.update("cv", {"estimate": {"approx": 0.5}})
    store.update(
        "curvature", {"history": [{"step": 0, "trace": 1.0}, {"step": 5, "trace": 2.0}], "config": {"b": {"d": 3}}}
    )
    # a second store object on the same directory sees and keeps everything
    ReportStore(tmp_path / "influence", render=False).update("cv", {"estimate": {"exact": 0.4}})

    report = _strict_load(tmp_path / "influence" / "report.json")
    assert report == store.load()
    assert [r["step"] for r in report["curvature"]["history"]] == [0, 5]  # lists are replaced, not appended
    assert report["curvature"]["config"] == {"a": 1, "b": {"c": 2, "d": 3}}  # dicts merge recursively
    assert report["cv"]["estimate"] == {"approx": 0.5, "exact": 0.4}
    meta = report["meta"]
    assert meta["versions"]["torch"] == torch.__version__
    assert {"lightning_influence", "lightning", "python", "platform"} <= set(meta["versions"])
    assert meta["created"] <= meta["updated"]
    assert not list((tmp_path / "influence").glob("*.tmp"))  # atomic writes leave no temporaries
    assert not (tmp_path / "influence" / "report.html").exists()  # render=False

    with pytest.raises(ValueError, match="section"):
        store.update("meta", {"x": 1})
    with pytest.raises(ValueError, match="mapping"):
        store.update("cv", [1, 2])  # type: ignore[arg-type]


@dataclass
class _Config:
    damping: float
    device: torch.device


class _WithToDict:
    def to_dict(self) -> dict:
        return {"residual": torch.tensor(float("inf")), "x": np.float32(0.25)}


def test_json_safety_nan_tensors_numpy_and_notes(tmp_path: Path) -> None:
    notes: list[str] = []
    value = {
        "t": torch.tensor([[1.0, float("nan")]]),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "half": torch.tensor([0.5], dtype=torch.bfloat16),
        "np": np.arange(3),
        "npf": np.float64("nan"),
        "cfg": _Config(1e-3, torch.device("cpu")),
        "obj": _WithToDict(),
        "path": tmp_path,
        "tup": (1, (2, 3)),
        "bools": torch.tensor([True, False]),
        7: "int key",
    }
    out = to_jsonable(value, notes, "s")
    json.dumps(out, allow_nan=False)  # raises if anything non-JSON survived
    assert out["t"] == [[1.0, None]] and out["scalar"] == 3 and out["half"] == [0.5]
    assert out["np"] == [0, 1, 2] and out["npf"] is None
    assert out["cfg"] == {"damping": 1e-3, "device": "cpu"}
    assert out["obj"] == {"residual": None, "x": 0.25}
    assert out["path"] == str(tmp_path) and out["tup"] == [1, [2, 3]] and out["bools"] == [True, False]
    assert out["7"] == "int key"
    assert sorted(notes) == [
        "s.npf: NaN stored as null",
        "s.obj.residual: inf stored as null",
        "s.t[0][1]: NaN stored as null",
    ]

    store = ReportStore(tmp_path, render=False)
    store.update("pbrf", {"correlations": [{"estimator": "cg", "pearson": float("nan")}]})
    assert store.load()["meta"]["null_values"]["pbrf"] == ["pbrf.correlations[0].pearson: NaN stored as null"]
    store.update("pbrf", {"correlations": [{"estimator": "cg", "pearson": 0.9}]})  # now finite: note goes away
    assert "pbrf" not in store.load()["meta"]["null_values"]
    _strict_load(tmp_path / "report.json")


def test_save_tensor_records_file(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, render=False)
    scores = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = store.save_tensor("scores", scores, section="influence")
    assert path == tmp_path / "scores.pt"
    torch.testing.assert_close(torch.load(path), scores)
    report = store.load()
    assert report["meta"]["files"]["scores"] == {
        "path": "scores.pt",
        "section": "influence",
        "shape": [3, 5],
        "dtype": "float64",
    }
    assert report["influence"]["files"] == {"scores": "scores.pt"}
    store.update("influence", {"solver": {"method": "cg"}})  # later updates keep the file record
    assert store.load()["influence"]["files"] == {"scores": "scores.pt"}
    with pytest.raises(ValueError, match="path separators"):
        store.save_tensor("../evil", scores)


# ------------------------------------------------------------------------------------------------ html
def test_html_has_every_section_and_no_external_resources(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    for name, data in _full_report_sections(torch.Generator().manual_seed(0)).items():
        store.update(name, data, render=False)
    store.update("run", {"name": "digits-mlp", "world_size": 1})
    page = (tmp_path / "report.html").read_text()
    for sid, title in [
        ("curvature", "Curvature"),
        ("influence", "Influence"),
        ("cv", "Approximate cross-validation"),
        ("pbrf", "PBRF validation"),
        ("my_extra", "My extra"),
    ]:
        assert f'<section id="{sid}">' in page and f"<h2>{title}</h2>" in page
        assert f'href="#{sid}"' in page
    assert "Not run." not in page
    assert "<script" not in page.lower()
    # every resource is inline: src= only data URIs, href= only in-page anchors
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', page):
        assert value.startswith("data:image/png;base64," if attr == "src" else "#"), (attr, value[:60])
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    # content checks
    assert "agree closely" in page  # PBRF verdict from the best Pearson (cg 0.95)
    assert "recall@5%" in page and "digits-mlp" in page
    assert page.count("<figure><img alt=") >= 5  # curvature, convergence, histogram, CV curve, PBRF scatter
    assert ">answer</th><td>42<" in page  # unknown section rendered generically

    partial = render_report({"cv": {"estimate": {"approx": 0.2}}})
    assert partial.count("Not run.") == 3 and 'id="cv"' in partial


def test_html_escapes_text() -> None:
    evil = '<script>alert("x")</script>'
    page = render_report(
        {
            "influence": {
                "queries": [{"index": evil, "proponents": [{"index": 1, "label": evil}]}],
                "config": {evil: evil},
            },
            "run": {"name": evil},
        }
    )
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_image_rendering_of_queries_and_proponents() -> None:
    gen = torch.Generator().manual_seed(1)
    query_chw = torch.rand(3, 6, 5, generator=gen)  # CxHxW colour
    train = [torch.rand(7, 9, generator=gen).tolist() for _ in range(4)]  # HxW grey, as nested lists (JSON)
    data = to_jsonable(
        {
            "queries": [
                {
                    "index": 0,
                    "proponents": [{"index": 0, "score": 1.0}, {"index": 2, "score": 0.5}],
                    "opponents": [{"index": 3, "score": -1.0}],
                }
            ],
            "query_images": [query_chw],
            "train_images": train,  # list indexed by training index
        }
    )
    page = render_report({"influence": data})
    qblock = page[page.index('<div class="query">') :]
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', qblock)
    assert len(pngs) == 4  # query + 2 proponents + 1 opponent
    assert _png_size(pngs[0]) == (5, 6)  # CxHxW → HxWxC: width 5, height 6
    assert all(_png_size(p) == (9, 7) for p in pngs[1:])
    assert "#2" in qblock and "#3" in qblock

    # the self-influence ranking shows a thumbnail per row when the training images are known
    data["self_influence"] = {"values": [0.1, 5.0, 0.3, 2.0]}
    ranking = render_report({"influence": data}).split("Self-influence ranking")[1]
    cells = re.findall(r'<td class="cellimg"><img alt="example" src="data:image/png;base64,([^"]+)"', ranking)
    assert len(cells) == 4 and all(_png_size(c) == (9, 7) for c in cells)
    first_row = ranking.split("<tbody>")[1].split("</tr>")[0]
    assert "<td>1</td><td>5</td>" in first_row  # rank 1 is training index 1 (largest value)

    no_images = render_report({"influence": {"queries": [{"index": 4, "proponents": [{"index": 11, "score": 0.25}]}]}})
    assert "data:image/png" not in no_images and "<td>11</td>" in no_images and "<td>0.25</td>" in no_images


def test_malformed_sections_never_crash() -> None:
    page = render_report(
        {
            "curvature": {"history": [1, "x", {"step": "a", "trace": None}]},
            "influence": {"solver": 5, "queries": "abc", "self_influence": {"values": "x"}, "query_images": [[[]]]},
            "cv": {"folds": [1, 2], "curve": {"x": "bad"}, "history": [{"epoch": 0, "approx": None}]},
            "pbrf": {"correlations": 3, "scatter": [{"pbrf": [1, 2], "estimate": "bad"}], "verdict": None},
            "odd": [1, 2, 3],
        }
    )
    for sid in ("curvature", "influence", "cv", "pbrf", "odd"):
        assert f'<section id="{sid}">' in page


def test_verdict_thresholds() -> None:
    assert "agree closely" in verdict([{"estimator": "cg", "pearson": 0.95}])
    assert "moderately" in verdict([{"estimator": "cg", "pearson": 0.8}, {"estimator": "l", "pearson": 0.1}])
    assert "disagree" in verdict([{"estimator": "lissa", "pearson": 0.2}])
    assert verdict([{"estimator": "lissa", "pearson": None}]) == ""


def test_rebuild_from_json_only(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, render=False)
    store.update("pbrf", {"correlations": [{"estimator": "cg", "pearson": 0.99}]})
    assert not store.html_path.exists()
    assert ReportStore(tmp_path).rebuild() == tmp_path / "report.html"
    assert "agree closely" in (tmp_path / "report.html").read_text()
    with pytest.raises(FileNotFoundError, match=r"report\.json"):
        ReportStore(tmp_path / "missing").rebuild()

    from lightning_influence.reporting import find_reports, rebuild_reports

    run = tmp_path / "run"
    ReportStore(run / "version_0" / "influence", render=False).update("cv", {"estimate": {"approx": 0.2}})
    assert find_reports(run) == [run / "version_0" / "influence"] and find_reports(tmp_path)[0] == tmp_path
    assert rebuild_reports(run) == [run / "version_0" / "influence" / "report.html"]
    assert "0.2" in (run / "version_0" / "influence" / "report.html").read_text()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rebuild_reports(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No report\.json under"):
        rebuild_reports(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ media
def test_tensorboard_media_read_back(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_influence.reporting.figures import histogram_figure
    from lightning_influence.reporting.media import log_figure, log_histogram, log_table, log_text

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fig = histogram_figure([1.0, 2.0, 2.5], "h")
    log_figure([logger], "influence/hist_figure", fig, step=3)
    assert fig.axes == []  # closed/cleared
    log_text([logger], "influence/summary", "CG **converged**", step=3)
    log_histogram(logger, "influence/self_influence", torch.tensor([0.1, 0.2, float("nan"), 0.4]), step=3)
    log_table([logger], "influence/top_k", ["query", "train", "score"], [[0, 5, torch.tensor(-0.5)]], step=3)
    logger.experiment.flush()

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "influence/hist_figure" in tags["images"]
    img = acc.Images("influence/hist_figure")[0]
    assert img.step == 3 and img.width > 100 and img.height > 100
    assert "influence/self_influence" in tags["histograms"]
    hist = acc.Histograms("influence/self_influence")[0].histogram_value
    assert hist.num == 3 and math.isclose(hist.sum, 0.7, rel_tol=1e-6)  # NaN dropped
    assert {"influence/summary/text_summary", "influence/top_k/text_summary"} <= set(tags["tensors"])
    table_text = acc.Tensors("influence/top_k/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| query | train | score |" in table_text and "| 0 | 5 | -0.5 |" in table_text

    with pytest.raises(ValueError, match="row 0 has 2 values"):
        log_table([logger], "bad", ["a", "b", "c"], [[1, 2]])


def test_unsupported_logger_warns_once(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_influence.reporting import media

    media._WARNED.clear()
    logger = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        media.log_text([logger], "a", "x")
        media.log_text([logger], "b", "y")
    msgs = [str(w.message) for w in caught if "cannot log text to CSVLogger" in str(w.message)]
    assert len(msgs) == 1


def test_wandb_offline_gets_image_table_histogram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from lightning_influence.reporting.figures import scatter_figure
    from lightning_influence.reporting.media import log_figure, log_histogram, log_table, log_text

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="li-test")
    try:
        log_figure([logger], "pbrf/scatter", scatter_figure([0, 1], [0, 1.1], "s", "x", "y"), step=2)
        log_table(
            [logger], "influence/top_k", ["query", "train", "score"], [[0, 5, -0.5], [0, 7, float("nan")]], step=2
        )
        log_histogram([logger], "influence/self_influence", np.array([0.1, 0.3]), step=2)
        log_text([logger], "influence/summary", "ok", step=2)
        summary = dict(logger.experiment.summary)
        files_dir = Path(logger.experiment.dir)
    finally:
        logger.experiment.finish()
    assert summary["pbrf/scatter"]["_type"] == "images/separated"
    assert summary["influence/top_k"]["_type"] == "table-file" and summary["influence/top_k"]["nrows"] == 2
    assert summary["influence/self_influence"]["_type"] == "histogram"
    assert summary["influence/summary"]["_type"] == "table-file"  # W&B has no text panel: a one-cell table
    assert summary["trainer/global_step"] == 2
    assert list(files_dir.glob("media/images/pbrf/scatter_*.png"))
    table_file = next(files_dir.glob("media/table/influence/top_k_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["query", "train", "score"] and table["data"][0] == [0, 5, -0.5]


def test_image_payload_detects_images_only() -> None:
    from lightning_influence.reporting.figures import image_payload

    gen = torch.Generator().manual_seed(2)
    chw = torch.rand(3, 6, 5, generator=gen, dtype=torch.float64)
    a, b = np.asarray(image_payload(chw)), np.asarray(image_payload(chw.permute(1, 2, 0)))
    assert a.shape == (6, 5, 3) and np.array_equal(a, b)
    assert a.min() == 0.0 and a.max() == 1.0  # min-max scaled
    grey = image_payload(torch.rand(1, 8, 8, generator=gen))
    assert np.asarray(grey).shape == (8, 8)
    digit = torch.arange(64.0)
    assert image_payload(digit) is None  # tabular features are not pictures unless asked
    np.testing.assert_allclose(
        np.asarray(image_payload(digit, allow_flat_square=True)), digit.view(8, 8) / 63, atol=1e-4
    )
    assert image_payload(torch.rand(5, 2, generator=gen)) is None and image_payload("text") is None
    assert image_payload(torch.rand(2, 3, 4, 4, generator=gen)) is None


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Issue 8: the page opens in a real browser with no console errors, and the screenshot is not blank."""
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: `apt-get install chromium`; `make test` installs it)")
    store = ReportStore(tmp_path / "report")
    for name, data in _full_report_sections(torch.Generator().manual_seed(3)).items():
        store.update(name, data, render=False)
    html_path = store.rebuild()
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            html_path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    assert grey.std() > 10.0  # text, tables and figures were drawn, not a blank page


def test_curvature_rows_from_spectrum_summary_are_flattened() -> None:
    from lightning_influence.spectrum import DenseOperator, estimate_spectrum

    a = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    summary = estimate_spectrum(DenseOperator(a @ a.T / 12), seed=0, dataset_size=50)
    page = render_report({"curvature": {"history": [{"step": 7, **summary.to_dict()}]}})
    history = page[page.index("<h4>History</h4>") :]
    header = re.findall(r"<th>([^<]*)</th>", history.split("</thead>")[0])
    assert header[:8] == ["step", "trace", "trace_stderr", "lambda_max", "critical_batch_size", "lissa_eta",
                          "lissa_batch_size", "lissa_steps"]  # fmt: skip
    first = re.findall(r"<td>([^<]*)</td>", history.split("<tbody>")[1].split("</tr>")[0])
    assert first[0] == "7" and float(first[1]) == pytest.approx(summary.trace, rel=1e-3)
    assert int(first[6]) == summary.lissa.batch_size


def test_figures_of_the_same_data_are_drawn_once_across_report_renders() -> None:
    """The report is re-rendered at every callback's publish; a figure with the same builder and data is not redrawn."""
    from functools import partial

    from lightning_influence.reporting import blocks
    from lightning_influence.reporting.figures import line_figure

    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return line_figure(*args, **kwargs)  # type: ignore[arg-type]

    first = blocks.figure(partial(counted, [0, 1], {"loss": [1.0, 0.5]}, title="a", xlabel="step"))
    again = blocks.figure(partial(counted, [0, 1], {"loss": [1.0, 0.5]}, title="a", xlabel="step"))
    other = blocks.figure(partial(counted, [0, 1], {"loss": [1.0, 0.25]}, title="a", xlabel="step"))
    assert len(calls) == 2 and first["png"] == again["png"] != other["png"]
    unkeyed = [blocks.figure(lambda: counted([0, 1], {"loss": [1.0, 0.5]}, title="a", xlabel="step")) for _ in range(2)]
    assert len(calls) == 4 and unkeyed[0]["png"] == first["png"]  # a lambda has no content key: drawn each time
