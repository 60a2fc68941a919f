"""The bad-input catalogue, end to end through the `mllm` CLI: config, data, models, URIs and storage.

The project rule, checked after every case by `refused`: exit code 2; exactly one line on stderr, naming the
offending field (`merge.density`, `data.datasets[0].path`, `--model`, `search.storage`, ...) and saying how to
fix it; nothing half-written: no new registered model version, no MLflow run left RUNNING, no new folder under
output_dir that looks like a complete model. Cases run in-process (`mllm.cli.main`) for speed; three run the
installed `mllm` script to prove the real exit code. Everything lives in per-test (or per-module) tmp folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mllm.cli import main

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
LABELS = ("negative", "neutral", "positive")
SECRET = "s3cr3t-pw"  # must never reach the terminal


# --- helpers ----------------------------------------------------------------------------------------------


def stage_options(tmp: Path, store: Path | None = None) -> list[str]:
    """`-c tiny.yaml` plus stores, artifacts and output in tmp folders (`store`: a shared tracking folder)."""
    db = (store or tmp) / "mlflow.db"
    return ["-c", str(TINY), "--set", f"tracking.tracking_uri=sqlite:///{db}", "--set",
            f"tracking.artifact_location={store or tmp}/artifacts", "--set", f"search.storage=sqlite:///{tmp}/optuna.db",
            "--set", f"output_dir={tmp}/out", "--set", "data.max_rows=150"]


def store_state(db: Path) -> tuple[set[str], list[str]]:
    """(registered versions as name/version, ids of RUNNING runs in any experiment) of the SQLite store `db`."""
    if not db.exists():  # nothing ever opened it: nothing registered, nothing running
        return set(), []
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    versions = {f"{v.name}/{v.version}" for v in client.search_model_versions()}
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    running = [r.info.run_id for r in client.search_runs(experiments, "attributes.status = 'RUNNING'",
                                                         run_view_type=ViewType.ALL)] if experiments else []
    return versions, running


def run_statuses(db: Path) -> list[str]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [r.info.status for r in client.search_runs(experiments, run_view_type=ViewType.ALL)]


def model_folders(root: Path) -> set[Path]:
    """Folders under `root` that look like a complete checkpoint (config + safetensors), and leftover
    temporary folders of `atomic_dir`."""
    if not root.exists():
        return set()
    complete = {p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))}
    return complete | set(root.rglob(".*.tmp"))


def refused(args: list[str], field: str, capfd: pytest.CaptureFixture[str], tmp: Path, *, store: Path | None = None,
            contains: tuple[str, ...] = (), absent: tuple[str, ...] = ()) -> str:
    """Run `mllm args` in-process and check the rule; return the error line."""
    db = (store or tmp) / "mlflow.db"
    versions_before, _ = store_state(db)
    folders_before = model_folders(tmp / "out")
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("mllm: error: ") and "; fix: " in line, line
    assert field in line.split("; fix: ")[0], f"{field!r} not named in: {line}"
    for text in contains:
        assert text in line, f"{text!r} not in: {line}"
    for text in (*absent, "Traceback"):
        assert text not in err + out, f"{text!r} printed: {line}"
    versions_after, running = store_state(db)
    assert versions_after == versions_before, "a model version was registered"
    assert store is not None or versions_after == set()  # (a per-test store holds none at all)
    assert running == [], "a run was left RUNNING"
    assert model_folders(tmp / "out") <= folders_before, "a model folder was left in output_dir"
    print(line)  # pytest -s shows the catalogue's messages
    return line


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# --- tiny model folders, good and bad, built once per module ------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    from mllm.models.tiny import build_tiny_classifier

    root = tmp_path_factory.mktemp("bad-models")
    out = {"good": build_tiny_classifier("gpt2", root / "good", LABELS, seed=0),
           "good2": build_tiny_classifier("gpt2", root / "good2", LABELS, seed=1),
           "llama": build_tiny_classifier("llama", root / "llama", LABELS, seed=1),
           "two-labels": build_tiny_classifier("gpt2", root / "two-labels", ("bad", "good"), seed=1),
           "other-labels": build_tiny_classifier("gpt2", root / "other-labels", ("bad", "meh", "great"), seed=1)}

    def variant(name: str) -> Path:
        return Path(shutil.copytree(out["good2"], root / name))

    vocab = variant("vocab")
    config = json.loads((vocab / "config.json").read_text())
    config["vocab_size"] += 1
    (vocab / "config.json").write_text(json.dumps(config))
    pickled = variant("pickled")  # the same weights as a pickle only: loading it would run arbitrary code
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    no_tokenizer = variant("no-tokenizer")
    for f in [*no_tokenizer.glob("tokenizer*"), *no_tokenizer.glob("special_tokens*")]:
        f.unlink()
    causal = root / "causal-lm"  # a plain language model saved with save_pretrained: no classifier head
    lm_config = AutoConfig.from_pretrained(out["good"])
    lm_config.architectures = None
    GPT2LMHeadModel(lm_config).save_pretrained(causal)
    AutoTokenizer.from_pretrained(out["good"]).save_pretrained(causal)
    remote = variant("remote-code")  # asks for its own Python classes, which would write a marker when imported
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"from pathlib import Path\nPath({str(root / 'PWNED')!r}).write_text('x')\n"
                                    "from transformers import GPT2Config as EvilConfig\n"
                                    "from transformers import GPT2ForSequenceClassification as EvilModel\n")
    out.update({"vocab": vocab, "pickled": pickled, "no-tokenizer": no_tokenizer, "causal": causal,
                "remote": remote, "root": root})
    return out


@pytest.fixture(scope="module")
def registered(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tracking store holding `tiny-merged` version 1 (a real `mllm merge` of two tiny folders)."""
    from mllm import merge
    from mllm.config import load_config

    store = tmp_path_factory.mktemp("registered")
    cfg = load_config(TINY, [f"tracking.tracking_uri=sqlite:///{store}/mlflow.db", f"output_dir={store}/out",
                             f"tracking.artifact_location={store}/artifacts", "merge.method=linear"])
    result = merge.run(cfg, [str(models["good"]), str(models["good2"])])
    assert result.model_uri == "models:/tiny-merged/1"
    return {"store": str(store), "run_id": result.run_id}


