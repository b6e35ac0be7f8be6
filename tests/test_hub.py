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
from PIL import Image

from scfm_diffusers import SCFMInferenceSettings, save_adapter

#: A fine-grained token that may not write to the namespace "org".
FINE_GRAINED = "hf_fine_grained_secret_987654"
#: Tokens the fake Hub accepts, with their role; any other token (or none) is refused with 401.
TOKENS = {"hf_test": "write", "hf_read": "read", FINE_GRAINED: "fineGrained"}


class FakeHub(BaseHTTPRequestHandler):
    """Answers whoami, repo creation and info, YAML validation, pre-upload and commit like the Hub.

    Records every request as ``(path, body, authorization)`` and every repo creation as ``(repo, status)``;
    ``repos`` holds the repositories that exist. Refusals echo the refused header, as a careless proxy might, so
    that tests see the errors built on them redact the token.
    """

    requests: list = []
    created: list = []
    repos: set = set()

    def log_message(self, *args):
        pass

    def _reply(self, payload, code=200):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _role(self):
        """The role of the request's token, or None after answering 401 for a missing or unknown one."""
        auth = self.headers.get("authorization") or ""
        role = TOKENS.get(auth.removeprefix("Bearer "))
        if role is None:
            self._reply({"error": f"Invalid credentials in Authorization header {auth!r}"}, 401)
        return role

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append((self.path, body, self.headers.get("authorization")))
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/validate-yaml":
            self._reply({"errors": [], "warnings": []})
            return
        role = self._role()
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization'] or 'user'}/{request['name']}"
            status = 401 if role is None else 403 if role != "write" else 409 if repo in self.repos else 200
            self.created.append((repo, status))
        if role is None:
            return
        if role != "write":
            auth = self.headers.get("authorization")
            self._reply({"error": f"You don't have the rights to write to this namespace with {auth!r}"}, 403)
        elif self.path == "/api/repos/create":
            self.repos.add(repo)
            self._reply({"url": f"{endpoint}/{repo}", "error": "You already created this model repo"}, status)
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        elif "/commit/" in self.path:
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            self._reply({"commitUrl": f"{endpoint}/{repo}/commit/1234", "commitOid": "1234"})
        else:
            self._reply({"error": "not found"}, 404)

    def do_GET(self):  # noqa: N802
        self.requests.append((self.path, b"", self.headers.get("authorization")))
        repo = self.path.removeprefix("/api/models/")
        if self.path == "/api/whoami-v2":
            role = self._role()
            if role is not None:
                token = {"displayName": "test", "role": role}
                self._reply({"type": "user", "name": "user", "auth": {"type": "access_token", "accessToken": token}})
        elif repo in self.repos:  # repo_info of a public repository: readable without a token
            self._reply({"id": repo, "private": False, "sha": "1234"})
        else:
            self._reply({"error": "not found"}, 404)


@pytest.fixture
def fake_hub():
    FakeHub.requests, FakeHub.created, FakeHub.repos = [], [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", FakeHub.requests
    server.shutdown()


def run_against(endpoint, code, hf_home, token=None):
    """Run ``code`` in a fresh interpreter talking to ``endpoint`` (huggingface_hub reads HF_ENDPOINT at import).

    ``HF_HOME`` is an empty folder, so only ``token`` (as HF_TOKEN) can authenticate.
    """
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home)}
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def saved_adapter(saved_pipelines, folder, **kwargs):
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    add_trained_lora(pipe.transformer)
    return save_adapter(folder, pipe.transformer, SCFMInferenceSettings.for_family("flux"), **kwargs)


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
    folder = saved_adapter(saved_pipelines, tmp_path / "out")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.bin").write_bytes(b"x")
    (folder / "cache").mkdir()
    (folder / "cache" / "latents.safetensors").write_bytes(b"x")

    code = f"from scfm_diffusers import push_adapter; print(push_adapter({str(folder)!r}, 'org/adapter'))"
    result = run_against(endpoint, code, tmp_path / "hf_home", token="hf_test")
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


