"""`embedkit serve --engine vllm` without a GPU: the generated command, and the probe parity check against fake
OpenAI-compatible servers (one right, one wrong), including a full launch of a fake `vllm` executable."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import pytest

from embedkit.errors import ModelError
from embedkit.models import load_model
from embedkit.serve.app import create_app
from embedkit.serve.backends import TorchBackend
from embedkit.serve.engines import build_vllm_command, check_remote, run_vllm
from embedkit.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tiny_bert_dir):
    from embedkit.export.hf import export_hf

    source = tmp_path_factory.mktemp("eng") / "model"
    load_model(tiny_bert_dir, prompts={"query": "query: "}, normalize=True).save(source)
    out = tmp_path_factory.mktemp("eng_hf") / "tuned"
    export_hf(source, out)
    return out


class _Shifted(TorchBackend):
    """A server that computes slightly different vectors (as a mis-pooling or wrong-dtype engine would)."""

    def embed_ids(self, id_lists):
        vectors = super().embed_ids(id_lists)
        return vectors + 0.01


def _engine_like_server(folder, backend_cls=TorchBackend):
    """An OpenAI-compatible server that, like vLLM, knows nothing of embedkit's prompts."""
    return BackgroundServer(create_app({"tuned": backend_cls(load_model(folder, prompts={}), name="tuned")}))


def test_vllm_command(hf_export):
    argv = build_vllm_command(hf_export, served_name="tuned", port=8123)
    assert argv[:3] == ["vllm", "serve", str(hf_export.resolve())]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--runner"] == "pooling"
    assert json.loads(options["--pooler-config"]) == {"pooling_type": "MEAN", "normalize": True}
    assert options["--port"] == "8123" and options["--served-model-name"] == "tuned"
    assert options["--max-model-len"] == "128" and options["--dtype"] == "float32"
    dry = run_vllm(hf_export, dry_run=True, api_key="s3cret")
    assert dry["launched"] is False and dry["command"][1] == "serve"
    # what `embedkit serve --dry-run` prints: the command, without the key
    assert dry["command_line"].startswith("vllm serve ") and "s3cret" not in dry["command_line"]


def test_parity_check_against_fake_servers(hf_export):
    with _engine_like_server(hf_export) as good:
        result = check_remote(good.url, "tuned", hf_export)
        assert result.ok and result.max_abs_diff < 1e-5  # query probes matched: the prompt was added client-side
        without_prompts = check_remote(good.url, "tuned", hf_export, prompts={})
        assert not without_prompts.ok  # and forgetting it is caught
        with pytest.raises(ModelError, match="HTTP 404"):
            check_remote(good.url, "other-name", hf_export)
    with _engine_like_server(hf_export, _Shifted) as wrong:
        result = check_remote(wrong.url, "tuned", hf_export)
        assert not result.ok and result.max_abs_diff == pytest.approx(0.01, abs=1e-4)
    with pytest.raises(ModelError, match="cannot reach"):
        check_remote(good.url, "tuned", hf_export)  # that server is gone


FAKE_VLLM = textwrap.dedent('''\
    #!{python}
    """A stand-in for `vllm serve DIR --runner pooling ...`: an OpenAI-compatible server on CPU."""
    import os, sys
    sys.path.insert(0, {tests!r})
    args = sys.argv[1:]
    assert args[0] == "serve" and args[args.index("--runner") + 1] == "pooling", args
    folder, port, name = args[1], int(args[args.index("--port") + 1]), args[args.index("--served-model-name") + 1]
    import uvicorn
    from embedkit.models import load_model
    from embedkit.serve.app import create_app
    from embedkit.serve.backends import TorchBackend
    from test_serve_engines import _Shifted
    cls = _Shifted if os.environ.get("FAKE_VLLM_WRONG") else TorchBackend
    app = create_app({{name: cls(load_model(folder, prompts={{}}), name=name)}})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
''')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("wrong", [False, True])
def test_run_vllm_launches_checks_and_stops(hf_export, tmp_path, monkeypatch, wrong):
    fake = tmp_path / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable, tests=os.path.dirname(__file__)))
    fake.chmod(0o755)
    if wrong:
        monkeypatch.setenv("FAKE_VLLM_WRONG", "1")
    kwargs = dict(port=_free_port(), vllm_bin=str(fake), startup_timeout=120, foreground=False)
    if wrong:
        with pytest.raises(ModelError, match="differ from the model's probe vectors"):
            run_vllm(hf_export, **kwargs)
        return
    launched = run_vllm(hf_export, **kwargs)
    process = launched["process"]
    try:
        assert launched["check"].ok and process.poll() is None
    finally:
        from embedkit.serve.engines import stop_process

        stop_process(process)
    assert process.poll() is not None


def test_missing_vllm_binary_is_one_clear_error(hf_export):
    with pytest.raises(ModelError, match="not installed here"):
        run_vllm(hf_export, vllm_bin="/nonexistent/vllm")


def test_non_st_folder_is_refused(tiny_bert_dir):
    with pytest.raises(ModelError, match="export --format hf"):
        build_vllm_command(tiny_bert_dir, served_name="x")