# --- config ---------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    # (command, extra arguments, field, also in the line)
    ("finetune", ["--set", "finetune.batch_size=big"], "finetune.batch_size", "valid integer"),
    ("finetune", ["--set", "finetune.epochs=-1"], "finetune.epochs", "greater than 0"),
    ("merge", ["--set", "merge.colour=red"], "merge.colour", "unknown key"),
    ("merge", ["--method", "frankenmerge"], "merge.method", "frankenmerge"),
    ("merge", ["--weights", "0,0,0"], "merge.weights", "not all zero"),
    ("merge", ["--weights", "1,nan,1"], "merge.weights", "finite"),
    ("merge", ["--density", "0"], "merge.density", "greater than 0"),
    ("merge", ["--density", "1.5"], "merge.density", "less than or equal to 1"),
    ("search", ["--set", "search.objective_split=test"], "search.objective_split", "validation"),
    ("promote", ["--set", "promote.split=test"], "promote.split", "decides nothing"),
    ("promote", ["--set", "promote.split=selection"], "promote.split=selection", "data.selection_fraction"),
    ("promote", ["--set", "promote.margin=1"], "promote.margin", "less than 1"),
    ("promote", ["--set", "promote.non_inferiority_margin=-0.1"], "promote.non_inferiority_margin", "greater than"),
    ("promote", ["--set", "promote.alpha=0"], "promote.alpha", "greater than 0"),
    ("promote", ["--set", "promote.alpha=1"], "promote.alpha", "less than 1"),
    ("promote", ["--set", "promote.split=validation"], "promote.split=validation", "promote.allow_search_split"),
    ("search", ["--set", "search.crossfit_fraction=1"], "search.crossfit_fraction", "outside (0, 1)"),
    ("search", ["--set", "search.crossfit_fraction=0"], "search.crossfit_fraction", "outside (0, 1)"),
    ("search", ["--set", "search.se_multiplier=-0.5"], "search.se_multiplier", "below 0"),
    ("merge", ["--set", "merge.method"], "--set", "KEY=VALUE"),
    ("merge", ["--set", "model.name_or_path.x=1"], "--set", "is a value, not a section"),
    ("search", ["--set", "search.storage=${MLLM_TEST_SURELY_UNSET}"], "search.storage", "MLLM_TEST_SURELY_UNSET"),
]


