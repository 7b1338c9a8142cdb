"""Handle resolution with the hub download functions replaced by local fakes: no network."""

import os
import sys

# Belt to the fakes' braces: should a real download call slip through, it fails offline.
os.environ["HF_HUB_OFFLINE"] = "1"

import httpx2  # the HTTP client of the installed huggingface_hub (2.x); its errors wrap httpx2's
import huggingface_hub
import kagglehub
import pytest
import requests
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from kagglehub.exceptions import KaggleApiHTTPError, UnauthenticatedError

from gemma_keras.checkpoints.resolve import HF_ALLOW_PATTERNS, resolve_preset
from gemma_keras.errors import CheckpointError, PresetAccessError, UnknownPresetError


class FakeDownload:
    """Stands in for a hub download function: records its calls, returns a directory or raises."""

    def __init__(self, directory, error=None):
        self.directory = directory
        self.error = error
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return str(self.directory)


def _refuse(*args, **kwargs):
    raise AssertionError(f"a test reached a real hub download: {args} {kwargs}")


@pytest.fixture(autouse=True)
def no_real_downloads(monkeypatch):
    monkeypatch.setattr(kagglehub, "model_download", _refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _refuse)


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    fake = FakeDownload(tmp_path)
    monkeypatch.setattr(kagglehub, "model_download", fake)
    return fake


