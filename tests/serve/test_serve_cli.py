"""``osdface serve`` / ``demo`` flags and settings: bounds fail at start-up with one line (exit 2), options parse
strictly, the web stack is not imported by ``osdface --version``, and the layering holds."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

from osdface.cli import main
from osdface.errors import InvalidSettingError
from osdface.serve.config import RequestError, RestoreOptions, ServeConfig


@pytest.mark.parametrize("field,value", [("max_batch", 0), ("batch_wait_ms", -1), ("replicas", 0), ("port", 70000),
                                         ("max_queue", 0), ("max_pixels", 10), ("request_timeout_s", 0),
                                         ("max_upscale", 0.5), ("formats", ("GIF",)), ("formats", ()),
                                         ("api_key", "short")])
def test_config_bounds(field, value):
    with pytest.raises(InvalidSettingError, match=field.split("_")[0]):
        ServeConfig(**{field: value})


@pytest.mark.parametrize("field", ["batch_wait_ms", "request_timeout_s", "max_upscale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_config_refuses_nan_and_inf(field, value):
    with pytest.raises(InvalidSettingError, match=field):
        ServeConfig(**{field: value})


@pytest.mark.parametrize("flag", ["--batch-wait-ms", "--timeout", "--max-upscale", "--max-upload-mb",
                                  "--max-pixels", "--max-output-pixels"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_flag_exits_2_with_one_line(tmp_path, flag, value):
    rc, err = _run(["serve", "--model", str(tmp_path / "missing"), flag, value])
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "must be" in lines[0] and value in lines[0]


@pytest.mark.parametrize("name", ["upscale", "min_face_size"])
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_options_refuse_nan_and_inf(name, text):
    with pytest.raises(RequestError) as e:
        RestoreOptions.parse({name: text}, ServeConfig())
    assert e.value.status == 400 and name in e.value.message
    with pytest.raises(RequestError) as e:
        RestoreOptions(**{name: float(text)})
    assert e.value.status == 400 and name in e.value.message


def test_face_models_hand_out_loses_no_race(tiny_model_dir, monkeypatch):
    """The first models (built at load) go to one CPU thread; a thread that finds them taken by another
    between its look and its take builds its own instead of failing (IndexError, a 500)."""
    from _serve_helpers import load_test_engine

    import osdface.cli.restore_photos as rp

    built = []
    monkeypatch.setattr(rp, "build_face_models", lambda args, device: built.append(1) or {"n": len(built)})
    engine = load_test_engine(tiny_model_dir, cpu_workers=2)
    face_models = engine._face_models
    cell = face_models.__closure__[face_models.__code__.co_freevars.index("first")]

    class TakenMeanwhile(list):
        """Non-empty when looked at; another thread takes the item just before this one's pop."""

        def pop(self, *a):
            super().pop(*a)
            raise IndexError("pop from empty list")

    cell.cell_contents = TakenMeanwhile(cell.cell_contents)
    assert face_models()["n"] == 2 and len(built) == 2
    assert face_models()["n"] == 3


def test_one_line_folds_every_refusal():
    from osdface.serve.config import one_line

    assert one_line("a\n  b\tc\r\n") == "a b c" and one_line(ValueError("x\ny")) == "x y"
    assert RequestError(400, "line one\nline two").message == "line one line two"


def test_defaults_bind_loopback_and_normalise_formats():
    cfg = ServeConfig(formats=("png", "webp"))
    assert cfg.host == "127.0.0.1" and cfg.formats == ("PNG", "WEBP") and cfg.api_key is None


def test_options_parse():
    cfg = ServeConfig()
    opts = RestoreOptions.parse({"aligned": "yes", "color_fix": "AdaIN", "format": "jpg", "quality": "80"}, cfg)
    assert opts == RestoreOptions(aligned=True, color_fix="adain", format="jpeg", quality=80)
    assert RestoreOptions.parse({"format": "json"}, cfg).output_format == "png"
    for bad in ({"upscale": "5"}, {"max_faces": "17"}, {"aligned": "maybe"}, {"path": "/etc"}, {"quality": "1e3"}):
        with pytest.raises(RequestError) as e:
            RestoreOptions.parse(bad, cfg)
        assert e.value.status == 400