@pytest.mark.parametrize(("command", "extra", "field", "also"), CONFIG_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3][:12]}" for c in CONFIG_CASES])
def test_bad_config(tmp_path: Path, capfd, command: str, extra: list[str], field: str, also: str) -> None:
    refused([command, *stage_options(tmp_path), *extra], field, capfd, tmp_path, contains=(also,))
    assert not (tmp_path / "mlflow.db").exists()  # refused while loading the config: no store was even opened


def test_unknown_key_in_a_config_file(tmp_path: Path, capfd) -> None:
    bad = write(tmp_path / "bad.yaml", "name: x\nmergee:\n  method: ties\n")
    refused(["validate", str(bad)], "mergee", capfd, tmp_path, contains=("unknown key", "allowed here: name"))


# --- data -----------------------------------------------------------------------------------------------------

DATA_CASES = [
    # (file name, content or None for no file, extra dataset keys, field, also in the line)
    ("missing.csv", None, "", "data.datasets[0].path", "not found"),
    ("empty.csv", "", "", "data.datasets[0].path", "is empty"),
    ("header.csv", "text,label\n", "", "data.datasets[0].path", "header but no rows"),
    ("notext.csv", "review,label\nfine,9\n", "", "data.datasets[0].text_columns", "no column 'text'"),
    ("nolabel.csv", "text,stars\nfine,9\n", "", "data.datasets[0].label_column", "no column 'label'"),
    ("nan.csv", "text,label\nfine,9\nawful,\nmeh,5\n", "", "data.datasets[0].label_column", "missing label"),
    ("unknown.csv", "text,label\nfine,positive\nawful,dreadful\n", ", label_kind: sentiment",
     "data.datasets[0].label_column", "unknown label strings ['dreadful']"),
    ("words.csv", "text,label\nfine,9\nawful,terrible\n", "", "data.datasets[0].label_column", "non-numeric"),
    ("latin1.csv", "text,label\ncaf\xe9 was fine,9\nawful,1\n".encode("latin-1"), "", "data.datasets[0].encoding",
     "encoding=latin-1"),
]


@pytest.mark.parametrize(("name", "content", "extra", "field", "also"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path: Path, capfd, name: str, content: str | bytes | None, extra: str, field: str,
                  also: str) -> None:
    path = tmp_path / name
    if content is not None:
        write(path, content)
    datasets = f"data.datasets=[{{path: '{path}'{extra}}}]"
    refused(["finetune", *stage_options(tmp_path), "--set", datasets], field, capfd, tmp_path, contains=(also,))
    assert not (tmp_path / "mlflow.db").exists()  # data is read before any run is opened


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path, capfd) -> None:
    """Not a refusal: Excel and Notepad write UTF-8 with a byte-order mark. It is valid UTF-8, so mllm strips it
    when decoding (mllm.data.sources.parse_table) instead of refusing the file; the first header column must be found
    as `text`, not as `\\ufefftext`."""
    path = write(tmp_path / "bom.csv", "\ufefftext,label\ngreat drug,9\nawful side effects,1\nso-so,5\n".encode())
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["data", "stats", "--dataset", str(path), "--format", "json"])
    out, err = capfd.readouterr()
    assert info.value.code == 0, err
    [ds] = json.loads(out)["datasets"]
    assert ds["rows"] == 3 and ds["labels"] == {"negative": 1, "neutral": 1, "positive": 1}