@pytest.fixture
def fake_hf(monkeypatch, tmp_path):
    fake = FakeDownload(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def _requests_response(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.url = "https://www.kaggle.com/api/v1/models/keras/gemma/keras/gemma_2b_en/3/download"
    return response


def _hf_response(status: int) -> httpx2.Response:
    url = "https://huggingface.co/api/models/google/gemma-2-2b/revision/main"
    return httpx2.Response(status, request=httpx2.Request("GET", url))


# ---- Kaggle ------------------------------------------------------------------------------------
def test_builtin_name_downloads_its_kaggle_handle(fake_kaggle, tmp_path):
    assert resolve_preset("gemma2_instruct_2b_en") == tmp_path
    assert fake_kaggle.calls == [(("keras/gemma2/keras/gemma2_instruct_2b_en/2",), {})]


def test_builtin_name_with_dots(fake_kaggle):
    resolve_preset("gemma_1.1_instruct_7b_en")
    assert fake_kaggle.calls[0][0] == ("keras/gemma/keras/gemma_1.1_instruct_7b_en/5",)


@pytest.mark.parametrize("handle", [
    "keras/gemma/keras/gemma_2b_en/3",
    "keras/gemma/keras/gemma_2b_en",
])
def test_kaggle_handle_with_and_without_version(fake_kaggle, tmp_path, handle):
    assert resolve_preset(f"kaggle://{handle}") == tmp_path
    assert fake_kaggle.calls[0][0] == (handle,)


@pytest.mark.parametrize("handle", [
    "kaggle://keras/gemma",
    "kaggle://keras/gemma/keras/gemma_2b_en/latest",
    "kaggle://keras//keras/gemma_2b_en",
])
def test_malformed_kaggle_handle(fake_kaggle, handle):
    with pytest.raises(UnknownPresetError, match="owner/model/framework/variation"):
        resolve_preset(handle)
    assert fake_kaggle.calls == []


@pytest.mark.parametrize("status", [401, 403])
def test_kaggle_refusal_explains_license_and_credentials(monkeypatch, tmp_path, status):
    error = KaggleApiHTTPError(f"{status} Client Error.", response=_requests_response(status))
    monkeypatch.setattr(kagglehub, "model_download", FakeDownload(tmp_path, error))
    with pytest.raises(PresetAccessError) as info:
        resolve_preset("gemma_2b_en")
    message = str(info.value)
    assert "https://www.kaggle.com/models/keras/gemma" in message
    assert "license" in message
    assert "KAGGLE_USERNAME" in message and "~/.kaggle/kaggle.json" in message
    assert info.value.__cause__ is error


def test_kaggle_without_credentials_is_an_access_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kagglehub, "model_download",
                        FakeDownload(tmp_path, UnauthenticatedError()))
    with pytest.raises(PresetAccessError, match="https://www.kaggle.com/models/keras/gemma2"):
        resolve_preset("gemma2_2b_en")


def test_kaggle_not_found(monkeypatch, tmp_path):
    error = KaggleApiHTTPError("404 Client Error.", response=_requests_response(404))
    monkeypatch.setattr(kagglehub, "model_download", FakeDownload(tmp_path, error))
    with pytest.raises(CheckpointError, match="not found"):
        resolve_preset("kaggle://keras/gemma/keras/gemma_2b_en/99")


def test_kaggle_network_failure_suggests_a_local_directory(monkeypatch, tmp_path):
    error = requests.ConnectionError("Failed to resolve www.kaggle.com")
    monkeypatch.setattr(kagglehub, "model_download", FakeDownload(tmp_path, error))
    with pytest.raises(CheckpointError, match="local directory") as info:
        resolve_preset("gemma_2b_en")
    assert "failed" in str(info.value)


# ---- Hugging Face ------------------------------------------------------------------------------
@pytest.mark.parametrize("handle, repo_id, revision", [
    ("hf://google/gemma-2-2b", "google/gemma-2-2b", None),
    ("hf://google/gemma-2b-it@main", "google/gemma-2b-it", "main"),
    ("hf://google/gemma-2-9b@refs/pr/1", "google/gemma-2-9b", "refs/pr/1"),
])
def test_hf_handle_with_and_without_revision(fake_hf, tmp_path, handle, repo_id, revision):
    assert resolve_preset(handle) == tmp_path
    (args, kwargs), = fake_hf.calls
    assert args == ()
    assert kwargs == {"repo_id": repo_id, "revision": revision,
                      "allow_patterns": HF_ALLOW_PATTERNS}


def test_hf_downloads_only_what_the_reader_needs():
    assert set(HF_ALLOW_PATTERNS) == {
        "config.json", "generation_config.json", "*.safetensors",
        "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"}


@pytest.mark.parametrize("handle", ["hf://gemma", "hf://google/gemma-2b@", "hf://a/b/c"])
def test_malformed_hf_handle(fake_hf, handle):
    with pytest.raises(UnknownPresetError, match="org/repo"):
        resolve_preset(handle)
    assert fake_hf.calls == []


@pytest.mark.parametrize("error_class, status", [
    (GatedRepoError, 403),
    (GatedRepoError, 401),
    (RepositoryNotFoundError, 401),
])
def test_hf_refusal_explains_license_and_credentials(monkeypatch, tmp_path, error_class, status):
    error = error_class(f"{status} Client Error.", response=_hf_response(status))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeDownload(tmp_path, error))
    with pytest.raises(PresetAccessError) as info:
        resolve_preset("hf://google/gemma-2-2b@main")
    message = str(info.value)
    assert "https://huggingface.co/google/gemma-2-2b" in message
    assert "license" in message
    assert "HF_TOKEN" in message and "huggingface-cli login" in message
    assert info.value.__cause__ is error


@pytest.mark.parametrize("error", [
    LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
    httpx2.ConnectError("connection refused"),
    httpx2.ReadTimeout("read timed out"),
])
def test_hf_network_failure_suggests_a_local_directory(monkeypatch, tmp_path, error):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeDownload(tmp_path, error))
    with pytest.raises(CheckpointError, match="local directory"):
        resolve_preset("hf://google/gemma-2-2b")


def test_hf_without_huggingface_hub_says_what_to_install(monkeypatch):
    # A None entry in sys.modules makes `import huggingface_hub` raise ImportError.
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r'pip install "gemma-keras\[hf\]"'):
        resolve_preset("hf://google/gemma-2-2b")


# ---- local directories and unknown names -------------------------------------------------------
def test_existing_directory_is_returned(tmp_path):
    assert resolve_preset(str(tmp_path)) == tmp_path
    assert resolve_preset(tmp_path) == tmp_path


def test_existing_relative_directory_without_a_separator(monkeypatch, tmp_path):
    (tmp_path / "my_gemma").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_preset("my_gemma").resolve() == tmp_path / "my_gemma"


def test_home_relative_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    assert resolve_preset("~/ckpt") == tmp_path / "ckpt"