def test_repo_created_before_training_is_reused_by_the_push(fake_hub, saved_pipelines, tmp_path):
    endpoint, requests = fake_hub
    # As the training script does: create the repository first, train, save, push to the same name.
    code = "from scfm_diffusers.hub import create_adapter_repo; print(create_adapter_repo('adapter'))"
    result = run_against(endpoint, code, tmp_path / "hf_home", token="hf_test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "user/adapter"  # a bare name lands in the token owner's namespace
    assert FakeHub.created == [("user/adapter", 200)] and not any("/commit/" in path for path, _, _ in requests)

    image = Image.new("RGB", (8, 8), (200, 30, 30))
    folder = saved_adapter(
        saved_pipelines, tmp_path / "out", validation_images=[image], validation_prompts=["a red square"]
    )
    code = f"from scfm_diffusers import push_adapter; print(push_adapter({str(folder)!r}, 'adapter'))"
    result = run_against(endpoint, code, tmp_path / "hf_home", token="hf_test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{endpoint}/user/adapter/commit/1234"

    assert FakeHub.created == [("user/adapter", 200), ("user/adapter", 409)]  # the Hub said "exists": reused
    (commit,) = [path for path, _, _ in requests if "/commit/" in path]
    assert commit.startswith("/api/models/user/adapter/commit/")
    files = committed_files(requests)
    assert files["images/validation_0.png"] == (folder / "images" / "validation_0.png").read_bytes()
    card = files["README.md"].decode()
    assert 'adapter="user/adapter"' in card and 'load_lora_weights("user/adapter")' in card  # full id, not "adapter"
    assert "url: images/validation_0.png" in card and "text: a red square" in card


def test_create_adapter_repo_fails_fast_with_a_clear_error_without_the_token(fake_hub, tmp_path):
    endpoint, requests = fake_hub
    FakeHub.repos.add("org/adapter")  # an earlier run's repository: create_repo alone would "succeed" on it
    secret = "hf_refused_secret_0123456789"
    code = f"""
import json
from scfm_diffusers.hub import create_adapter_repo
out = []
for token, repo in [({secret!r}, "org/adapter"), ("hf_read", "org/adapter"), (None, "org/adapter"),
                    ({FINE_GRAINED!r}, "org/new-adapter")]:
    try:
        out.append(create_adapter_repo(repo, token=token))
    except Exception as error:
        out.append([type(error).__name__, str(error), type(error.__cause__).__name__])
print(json.dumps(out))
"""
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    result = run_against(endpoint, code, hf_home)
    assert result.returncode == 0, result.stderr
    refused, read_only, missing, not_allowed = json.loads(result.stdout)

    kind, message, cause = refused
    # The server echoed the token, so the Hub's error is not chained (tracebacks print causes); its answer is
    # in the message with the token masked.
    assert (kind, cause) == ("PermissionError", "NoneType") and "401 Unauthorized" in message
    assert "refused the token (401" in message and "'org/adapter'" in message
    assert "hf auth login" in message and "huggingface-cli login" in message and "--hub_token" in message
    assert ("/api/whoami-v2", b"", f"Bearer {secret}") in requests  # it did reach the Hub and was refused there

    kind, message, cause = read_only
    assert kind == "PermissionError" and "read-only" in message and "write access" in message

    kind, message, cause = missing
    assert (kind, cause) == ("PermissionError", "LocalTokenNotFoundError")
    assert "no Hugging Face token found" in message and "hf auth login" in message

    kind, message, cause = not_allowed
    assert (kind, cause) == ("PermissionError", "NoneType")  # echoed token: not chained, as above
    assert "may not write to the namespace 'org'" in message and "(403 Forbidden" in message

    for token in (secret, FINE_GRAINED):  # though the server's answers echoed them
        assert token not in result.stdout + result.stderr
    assert FakeHub.created == [("org/new-adapter", 403)]  # the other refusals came before any creation attempt
    written = [path.read_text(errors="ignore") for path in hf_home.rglob("*") if path.is_file()]
    assert not any(token in text for text in written for token in (secret, FINE_GRAINED))


def test_push_reports_unreachable_hub(saved_pipelines, tmp_path):
    folder = saved_adapter(saved_pipelines, tmp_path / "out")
    code = f"from scfm_diffusers import push_adapter; push_adapter({str(folder)!r}, 'org/adapter')"
    result = run_against("http://127.0.0.1:9", code, tmp_path / "hf_home", token="hf_test")
    assert result.returncode != 0
    assert "ConnectError" in result.stderr  # the connection error surfaces, chained; nothing is swallowed
    assert "OSError: Cannot create the Hub repository 'org/adapter': the Hub at http://127.0.0.1:9 could not be" in (
        result.stderr
    )
    assert "org/adapter" not in (folder / "README.md").read_text()  # the card is untouched when nothing went up


TRAIN_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "train_scfm_lora.py")


def train_with_push(endpoint, saved_pipelines, image_dir, output_dir, hf_home, token, base_model_id="org/tiny-flux"):
    """The training script with --push_to_hub against the fake Hub (a fresh interpreter: HF_ENDPOINT at import)."""
    argv = ["--base_model_id", base_model_id] if base_model_id else []
    argv += [
        "--pretrained_model_name_or_path", saved_pipelines["flux"],
        "--train_data_dir", str(image_dir),
        "--output_dir", str(output_dir),
        "--resolution", "32", "--max_sequence_length", "8", "--rank", "4", "--lora_alpha", "8",
        "--teacher_grid_size_min", "4", "--teacher_grid_size_max", "4",
        "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none",
        "--push_to_hub", "--hub_model_id", "org/flux-scfm", "--hub_token", token,
    ]  # fmt: skip
    code = f"import runpy, sys; sys.argv = ['train'] + {argv!r}; runpy.run_path({TRAIN_SCRIPT!r}, run_name='__main__')"
    return run_against(endpoint, code, hf_home)


@pytest.mark.slow
def test_training_creates_the_repo_first_and_pushes_at_the_end(fake_hub, saved_pipelines, tmp_path):
    endpoint, requests = fake_hub
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (36, 36), (40 * index, 100, 200)).save(images / f"{index}.png")
    (images / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "a"}) + "\n" for i in range(2))
    )

    # A refused token stops the run before any data or model work, with the fix and without the token.
    bad = "hf_refused_training_token_42"
    result = train_with_push(endpoint, saved_pipelines, images, tmp_path / "bad", tmp_path / "hf_home", bad)
    assert result.returncode != 0 and "hf auth login" in result.stderr
    assert bad not in result.stdout + result.stderr
    assert not (tmp_path / "bad" / "cache").exists(), "the repository must be checked before the data is cached"

    # A local base folder without --base_model_id: the card would need a path as base_model; refused up front.
    result = train_with_push(
        endpoint, saved_pipelines, images, tmp_path / "nobase", tmp_path / "hf_home", "hf_test", base_model_id=None
    )
    assert result.returncode != 0 and "add --base_model_id org/name" in result.stderr
    assert not (tmp_path / "nobase" / "cache").exists()

    result = train_with_push(endpoint, saved_pipelines, images, tmp_path / "good", tmp_path / "hf_home", "hf_test")
    assert result.returncode == 0, result.stderr[-3000:]
    assert FakeHub.created[-2:] == [("org/flux-scfm", 200), ("org/flux-scfm", 409)]  # created first, reused at the end
    files = committed_files(requests)
    assert {"pytorch_lora_weights.safetensors", "scfm_settings.json", "README.md"} <= set(files)
    assert not any(name.startswith(("checkpoint-", "cache/")) for name in files)
    assert ".scfm.lock" not in files and (tmp_path / "good" / ".scfm.lock").is_file()  # the run's lock stays local
    card = (tmp_path / "good" / "README.md").read_text()
    assert "base_model: org/tiny-flux" in card and saved_pipelines["flux"] not in card


def test_base_model_is_a_hub_id_never_a_path(tmp_path):
    from scfm_diffusers.hub import base_model_hub_id, base_model_identity

    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert base_model_hub_id("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    assert base_model_hub_id(snapshot) == "black-forest-labs/FLUX.1-dev"  # a Hugging Face cache snapshot
    assert base_model_hub_id(snapshot / "transformer") == "black-forest-labs/FLUX.1-dev"
    local = tmp_path / "my-flux"
    local.mkdir()
    assert base_model_hub_id(local) is None and base_model_hub_id("./my-flux") is None
    assert base_model_hub_id(local, "org/my-flux") == "org/my-flux"
    with pytest.raises(ValueError, match="--base_model_id must be a Hub repository id"):
        base_model_hub_id(local, "/data/my-flux")
    # The identity of a folder is its content: the same folder through a symlink or a relative path is the same base.
    (local / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "link").symlink_to(local)
    identity = base_model_identity(local)
    assert identity == base_model_identity(tmp_path / "link") and str(tmp_path) not in identity
    (local / "model_index.json").write_text('{"_class_name": "FluxPipeline", "x": 1}')
    assert base_model_identity(local) != identity