# --- models ---------------------------------------------------------------------------------------------------

EVALUATE_FOLDERS = [
    ("pickled", "only pickle weights (pytorch_model.bin)"),
    ("no-tokenizer", "has no tokenizer"),
    ("causal", "not a sequence classifier (GPT2LMHeadModel)"),
    ("remote", "asks for custom code"),
    ("two-labels", "predicts ['bad', 'good']"),
]


@pytest.mark.parametrize(("folder", "also"), EVALUATE_FOLDERS, ids=[c[0] for c in EVALUATE_FOLDERS])
def test_evaluate_refuses_unusable_model_folder(models: dict[str, Path], tmp_path: Path, capfd, folder: str,
                                                also: str) -> None:
    refused(["evaluate", *stage_options(tmp_path), "--model", str(models[folder]), "--no-baselines"], "--model",
            capfd, tmp_path, contains=(also,))
    assert not (models["root"] / "PWNED").exists()  # the auto_map code was never imported


MERGE_MEMBERS = [
    # (members, field, also in the line)
    (["good", "llama"], "--member", "in model_type (llama vs gpt2)"),
    (["good", "vocab"], "--member", "in vocab_size"),
    (["good", "two-labels"], "--member", "has 2 labels, good has 3"),
    (["good", "other-labels"], "--member", "has labels ['bad', 'meh', 'great']"),
    (["good", "causal"], "--member", "not a sequence classifier"),
    (["good", "pickled"], "--member", "only pickle weights"),
    (["no-tokenizer", "good"], "--member", "has no tokenizer"),  # the first member gives the merge its tokenizer
    (["good", "remote"], "--member", "asks for custom code"),
]


@pytest.mark.parametrize(("members", "field", "also"), MERGE_MEMBERS, ids=["+".join(c[0]) for c in MERGE_MEMBERS])
def test_merge_refuses_members_that_cannot_merge(models: dict[str, Path], tmp_path: Path, capfd, members: list[str],
                                                 field: str, also: str) -> None:
    args = [a for m in members for a in ("--member", str(models[m]))]
    refused(["merge", *stage_options(tmp_path), "--method", "linear", *args], field, capfd, tmp_path, contains=(also,))
    assert not (tmp_path / "out" / "merged").exists()


def test_merge_member_folder_that_does_not_exist(models: dict[str, Path], tmp_path: Path, capfd) -> None:
    refused(["merge", *stage_options(tmp_path), "--method", "linear", "--member", str(tmp_path / "nowhere"),
             "--member", str(models["good"])], "--member", capfd, tmp_path, contains=("neither an existing folder",))


def test_merge_weights_per_member(models: dict[str, Path], tmp_path: Path, capfd) -> None:
    refused(["merge", *stage_options(tmp_path), "--method", "linear", "--weights", "1,2,3", "--member",
             str(models["good"]), "--member", str(models["good2"])], "merge.weights", capfd, tmp_path,
            contains=("3 values for 2 members",))
    assert not (tmp_path / "mlflow.db").exists() or run_statuses(tmp_path / "mlflow.db") == []  # no run opened


@pytest.mark.parametrize(("name", "also"), [("pickled", "only pickle weights"), ("missing", "is not a folder"),
                                            ("tiny-gpt3", "unknown tiny model")])
def test_finetune_refuses_pretrained_model(models: dict[str, Path], tmp_path: Path, capfd, name: str,
                                           also: str) -> None:
    source = {"pickled": str(models["pickled"]), "missing": "./no/such/folder"}.get(name, name)
    refused(["finetune", *stage_options(tmp_path), "--set", f"model.name_or_path={source}"], "model.name_or_path",
            capfd, tmp_path, contains=(also,))
    # Refused before the finetune stage opens a run.
    assert run_statuses(tmp_path / "mlflow.db") == []
    assert not (tmp_path / "out" / "base").exists()