@pytest.mark.parametrize("path", ["./no_such_checkpoint", "~/no_such_checkpoint",
                                  "/no/such/checkpoint", "some/relative/dir"])
def test_missing_local_directory(path):
    with pytest.raises(CheckpointError, match="no such directory") as info:
        resolve_preset(path)
    assert path in str(info.value)


def test_file_instead_of_directory(tmp_path):
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="directory"):
        resolve_preset(str(weights))


def test_unknown_name_lists_close_presets():
    with pytest.raises(UnknownPresetError) as info:
        resolve_preset("gemma2_2b")
    message = str(info.value)
    assert "gemma2_2b_en" in message
    assert "gk.list_presets()" in message


def test_demo_preset_resolves_to_the_installed_directory_without_network():
    directory = resolve_preset("gemma_demo")  # the autouse fixture refuses every download
    assert (directory / "config.json").is_file()
    assert (directory / "model.weights.h5").is_file()
    assert (directory / "assets" / "tokenizer" / "vocabulary.spm").is_file()


def test_unknown_name_mentions_the_demo_preset():
    with pytest.raises(UnknownPresetError, match="gemma_demo"):
        resolve_preset("no_such_gemma")


# ---- what a wrong name suggests (issue 32, item 7) ---------------------------------------------
# (what was typed, the suggestions that must come first, in order): Python's message and the
# command line's one line both carry them.
WRONG_NAMES = [
    ("gema_demo", ["gemma_demo"]),  # the demo has no card, yet it is a preset
    ("Gemma2-2B-EN", ["gemma2_2b_en"]),  # case, "-" for "_"
    ("gemma2_2b", ["gemma2_2b_en"]),
    ("gemma_1_1_instruct_2b_en", ["gemma_1.1_instruct_2b_en"]),  # "." left out
    # A Hugging Face repo's name: the preset of that very model (instruct, not base), then the
    # handle that downloads that repo.
    ("gemma-2-2b-it", ["gemma2_instruct_2b_en", "hf://google/gemma-2-2b-it"]),
    ("gemma-2-9b", ["gemma2_9b_en", "hf://google/gemma-2-9b"]),
    ("codegemma-7b-it", ["code_gemma_instruct_7b_en", "hf://google/codegemma-7b-it"]),
]


def _suggested(message):
    """The names after "Did you mean:" in `message`, in order."""
    assert "Did you mean: " in message, message
    return message.split("Did you mean: ", 1)[1].split("?", 1)[0].split(", ")


@pytest.mark.once("jax")
@pytest.mark.parametrize("name, first", WRONG_NAMES)
def test_a_wrong_name_suggests_the_preset_meant_first(name, first):
    with pytest.raises(UnknownPresetError) as info:
        resolve_preset(name)
    message = str(info.value)
    assert _suggested(message)[:len(first)] == first, message
    assert "gk.list_presets()" in message


@pytest.mark.once("jax")
@pytest.mark.parametrize("name, preset", [("google/gemma-2-2b-it", "gemma2_instruct_2b_en"),
                                          ("google/gemma-3-1b-it", "gemma3_instruct_1b"),
                                          ("google/embeddinggemma-300m", None)])
def test_an_hf_repo_id_that_is_no_directory_suggests_its_hf_handle(name, preset):
    # owner/name is also a relative path: it stays a missing directory, and the message says
    # how to name the repo (and the built-in preset of the same model, when there is one).
    with pytest.raises(CheckpointError, match="no such directory") as info:
        resolve_preset(name)
    message = str(info.value)
    assert f"hf://{name}" in message
    assert (preset in message) if preset else "preset" not in message


@pytest.mark.once("jax")
@pytest.mark.parametrize("name, first", WRONG_NAMES + [("google/gemma-2-2b-it", None)])
def test_the_command_line_gives_the_same_suggestions_in_one_line(name, first, capsys):
    from gemma_keras import cli

    # The preset is checked before Keras loads: no model is built here.
    assert cli.main(["generate", "--preset", name, "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if first is None:
        assert f"hf://{name}" in err and "gemma2_instruct_2b_en" in err, err
    else:
        assert _suggested(err)[:len(first)] == first, err
        assert "`gemma-keras presets`" in err and "gk.list_presets" not in err, err
