"""Hub code paths, tested up to the network boundary against a local HTTP server that speaks the Hub API."""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import add_trained_lora
from diffusers import FluxPipeline

from scfm_diffusers import SCFMInferenceSettings, save_adapter


class FakeHub(BaseHTTPRequestHandler):
    """Answers repo creation, YAML validation, pre-upload and commit like the Hub; records every request."""

    requests: list = []

    def log_message(self, *args):
        pass

    def _reply(self, payload, code=200):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append((self.path, body, self.headers.get("authorization")))
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self._reply({"url": f"{endpoint}/{request['organization']}/{request['name']}"})
        elif self.path == "/api/validate-yaml":
            self._reply({"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        elif "/commit/" in self.path:
            self._reply({"commitUrl": f"{endpoint}/org/adapter/commit/1234", "commitOid": "1234"})
        else:
            self._reply({"error": "not found"}, 404)

    def do_GET(self):  # noqa: N802
        self.requests.append((self.path, b"", None))
        self._reply({"error": "not found"}, 404)


@pytest.fixture
def fake_hub():
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", FakeHub.requests
    server.shutdown()


def committed_files(requests) -> dict[str, bytes]:
    (commit,) = [body for path, body, _ in requests if "/commit/" in path]
    files = {}
    for line in commit.decode().splitlines():
        entry = json.loads(line)
        if entry["key"] == "file":
            files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
    return files


def test_push_uploads_the_whole_adapter_folder_and_nothing_else(fake_hub, saved_pipelines, tmp_path):
    endpoint, requests = fake_hub
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    add_trained_lora(pipe.transformer)
    folder = save_adapter(tmp_path / "out", pipe.transformer, SCFMInferenceSettings.for_family("flux"))
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.bin").write_bytes(b"x")
    (folder / "cache").mkdir()
    (folder / "cache" / "latents.safetensors").write_bytes(b"x")

    # huggingface_hub reads HF_ENDPOINT at import time: push from a fresh interpreter.
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}
    env.pop("HF_HUB_OFFLINE", None)
    code = f"from scfm_diffusers import push_adapter; print(push_adapter({str(folder)!r}, 'org/adapter'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("/org/adapter/commit/1234")

    create = [json.loads(body) for path, body, _ in requests if path == "/api/repos/create"]
    assert create == [{"name": "adapter", "organization": "org", "visibility": "public", "type": "model"}]
    files = committed_files(requests)
    assert set(files) == {
        "pytorch_lora_weights.safetensors",
        "scfm_settings.json",
        "scheduler/scheduler_config.json",
        "README.md",
    }
    assert files["pytorch_lora_weights.safetensors"] == (folder / "pytorch_lora_weights.safetensors").read_bytes()
    assert 'adapter="org/adapter"' in files["README.md"].decode()  # the card points at its own repository
    assert all(auth == "Bearer hf_test" for path, _, auth in requests if path.startswith("/api/models"))


def test_push_reports_unreachable_hub(saved_pipelines, tmp_path):
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    add_trained_lora(pipe.transformer)
    folder = save_adapter(tmp_path / "out", pipe.transformer, SCFMInferenceSettings.for_family("flux"))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "HF_HUB_ETAG_TIMEOUT": "2"}
    env.pop("HF_HUB_OFFLINE", None)
    code = f"from scfm_diffusers import push_adapter; push_adapter({str(folder)!r}, 'org/adapter')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Connect" in result.stderr  # the connection error surfaces; nothing is swallowed