# --- model URIs -----------------------------------------------------------------------------------------------

URI_CASES = [
    ("models:/nosuch-model/1", "nosuch-model"),  # unknown registered model name
    ("models:/tiny-merged@nope", "alias"),  # unknown alias
    ("models:/tiny-merged/99", "tiny-merged/99"),  # unknown version
    ("runs:/deadbeef/model", "no run deadbeef"),  # unknown run id
    ("runs:/{run_id}/nope", "no artifact folder nope"),  # a real run without that artifact
    ("models:/tiny-merged", "names no version"),  # malformed: no version
    ("modles:/tiny-merged/1", "unknown scheme"),  # malformed: a typo in the scheme
    ("no-such-model", "neither an existing folder nor"),  # neither URI nor folder
]


@pytest.mark.parametrize(("uri", "also"), URI_CASES, ids=[c[0] for c in URI_CASES])
def test_evaluate_refuses_bad_model_uri(registered: dict[str, str], tmp_path: Path, capfd, uri: str,
                                        also: str) -> None:
    uri = uri.format(run_id=registered["run_id"])
    store = Path(registered["store"])
    refused(["evaluate", *stage_options(tmp_path, store), "--model", uri], "--model", capfd, tmp_path, store=store,
            contains=(also,))


def test_merge_refuses_unknown_base_uri(registered: dict[str, str], models: dict[str, Path], tmp_path: Path,
                                        capfd) -> None:
    store = Path(registered["store"])
    refused(["merge", *stage_options(tmp_path, store), "--member", str(models["good"]), "--member",
             str(models["good2"]), "--base", "models:/tiny-base@champion"], "--base", capfd, tmp_path, store=store)


def test_bigger_model_that_does_not_exist(models: dict[str, Path], tmp_path: Path, capfd) -> None:
    refused(["evaluate", *stage_options(tmp_path), "--model", str(models["good"]), "--set",
             f"model.bigger_model={tmp_path / 'bigger'}"], "model.bigger_model", capfd, tmp_path)


# --- storage --------------------------------------------------------------------------------------------------


def test_search_storage_unreachable_database_hides_the_password(tmp_path: Path, capfd) -> None:
    line = refused(["search", *stage_options(tmp_path), "--set",
                    f"search.storage=postgresql+psycopg2://u:{SECRET}@127.0.0.1:9/x"], "search.storage", capfd,
                   tmp_path, contains=("u:***@127.0.0.1:9",), absent=(SECRET,))
    assert "Connection refused" in line or "connect" in line


def test_search_storage_bad_scheme(tmp_path: Path, capfd) -> None:
    refused(["search", *stage_options(tmp_path), "--storage", "nosuchdb://x/y"], "search.storage", capfd, tmp_path,
            contains=("nosuchdb://x/y",))


def test_promote_without_a_study(tmp_path: Path, capfd) -> None:
    refused(["promote", *stage_options(tmp_path)], "search.study_name", capfd, tmp_path, contains=("no study",))


def test_tracking_database_unreachable_hides_the_password(models: dict[str, Path], tmp_path: Path, capfd) -> None:
    refused(["merge", *stage_options(tmp_path), "--set",
             f"tracking.tracking_uri=postgresql+psycopg2://u:{SECRET}@127.0.0.1:9/mlflow", "--member",
             str(models["good"]), "--member", str(models["good2"]), "--method", "linear"], "tracking.tracking_uri",
            capfd, tmp_path, absent=(SECRET,))