def _run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_bad_flags_exit_2_with_one_line_before_loading(tmp_path, command):
    rc, err = _run([command, "--model", str(tmp_path / "missing"), "--max-batch", "0"])
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["osdface: error: max_batch must be in [1, 256], got 0"]


def test_missing_model_folder_is_one_line(tmp_path):
    rc, err = _run(["serve", "--model", str(tmp_path / "missing")])
    assert rc == 2 and err.startswith("osdface: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_api_key_from_environment(monkeypatch):
    from osdface.cli import build_parser
    from osdface.cli.serve import config_from_args

    monkeypatch.setenv("OSDFACE_API_KEY", "from-the-env-123")
    args = build_parser().parse_args(["serve"])
    assert config_from_args(args).api_key == "from-the-env-123"
    args = build_parser().parse_args(["serve", "--api-key", "from-the-flag-1"])
    assert config_from_args(args).api_key == "from-the-flag-1"


def test_version_imports_no_web_stack():
    code = ("import sys; from osdface.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('fastapi', 'uvicorn', 'gradio', 'torch', 'prometheus_client') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_serve_extra_is_installed():
    """The dev set-up installs the serve extra (and playwright with dev); a missing one fails here, never skips."""
    for module in ("fastapi", "uvicorn", "prometheus_client", "multipart", "httpx", "gradio", "playwright"):
        assert importlib.util.find_spec(module) is not None, f"{module} missing: pip install -e '.[dev,serve]'"


def test_serve_layer():
    """serve is a program: nothing below the programs imports it, and it imports no other program."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from test_import_graph import import_graph
    finally:
        sys.path.pop(0)
    graph = import_graph()
    assert any(m.startswith("osdface.serve") for m in graph)
    programs = ("osdface.serve", "osdface.cli")
    below = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                   if b.startswith("osdface.serve") and not a.startswith(programs))
    assert below == []
    out = sorted(f"{a} -> {b}" for a, bs in graph.items() if a.startswith("osdface.serve") for b in bs
                 if b.startswith(("osdface.cli", "osdface.training", "osdface.evaluation", "osdface.export")))
    assert out == []
    cli_users = sorted(a for a, bs in graph.items() if a.startswith("osdface.cli") and
                       any(b.startswith("osdface.serve") for b in bs))
    assert cli_users == ["osdface.cli.demo", "osdface.cli.serve"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen) -> None:
    import time

    import httpx

    for _ in range(1200):  # bounded: ~2 min on a loaded machine; not a timing assertion
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


@pytest.mark.slow
def test_serve_command_end_to_end(tiny_model_dir):
    """``osdface serve`` as users run it: a process on 127.0.0.1, one restore, a clean stop on SIGINT."""
    import os
    import signal

    import httpx
    from _serve_helpers import SAMPLE

    port = _free_port()
    env = {**os.environ, "OSDFACE_API_KEY": "cli-test-key-42"}
    proc = subprocess.Popen([sys.executable, "-m", "osdface", "serve", "--model", str(tiny_model_dir), "--device",
                             "cpu", "--port", str(port), "--max-batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(f"{url}/readyz", proc)
        resp = httpx.post(f"{url}/v1/restore", content=SAMPLE.read_bytes(), headers={"X-API-Key": "cli-test-key-42"},
                          timeout=120)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert httpx.post(f"{url}/v1/restore", content=b"x").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Uvicorn running on http://127.0.0.1:" in out and "Traceback" not in out


@pytest.mark.slow
def test_demo_command_serves_the_page(tiny_model_dir):
    import signal

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "osdface", "demo", "--model", str(tiny_model_dir), "--device", "cpu",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", proc)
        page = httpx.get(f"http://127.0.0.1:{port}/").text
        assert "osdface demo" in page
        assert "fonts.googleapis" not in page and "cdn." not in page
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert "Traceback" not in out, out
