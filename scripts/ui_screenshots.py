"""Screenshots of the MLflow UI as a user sees it: the runs table, the Models tab and the registered model page.

    python scripts/ui_screenshots.py --tracking-uri sqlite:///mlflow-tiny.db --experiment tiny --out ui-shots

Starts `mlflow ui` on a free 127.0.0.1 port against the given store, opens each page in headless Chromium
(Debian package `chromium-headless-shell`, or `chromium`), writes one PNG per page and stops the server. Look at
them: they are how mllm's runs, logged models and registered versions appear to a person.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    sys.exit("ui_screenshots: no headless Chromium found; fix: apt-get install chromium-headless-shell")


def shoot(chrome: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    """One page, after `wait_ms` of virtual time for the single-page app to fetch and render."""
    subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    print(f"{out}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="The store mllm logged to (sqlite:///..., http://...).")
    parser.add_argument("--experiment", required=True, help="Experiment name (the config's `name`).")
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"))
    parser.add_argument("--width", type=int, default=2560)  # wide enough for the Models tab's metric columns
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait-ms", type=int, default=20000)
    args = parser.parse_args()

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(args.tracking_uri, args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"ui_screenshots: no experiment {args.experiment} in {args.tracking_uri}; fix: run the pipeline first")
    chrome = browser()
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    base = args.tracking_uri
    if not base.startswith(("http://", "https://")):
        port = free_port()
        mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        server = subprocess.Popen([mlflow_cli, "ui", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or (server is not None and server.poll() is not None):
                    sys.exit(f"ui_screenshots: the MLflow UI at {base} did not come up")
                time.sleep(1)
        eid = experiment.experiment_id
        merged = f"{args.experiment}-merged"
        for role in ("merged", "finetuned", "base"):  # a study cell scores merges in memory: show its members then
            try:
                merged = client.get_registered_model(f"{args.experiment}-{role}").name
                break
            except MlflowException:
                continue
        alias, version = "champion", None
        for alias in ("champion", "challenger"):  # the gate may have refused every merge: show the challenger then
            try:
                version = client.get_model_version_by_alias(merged, alias)
                break
            except MlflowException:
                continue
        ml = "workflowType=machine_learning"  # the UI's model-training view (its default is the GenAI view)
        pages = {"runs": f"{base}/#/experiments/{eid}/runs?{ml}",
                 "models": f"{base}/#/experiments/{eid}/models?{ml}",
                 "registered-model": f"{base}/#/models/{merged}?{ml}"}
        if version is not None:
            pages[f"{alias}-version"] = f"{base}/#/models/{merged}/versions/{version.version}?{ml}"
        for name, url in pages.items():
            shoot(chrome, url, args.out / f"{name}.png", args.width, args.height, args.wait_ms)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