@pytest.mark.parametrize("key", ["tracking.tracking_uri", "tracking.registry_uri"])
def test_tracking_server_unreachable(models: dict[str, Path], tmp_path: Path, capfd, key: str) -> None:
    refused(["evaluate", *stage_options(tmp_path), "--set", f"{key}=http://127.0.0.1:9", "--model",
             str(models["good"])], key, capfd, tmp_path, contains=("cannot reach http://127.0.0.1:9",))


class RejectingS3(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request as S3 does for an unknown access key."""

    def reject(self) -> None:
        body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS "
                b"Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = reject

    def log_message(self, *args: object) -> None:  # keep the test's stderr to mllm's own line
        pass


@pytest.fixture(params=["unreachable", "bad-credentials"])
def bad_s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """(artifact location, what the error line says): an S3 endpoint nobody listens on, or one that refuses the
    (fake) keys; boto makes a single attempt."""
    server = None
    endpoint = "http://127.0.0.1:9"
    if request.param == "bad-credentials":
        server = ThreadingHTTPServer(("127.0.0.1", 0), RejectingS3)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_port}"
    for key, value in {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIAFAKE",
                       "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                       "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(key, value)
    yield "s3://mllm-bucket/artifacts", "InvalidAccessKeyId" if server else "Could not connect"
    if server is not None:
        server.shutdown()
        server.server_close()


def test_s3_artifact_store_is_checked_before_any_run(models: dict[str, Path], tmp_path: Path, capfd,
                                                     bad_s3: tuple[str, str]) -> None:
    location, says = bad_s3
    refused(["merge", *stage_options(tmp_path), "--set", f"tracking.artifact_location={location}", "--member",
             str(models["good"]), "--member", str(models["good2"]), "--method", "linear"],
            "tracking.artifact_location", capfd, tmp_path, contains=(says,), absent=(SECRET,))
    assert not (tmp_path / "mlflow.db").exists() or run_statuses(tmp_path / "mlflow.db") == []


def test_s3_upload_failing_mid_run_ends_the_run_failed(models: dict[str, Path], tmp_path: Path, capfd,
                                                       bad_s3: tuple[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails after the pre-flight check (simulated by marking it checked): the upload inside the run
    fails, the run ends FAILED, nothing is registered, and the user still gets one line."""
    from mllm.tracking import preflight as stores
    location, says = bad_s3
    monkeypatch.setattr(stores, "_reachable", {location})
    refused(["merge", *stage_options(tmp_path), "--set", f"tracking.artifact_location={location}", "--member",
             str(models["good"]), "--member", str(models["good2"]), "--method", "linear"],
            "tracking.artifact_location", capfd, tmp_path, contains=(says,), absent=(SECRET,))
    assert run_statuses(tmp_path / "mlflow.db") == ["FAILED"]


# --- the installed script, as a shell user runs it ------------------------------------------------------------


def mllm_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("mllm")
    # The timeout is a hang guard, not a timing assertion: without mllm's pre-flight check, mlflow retries an
    # unreachable tracking server for minutes.
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_script_unreachable_tracking_server(models: dict[str, Path], tmp_path: Path) -> None:
    proc = mllm_script(["merge", *stage_options(tmp_path), "--set", "tracking.tracking_uri=http://127.0.0.1:9",
                        "--member", str(models["good"]), "--member", str(models["good2"]), "--method", "linear"],
                       tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("mllm: error: tracking.tracking_uri: cannot reach http://127.0.0.1:9")


@pytest.mark.slow
def test_script_pickle_only_model(models: dict[str, Path], tmp_path: Path) -> None:
    proc = mllm_script(["evaluate", *stage_options(tmp_path), "--model", str(models["pickled"])], tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("mllm: error: --model: ") and "only pickle weights" in line
    assert store_state(tmp_path / "mlflow.db") == (set(), [])


@pytest.mark.slow
def test_script_unreachable_search_storage(tmp_path: Path) -> None:
    proc = mllm_script(["search", *stage_options(tmp_path), "--storage",
                        f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:9/optuna"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "search.storage" in line and SECRET not in proc.stderr + proc.stdout
